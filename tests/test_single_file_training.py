"""A single-file base (original SDXL layout) trains like its diffusers directory, in every training script."""

import logging

import pytest
import torch
from safetensors.torch import load_file

import precompute_latents
import train_sdxl_ztsnr
from sdxl_ztsnr.export import save_single_file


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state, monkeypatch, tmp_path):
    monkeypatch.setenv("SDXL_ZTSNR_CACHE", str(tmp_path / "bases"))  # where single files are converted to
    yield


@pytest.fixture(scope="module")
def single_file(tiny_sdxl, tmp_path_factory):
    """The tiny base as one fp32 file with the v_pred/ztsnr markers, as our export (and NoobAI-XL) ship."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    path = tmp_path_factory.mktemp("single") / "tiny-base.safetensors"
    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    return save_single_file(path, *(m.state_dict() for m in parts), dtype=None)


def _unet(out):
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_a_run_from_the_single_file_trains_the_same_weights_as_from_its_directory(
    tiny_sdxl, single_file, train_cache, trainer_args, tmp_path, caplog
):
    from accelerate.state import AcceleratorState

    common = ["--precomputed_dir", str(train_cache), "--max_train_steps", "2"]
    train_sdxl_ztsnr.main(trainer_args(tiny_sdxl, tmp_path / "from-dir", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    with caplog.at_level(logging.INFO, logger="train_sdxl_ztsnr"):
        # The cache was made from the directory: the file's copy is the same VAE and text encoders, bit for bit.
        train_sdxl_ztsnr.main(
            trainer_args(single_file, tmp_path / "from-file", *common, "--config", str(tiny_sdxl))
        )
    a, b = _unet(tmp_path / "from-dir"), _unet(tmp_path / "from-file")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("v-pred ZTSNR base (marker tensor v_pred" in r.getMessage() for r in caplog.records)
    card = (tmp_path / "from-file" / "README.md").read_text()
    assert "tiny-base.safetensors" in card  # the card names the file, not its cached copy


def test_an_eps_base_is_converted_and_the_log_says_so(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdxl_ztsnr.base_model import conversion_note, resolve_base

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    path = save_single_file(
        tmp_path / "eps.safetensors", *(m.state_dict() for m in parts), v_pred=False, ztsnr=False
    )
    base = resolve_base(str(path), tiny_sdxl)
    assert base.label == str(path) and base.path != str(path)
    note = conversion_note(base.schedule())
    assert note.startswith("ε base") and "converting it to v-pred ZTSNR" in note
    with pytest.raises(Exception, match="--variant fp16: a single-file base"):
        resolve_base(str(path), tiny_sdxl, variant="fp16")


def test_precompute_reads_a_single_file_base(single_file, tiny_sdxl, demo_data, tmp_path):
    out = tmp_path / "cache"
    argv = ["--train_data_dir", str(demo_data), "--pretrained_model_name_or_path", str(single_file)]
    argv += [
        "--config",
        str(tiny_sdxl),
        "--output_dir",
        str(out),
        "--resolution",
        "128",
        "--bucket_step",
        "32",
    ]
    result = precompute_latents.main(
        precompute_latents.parse_args([*argv, "--num_workers", "0", "--no_progress"])
    )
    assert result["metadata"]["counts"]["rows"] > 0


def test_train_vae_starts_from_a_single_file_base(single_file, tiny_sdxl, demo_data, tmp_path):
    import train_vae

    argv = ["--pretrained_model_name_or_path", str(single_file), "--config", str(tiny_sdxl)]
    argv += [
        "--train_data_dir",
        str(demo_data),
        "--output_dir",
        str(tmp_path / "vae"),
        "--max_train_steps",
        "1",
    ]
    argv += [
        "--crop_size",
        "64",
        "--train_batch_size",
        "2",
        "--_lpips_random_backbone",
        "--lpips_net",
        "alex",
    ]
    argv += ["--dataloader_num_workers", "0", "--validation_images", "2"]
    result = train_vae.main(train_vae.parse_args(argv))
    assert result["step"] == 1 and (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
