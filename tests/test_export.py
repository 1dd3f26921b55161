"""Exports load where users load them: diffusers from_pretrained, and the original single-file layout."""

import json
import math
import os
import stat

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdxl_ztsnr.export import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    apply_umask,
    fold_latent_stats,
    save_pipeline,
    save_single_file,
    unet_module_table,
    unet_to_original_state_dict,
    vae_to_original_state_dict,
)
from sdxl_ztsnr.schedule import scheduler_config
from sdxl_ztsnr.sdxl_architecture import SDXL_UNET

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Per-channel latent statistics in the VAE-config convention (what save_pipeline takes), far from (0, 1).
MEAN, STD = [0.3, -0.5, 0.2, 0.1], [0.8, 1.3, 0.6, 1.1]


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


def _components(pipe):
    return (pipe.unet, pipe.vae), (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2)


def test_save_pipeline_round_trip_samples_with_ztsnr(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    (unet, vae), encoders, tokenizers = _components(tiny_pipeline)
    mean, std = [0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 1.3, 0.7]
    out = save_pipeline(tmp_path / "pipe", unet, vae, encoders, tokenizers, scheduler_config(), mean, std)

    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerDiscreteScheduler"
    assert saved["prediction_type"] == "v_prediction"
    assert saved["rescale_betas_zero_snr"] is True
    assert saved["timestep_spacing"] == "trailing"
    assert list((out / "unet").glob("*.safetensors")) and not list(out.rglob("*.bin"))

    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.vae.config.latents_mean == mean and pipe.vae.config.latents_std == std
    assert vae.config.latents_mean is None  # the in-memory VAE is untouched
    # Out of the box the first step starts at t=999 from (near) pure noise: diffusers' ZTSNR sigma 4096.
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == 999
    assert float(pipe.scheduler.sigmas[0]) > 1000.0
    # Decoding goes through the latents_mean/std branch of the pipeline.
    image = pipe(
        "1girl, solo",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_rescale=0.7,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    for name in COMPONENTS:
        a, b = getattr(tiny_pipeline, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_save_pipeline_rejects_eps_scheduler_and_bad_latent_stats(tiny_pipeline, tmp_path):
    (unet, vae), encoders, tokenizers = _components(tiny_pipeline)
    eps = {**scheduler_config(), "prediction_type": "epsilon"}
    with pytest.raises(ValueError, match="prediction_type"):
        save_pipeline(tmp_path / "a", unet, vae, encoders, tokenizers, eps)
    with pytest.raises(ValueError, match="latent_channels"):
        save_pipeline(
            tmp_path / "b", unet, vae, encoders, tokenizers, scheduler_config(), [0.0] * 3, [1.0] * 3
        )


def test_unet_table_matches_sdxl_layout_on_real_config():
    """The real SDXL UNet (meta device, no memory) maps onto the key names of the original checkpoints."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    original = unet_to_original_state_dict(unet.state_dict())
    assert len(original) == len(unet.state_dict()) == 1680  # SDXL base 1.0 has 1680 UNet tensors
    for key, shape in {
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "middle_block.1.proj_in.weight": (1280, 1280),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "label_emb.0.0.weight": (1280, 2816),
        "out.2.weight": (4, 320, 3, 3),
    }.items():
        assert tuple(original[UNET_PREFIX + key].shape) == shape, key
    assert "down_blocks.0.attentions.0" not in unet_module_table(unet.state_dict())


def test_single_file_maps_every_weight_once_with_markers(tiny_pipeline, tmp_path):
    sds = [getattr(tiny_pipeline, name).state_dict() for name in COMPONENTS]
    path = save_single_file(tmp_path / "model.safetensors", *sds)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("v_pred").numel() == 0 and f.get_tensor("ztsnr").numel() == 0
        assert f.get_tensor(UNET_PREFIX + "input_blocks.0.0.weight").dtype == torch.float16
        assert f.metadata()["modelspec.prediction_type"] == "v"
    unet_sd, vae_sd, te1_sd, te2_sd = sds
    layers_2 = tiny_pipeline.text_encoder_2.config.num_hidden_layers
    # Everything maps 1:1 except open_clip's fused attention: q, k, v (weight and bias) -> one of each.
    # Plus the two tensors the SDXL base file has and transformers' models do not: CLIP-L's position_ids and
    # open_clip's logit_scale.
    expected = {
        UNET_PREFIX: len(unet_sd),
        VAE_PREFIX: len(vae_sd),
        CLIP_L_PREFIX: len(te1_sd) + 1,
        CLIP_G_PREFIX: len(te2_sd) - 4 * layers_2 + 1,
    }
    for prefix, count in expected.items():
        assert sum(k.startswith(prefix) for k in keys) == count, prefix
    assert len(keys) == sum(expected.values()) + 2
    with safe_open(str(path), "pt") as f:
        position_ids = f.get_tensor(CLIP_L_PREFIX + "text_model.embeddings.position_ids")
        logit_scale = f.get_tensor(CLIP_G_PREFIX + "logit_scale")
    positions = tiny_pipeline.text_encoder.config.max_position_embeddings
    assert position_ids.dtype == torch.int64 and torch.equal(position_ids, torch.arange(positions)[None])
    # CLIP's temperature clamp, ln 100, stored in fp16 like the rest: 4.6055 as in sd_xl_base_1.0.
    assert logit_scale.shape == () and logit_scale.dtype == torch.float16
    assert float(logit_scale) == pytest.approx(math.log(100.0), abs=1e-3)
    assert CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight" in keys
    assert CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in keys
    assert VAE_PREFIX + "decoder.up.0.upsample.conv.weight" not in keys  # the last decoder level has none
    assert VAE_PREFIX + "decoder.up.3.upsample.conv.weight" in keys


def test_single_file_layout_details(tiny_pipeline):
    vae = vae_to_original_state_dict(tiny_pipeline.vae.state_dict())
    q = vae[VAE_PREFIX + "encoder.mid.attn_1.q.weight"]
    assert q.shape[-2:] == (1, 1)  # ldm AttnBlock uses 1x1 convs
    # diffusers up_blocks.0 is the deepest level, stored as up.<last> in the original layout.
    assert torch.equal(
        vae[VAE_PREFIX + "decoder.up.3.block.0.conv1.weight"],
        tiny_pipeline.vae.state_dict()["decoder.up_blocks.0.resnets.0.conv1.weight"],
    )
    with pytest.raises(ValueError, match="no place"):
        unet_to_original_state_dict({**tiny_pipeline.unet.state_dict(), "lora_A.weight": torch.zeros(1)})


def test_single_file_round_trip_through_diffusers_loader(tiny_sdxl, tiny_pipeline, tmp_path):
    """diffusers' own single-file converter (an independent reference) reads our file back exactly."""
    from diffusers import StableDiffusionXLPipeline

    # Perturb every weight so the check cannot pass by reading the config dir's own weights back.
    generator = torch.Generator().manual_seed(1)
    trained = {}
    for name in COMPONENTS:
        sd = getattr(tiny_pipeline, name).state_dict()
        trained[name] = {
            k: v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in sd.items()
        }
    path = save_single_file(tmp_path / "model.safetensors", *trained.values(), dtype=None)
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tiny_sdxl), local_files_only=True
    )
    for name in COMPONENTS:
        got = getattr(loaded, name).state_dict()
        assert set(got) == set(trained[name]), name
        assert all(torch.equal(got[k], trained[name][k]) for k in got), name
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def _image(pipe) -> np.ndarray:
    """One 64x64 sample, one step, fixed seed: (1, 64, 64, 3) floats in [0, 1] after the pipeline's decode."""
    return pipe(
        "1girl, solo",
        num_inference_steps=1,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_fold_latent_stats_is_the_affine_diffusers_applies(tiny_pipeline):
    """Folded VAE used plainly == original VAE with latents_mean/std as diffusers' SDXL pipelines apply them."""
    from diffusers import AutoencoderKL

    vae = tiny_pipeline.vae
    folded = AutoencoderKL.from_config(vae.config).eval()
    folded.load_state_dict(fold_latent_stats(vae.state_dict(), MEAN, STD))
    sf = vae.config.scaling_factor
    m, s = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    generator = torch.Generator().manual_seed(0)
    n = torch.randn(2, 4, 8, 8, generator=generator)  # the UNet's normalised latents
    pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        # Decode as StableDiffusionXLPipeline does with the statistics in the config, and plainly (folded).
        expected = vae.decode(n * s / sf + m).sample
        torch.testing.assert_close(folded.decode(n / sf).sample, expected, atol=1e-4, rtol=0)
        assert (vae.decode(n / sf).sample - expected).abs().max() > 1e-2  # the statistics do matter
        # Encode as the img2img pipeline does, (z - m) * sf / s, against the folded encoder's plain z * sf.
        posterior, posterior_folded = vae.encode(pixels).latent_dist, folded.encode(pixels).latent_dist
    torch.testing.assert_close(posterior_folded.mean * sf, (posterior.mean - m) * sf / s, atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior_folded.std, posterior.std / s, atol=0, rtol=1e-4)
    unchanged = set(vae.state_dict()) - {
        f"{c}.{p}" for c in ("quant_conv", "post_quant_conv") for p in ("weight", "bias")
    }
    folded_sd = folded.state_dict()
    assert all(torch.equal(folded_sd[k], vae.state_dict()[k]) for k in unchanged)


def test_normalized_latents_decode_alike_from_directory_and_single_file(tiny_sdxl, tiny_pipeline, tmp_path):
    """--normalize_latents: diffusers' from_single_file decodes the UNet's latents as the directory does."""
    from diffusers import StableDiffusionXLPipeline

    (unet, vae), encoders, tokenizers = _components(tiny_pipeline)
    sds = [getattr(tiny_pipeline, name).state_dict() for name in COMPONENTS]
    config_dir = save_pipeline(
        tmp_path / "config", unet, vae, encoders, tokenizers, scheduler_config(), MEAN, STD
    )
    folded_dir = save_pipeline(
        tmp_path / "folded", unet, vae, encoders, tokenizers, scheduler_config(), MEAN, STD, fold_latents=True
    )
    path = save_single_file(
        tmp_path / "model.safetensors", *sds, dtype=None, latents_mean=MEAN, latents_std=STD
    )
    plain = save_single_file(tmp_path / "plain.safetensors", *sds, dtype=None)  # statistics dropped: the bug

    reference = _image(StableDiffusionXLPipeline.from_pretrained(config_dir))
    assert reference.std() > 0.01  # not a flat (all-clipped) image, so the comparisons below mean something
    np.testing.assert_allclose(
        _image(StableDiffusionXLPipeline.from_pretrained(folded_dir)), reference, atol=1e-4
    )
    for config in (tiny_sdxl, folded_dir):  # the base's configs, or the folded directory's own
        single = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True
        )
        assert single.vae.config.latents_mean is None
        np.testing.assert_allclose(_image(single), reference, atol=1e-4)
    unfolded = StableDiffusionXLPipeline.from_single_file(
        str(plain), config=str(tiny_sdxl), local_files_only=True
    )
    assert np.abs(_image(unfolded) - reference).max() > 1e-2

    assert json.loads((folded_dir / "vae" / "config.json").read_text())["latents_mean"] is None
    assert vae.config.latents_mean is None and torch.equal(
        vae.state_dict()["quant_conv.bias"], sds[1]["quant_conv.bias"]
    )
    with safe_open(str(path), "pt") as f:
        recorded = json.loads(f.metadata()["latent_normalization"])
    assert recorded["latents_mean"] == MEAN and recorded["latents_std"] == STD


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tiny_pipeline, tmp_path, umask, mode):
    """safetensors writes 0600 whatever the umask; our exports end as a plain open() would make them."""
    (unet, vae), encoders, tokenizers = _components(tiny_pipeline)
    previous = os.umask(umask)
    try:
        out = save_pipeline(tmp_path / "pipe", unet, vae, encoders, tokenizers, scheduler_config())
        path = save_single_file(
            tmp_path / "model.safetensors", *(m.state_dict() for m in (unet, vae, *encoders))
        )
    finally:
        os.umask(previous)
    files = [path, *(p for p in out.rglob("*") if p.is_file())]
    assert any(p.suffix == ".safetensors" for p in out.rglob("*"))
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


def test_apply_umask_keeps_execute_bits_and_skips_links(tmp_path):
    previous = os.umask(0o027)
    try:
        (tmp_path / "sub").mkdir()
        weights, script = tmp_path / "sub" / "w.safetensors", tmp_path / "run.sh"
        for path, mode in ((weights, 0o600), (script, 0o700)):
            path.write_text("x")
            os.chmod(path, mode)
        (tmp_path / "link").symlink_to(weights)
        assert sorted(apply_umask(tmp_path)) == sorted([weights, script])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o640
    assert stat.S_IMODE(script.stat().st_mode) == 0o750
