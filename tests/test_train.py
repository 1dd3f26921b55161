"""train_sdxl_ztsnr.py end to end on the tiny model: precompute → train → checkpoint → resume → load."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_sdxl_ztsnr
from sdxl_ztsnr.export import fold_latent_stats
from sdxl_ztsnr.tiny import build_tiny_sdxl


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state):
    yield


@pytest.fixture(scope="module")
def cache_dir(train_cache):
    return train_cache


@pytest.fixture(scope="module")
def finished_run(tiny_sdxl, cache_dir, trainer_args, tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("run-a")
    args = trainer_args(
        tiny_sdxl,
        out,
        "--precomputed_dir",
        str(cache_dir),
        "--max_train_steps",
        "4",
        "--validation_prompt",
        "solid black",
        "--validation_inference_steps",
        "2",
        "--num_validation_images",
        "1",
    )
    result = train_sdxl_ztsnr.main(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out, result


def unet_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "unet" / "diffusion_pytorch_model.safetensors"))


def test_training_writes_a_pipeline_that_samples_with_ztsnr(finished_run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    out, result = finished_run
    assert result["step"] == 4
    assert result["skipped_steps"] == 0
    assert {"val_loss", "val_loss_t999"} <= set(result)
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    trained, initial = unet_weights(out), unet_weights(tiny_sdxl)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), "training changed nothing"

    pipeline = StableDiffusionXLPipeline.from_pretrained(out)
    config = pipeline.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    image = pipeline(
        "solid black",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()

    single = load_file(str(out / f"{out.name}.safetensors"))
    assert "v_pred" in single and "ztsnr" in single
    config = json.loads((out / "training_config.json").read_text())
    assert config["sigma_max"] == 20000.0 and config["loss_weighting"] == "min_snr"
    assert (out / "README.md").read_text().startswith("---")
    assert list(out.glob("validation-*.png")), "no validation grid was saved"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "nothing was logged to tensorboard"


def test_resumed_run_equals_uninterrupted_run(finished_run, tiny_sdxl, cache_dir, trainer_args, tmp_path):
    import shutil

    out_a, _ = finished_run
    # What a run killed after step 2 leaves behind: its checkpoint-2.
    shutil.copytree(out_a / "checkpoint-2", tmp_path / "checkpoint-2")
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(cache_dir),
        "--max_train_steps",
        "4",
        "--resume_from_checkpoint",
        "latest",
        "--no_single_file",
    )
    result = train_sdxl_ztsnr.main(args)
    assert result["step"] == 4
    resumed, uninterrupted = unet_weights(tmp_path), unet_weights(out_a)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=0)
    assert result["val_loss"] == pytest.approx(finished_run[1]["val_loss"], abs=1e-6)


def test_cache_for_another_model_is_refused(cache_dir, trainer_args, tmp_path):
    other = build_tiny_sdxl(tmp_path / "other-model", seed=1)
    args = trainer_args(
        other,
        tmp_path / "out",
        "--precomputed_dir",
        str(cache_dir),
        "--max_train_steps",
        "1",
    )
    with pytest.raises(ValueError, match="different settings") as error:
        train_sdxl_ztsnr.main(args)
    assert "vae_fingerprint" in str(error.value)
    assert not (tmp_path / "out" / "unet").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_sdxl, cache_dir, trainer_args, tmp_path):
    # An absurd learning rate blows the weights up after one step; every later step is non-finite.
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(cache_dir),
        "--max_train_steps",
        "8",
        "--max_bad_steps",
        "2",
        "--max_grad_norm",
        "1e30",
        "--adam_epsilon",
        "1e-30",
        "--learning_rate",
        "1e30",
        "--mixed_precision",
        "bf16",
    )
    with pytest.raises(SystemExit, match="non-finite steps in a row"):
        train_sdxl_ztsnr.main(args)
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints, "no checkpoint was saved before stopping"
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] <= 4


def test_seed_flags_from_the_old_readme_parse():
    args = train_sdxl_ztsnr.parse_args(
        [
            "--model_path",
            "m",
            "--data_dir",
            "d",
            "--output_dir",
            "o",
            "--learning_rate",
            "1e-6",
            "--batch_size",
            "3",
            "--num_epochs",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--enable_compile",
            "--compile_mode",
            "max-autotune",
            "--use_wandb",
            "--wandb_project",
            "p",
            "--wandb_run_name",
            "r",
            "--enable_amp",
            "--gradient_checkpointing",
            "--use_8bit_adam",
            "--enable_xformers",
            "--max_grad_norm",
            "0.5",
            "--min_tag_weight",
            "0.2",
            "--max_tag_weight",
            "2.5",
            "--character_weight",
            "2",
            "--style_weight",
            "1.3",
            "--quality_weight",
            "0.7",
            "--setting_weight",
            "1",
            "--action_weight",
            "1.2",
            "--object_weight",
            "0.8",
            "--tag_frequency_path",
            "f.json",
            "--dynamic_tag_weights",
            "--text_online",
            "--tag_dropout",
            "0.1",
        ]
    )
    assert args.pretrained_model_name_or_path == "m" and args.train_data_dir == "d"
    assert args.train_batch_size == 3 and args.num_train_epochs == 2
    assert args.mixed_precision == "bf16" and args.report_to == "wandb"
    assert args.character_weight == 2.0 and args.tag_dropout == 0.1
    mixed = train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", "--mixed_precision", "bf16"])
    assert mixed.mixed_precision == "bf16"


def test_vae_stage_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", "--vae_learning_rate", "1e-5"])
    assert "--finetune_vae" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_sdxl_ztsnr.parse_args(["--model_path", "m", "--precomputed_dir", "c", "--finetune_vae"])
    assert "--train_data_dir" in capsys.readouterr().err
    args = train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", "--finetune_vae"])
    assert args.finetune_vae and args.vae_learning_rate is None


def test_tag_dropout_without_online_text_switches_to_online_encoding():
    args = train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", "--tag_dropout", "0.2"])
    assert args.text_online and args.text_online_implied
    args = train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", "--keep_tokens", "1"])
    assert args.text_online and args.text_online_implied
    args = train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d"])
    assert not args.text_online


def test_text_online_with_tag_dropout_and_caption_dropout(
    tiny_sdxl, demo_data, trainer_args, tmp_path, caplog
):
    # The seed's tag-weighting command: --tag_dropout without --text_online. A raw folder: the trainer
    # precomputes it (no embeddings stored) and encodes captions every step, saying so in one line.
    caplog.set_level(logging.INFO, logger="train_sdxl_ztsnr")
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--train_data_dir",
        str(demo_data),
        "--resolution",
        "128",
        "--bucket_step",
        "32",
        "--keep_tokens",
        "1",
        "--tag_dropout",
        "0.3",
        "--proportion_empty_prompts",
        "0.5",
        "--normalize_latents",
        "--max_train_steps",
        "2",
        "--no_single_file",
    )
    result = train_sdxl_ztsnr.main(args)
    assert result["step"] == 2 and result["skipped_steps"] == 0
    switched = [r for r in caplog.records if "encoding them online" in r.getMessage()]
    assert len(switched) == 1
    metadata = json.loads((tmp_path / "cache" / "cache_metadata.json").read_text())
    assert metadata["settings"]["text_online"] is True
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # --normalize_latents: the cache's per-channel statistics travel with the model, folded exactly into the
    # VAE's 1×1 quant_conv / post_quant_conv, so consumers that ignore latents_mean/std decode it right too.
    vae_config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert vae_config.get("latents_mean") is None and vae_config.get("latents_std") is None
    scaling = vae_config["scaling_factor"]
    base_vae = load_file(str(tiny_sdxl / "vae" / "diffusion_pytorch_model.safetensors"))
    expected = fold_latent_stats(
        base_vae, [m / scaling for m in metadata["latents_mean"]], metadata["latents_std"]
    )
    saved = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    for key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
        torch.testing.assert_close(saved[key], expected[key])
        assert not torch.equal(saved[key], base_vae[key]), key
