"""The tiny SDXL builder: loads through diffusers' own from_pretrained paths, samples, is SDXL-shaped."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_ztsnr.tiny import WORD_LIST, build_tiny_sdxl, byte_symbols, main, train_bpe

CAPTION = "1girl, anime style, outdoor, solid black"


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_samples_64px_image(pipeline: StableDiffusionXLPipeline):
    def sample(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        out = pipeline(CAPTION, num_inference_steps=2, generator=generator, output_type="np")
        return out.images

    images = sample(0)
    # No height/width given: the pipeline's default comes from unet.sample_size * 8 = 64.
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0  # random weights still give a non-constant image
    np.testing.assert_array_equal(images, sample(0))
    assert not np.array_equal(images, sample(1))


def test_pipeline_ships_ztsnr_v_prediction_scheduler(pipeline: StableDiffusionXLPipeline):
    config = pipeline.scheduler.config
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr is True
    assert config.timestep_spacing == "trailing"
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.num_train_timesteps == 1000
    pipeline.scheduler.set_timesteps(2)
    assert int(pipeline.scheduler.timesteps[0]) == 999  # trailing: sampling starts at the pure-noise step


def test_non_square_latents_with_sides_multiple_of_4(tiny_sdxl: Path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    latents = torch.randn(2, 4, 12, 8)  # 96x64 px
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(2, pooled_dim),
        "time_ids": torch.tensor([[96.0, 64, 0, 0, 96, 64]] * 2),
    }
    with torch.no_grad():
        out = unet(latents, torch.tensor([0, 999]), text, added_cond_kwargs=added).sample
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()


def test_encode_prompt_dims_come_from_configs(pipeline: StableDiffusionXLPipeline):
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(CAPTION, do_classifier_free_guidance=False)
    hidden = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert prompt_embeds.shape == (1, 77, hidden)
    assert hidden == pipeline.unet.config.cross_attention_dim != 2048
    assert pooled.shape == (1, pipeline.text_encoder_2.config.projection_dim)


def test_unet_has_sdxl_structure(tiny_sdxl: Path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    config = unet.config
    assert tuple(config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(config.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert config.addition_embed_type == "text_time"
    assert config.use_linear_projection is True
    layers = list(config.transformer_layers_per_block)
    assert layers == sorted(layers) and layers[-1] > layers[0]  # deeper transformers at lower resolution
    text_2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2").config
    text_1 = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder").config
    expected_add_dim = text_2.projection_dim + 6 * config.addition_time_embed_dim
    assert config.projection_class_embeddings_input_dim == expected_add_dim
    assert config.cross_attention_dim == text_1.hidden_size + text_2.hidden_size
    assert sum(p.numel() for p in unet.parameters()) < 3_000_000


def test_text_encoders_are_clip_l_and_bigg_like(tiny_sdxl: Path):
    text_1 = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder")
    text_2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    assert type(text_1) is CLIPTextModel and not hasattr(text_1, "text_projection")
    assert text_1.config.hidden_act == "quick_gelu"
    assert text_2.config.hidden_act == "gelu"
    assert (
        text_1.config.num_hidden_layers >= 2 and text_2.config.num_hidden_layers >= 2
    )  # penultimate layer used
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer")
    assert text_1.config.vocab_size == text_2.config.vocab_size == len(tokenizer)
    assert text_2.config.eos_token_id == tokenizer.eos_token_id


def test_vae_downsamples_8x(tiny_sdxl: Path):
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    assert len(vae.config.block_out_channels) == 4
    assert vae.config.latent_channels == 4
    assert vae.config.scaling_factor == pytest.approx(0.13025)
    assert vae.config.force_upcast is True
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8)
    assert decoded.shape == image.shape and torch.isfinite(decoded).all()


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2"])
def test_tokenizers_round_trip_tag_captions(tiny_sdxl: Path, subfolder: str):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=subfolder)
    assert tokenizer.model_max_length == 77
    ids = tokenizer(CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(CAPTION).input_ids)
    assert {"girl</w>", "anime</w>", "style</w>", "outdoor</w>", "solid</w>", "black</w>"} <= set(tokens)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    # CLIP decodes every word end as a space ("1 girl , anime ..."); the characters must survive.
    assert decoded.replace(" ", "") == CAPTION.replace(" ", "")
    # Unknown words fall back to pieces down to single bytes, never to the unknown token.
    odd = "Zyqx-42 grüße ☃"
    odd_ids = tokenizer(odd).input_ids
    assert tokenizer.unk_token_id not in odd_ids[1:-1]
    assert tokenizer.decode(odd_ids, skip_special_tokens=True).replace(" ", "") == odd.lower().replace(
        " ", ""
    )


def test_second_tokenizer_pads_like_sdxl(tiny_sdxl: Path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer_2.pad_token == "!"
    padded = tokenizer_2("solid white", padding="max_length", max_length=77).input_ids
    assert padded[-1] == tokenizer_2.convert_tokens_to_ids("!") != tokenizer_2.eos_token_id


def test_bpe_alphabet_matches_byte_level_and_words_are_single_tokens():
    # tokenizers' ByteLevel pre-tokenizer is an independent reference for the byte -> symbol table.
    assert sorted(byte_symbols().values()) == sorted(ByteLevel.alphabet())
    assert byte_symbols()[ord(" ")] == "Ġ"
    vocab, merges = train_bpe(WORD_LIST)
    assert len(vocab) == len(set(vocab.values())) and sorted(vocab.values()) == list(range(len(vocab)))
    for word in WORD_LIST:
        assert word + "</w>" in vocab
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert train_bpe(list(reversed(WORD_LIST))) == (vocab, merges)  # order of the word list does not matter


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_build_is_deterministic_by_seed(tiny_sdxl: Path, tmp_path: Path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_sdxl(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_draw)  # building leaves the caller's RNG alone
    reference, rebuilt = _file_bytes(tiny_sdxl), _file_bytes(again)
    assert sorted(reference) == sorted(rebuilt)
    assert "unet/diffusion_pytorch_model.safetensors" in reference
    for name, content in reference.items():
        assert rebuilt[name] == content, name

    other = _file_bytes(build_tiny_sdxl(tmp_path / "other", seed=1))
    for name in reference:
        if name.endswith(".safetensors"):
            assert other[name] != reference[name], name


def test_cli_writes_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out
    main([str(tmp_path / "cli"), "--seed", "2"])
    assert (tmp_path / "cli" / "model_index.json").is_file()
    assert (tmp_path / "cli" / "tokenizer" / "merges.txt").is_file()
    assert len(list((tmp_path / "cli").rglob("*.safetensors"))) == 4
