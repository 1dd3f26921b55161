"""The trainer with EMA and with LoRA, end to end on the tiny model: outputs, exact resume, what is refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_sdxl_ztsnr
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.tiny import build_tiny_sdxl


def run(args):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train_sdxl_ztsnr.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def unet_weights(directory):
    return load_file(str(directory / "diffusion_pytorch_model.safetensors"))


def assert_equal_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


EMA = ["--use_ema", "--ema_decay", "0.5", "--ema_warmup", "none", "--no_single_file"]


@pytest.fixture(scope="module")
def ema_run(tiny_sdxl, train_cache, trainer_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema-run")
    run(trainer_args(tiny_sdxl, out, "--precomputed_dir", str(train_cache), "--max_train_steps", "4", *EMA))
    return out


def test_ema_is_saved_beside_the_raw_weights_and_resumes_exactly(
    ema_run, tiny_sdxl, train_cache, trainer_args, tmp_path
):
    raw, ema = unet_weights(ema_run / "unet"), unet_weights(ema_run / "unet_ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "the EMA equals the raw weights"
    assert "ema_state.safetensors" in {p.name for p in (ema_run / "checkpoint-2").iterdir()}

    shutil.copytree(ema_run / "checkpoint-2", tmp_path / "checkpoint-2")
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--max_train_steps", "4", *EMA,
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    run(args)
    assert_equal_weights(unet_weights(tmp_path / "unet"), raw)
    assert_equal_weights(unet_weights(tmp_path / "unet_ema"), ema)


def test_export_ema_makes_the_ema_the_model(ema_run, tiny_sdxl, train_cache, trainer_args, tmp_path):
    # The same run, resumed at its last checkpoint to write outputs again, this time exporting the EMA.
    shutil.copytree(ema_run / "checkpoint-4", tmp_path / "checkpoint-4")
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--max_train_steps", "4", *EMA,
        "--export_ema", "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    run(args)
    assert_equal_weights(unet_weights(tmp_path / "unet"), unet_weights(ema_run / "unet_ema"))


def test_without_ema_there_is_no_ema_output(tiny_sdxl, train_cache, trainer_args, tmp_path):
    run(trainer_args(tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--max_train_steps", "1"))
    assert (tmp_path / "unet").is_dir() and not (tmp_path / "unet_ema").exists()
    assert "ema_state.safetensors" not in {p.name for p in (tmp_path / "checkpoint-1").iterdir()}


def test_export_and_validate_ema_need_use_ema():
    with pytest.raises(SystemExit):
        train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", "--export_ema"])


LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--use_ema", "--ema_decay", "0.5"]


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, train_cache, trainer_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    run(trainer_args(tiny_sdxl, out, "--precomputed_dir", str(train_cache), "--max_train_steps", "4", *LORA))
    return out


def test_lora_run_writes_both_formats_and_checkpoints_only_the_adapter(lora_run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    files = {p.name for p in lora_run.iterdir()}
    assert {"pytorch_lora_weights.safetensors", f"{lora_run.name}.safetensors", "README.md"} <= files
    assert "unet" not in files, "a LoRA run exported the whole UNet"
    assert (lora_run / "lora_ema" / "pytorch_lora_weights.safetensors").is_file()
    kohya = load_file(str(lora_run / f"{lora_run.name}.safetensors"))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    checkpoint = {p.name for p in (lora_run / "checkpoint-4").iterdir()}
    assert "lora_state.safetensors" in checkpoint and not any(n.startswith("model") for n in checkpoint)

    # The saved LoRA changes the base's prediction (it trained), as diffusers loads it.
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = dict(
        encoder_hidden_states=torch.randn(1, 77, pipeline.unet.config.cross_attention_dim),
        added_cond_kwargs={
            "text_embeds": torch.randn(1, pipeline.text_encoder_2.config.projection_dim),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        },
    )
    with torch.no_grad():
        before = pipeline.unet(latents, 500, **inputs).sample
        pipeline.load_lora_weights(lora_run)
        after = pipeline.unet(latents, 500, **inputs).sample
    assert (after - before).abs().max() > 1e-4


def test_lora_resume_is_exact(lora_run, tiny_sdxl, train_cache, trainer_args, tmp_path):
    shutil.copytree(lora_run / "checkpoint-2", tmp_path / "checkpoint-2")
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--max_train_steps", "4", *LORA,
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    run(args)
    for name in ("pytorch_lora_weights.safetensors", "lora_ema/pytorch_lora_weights.safetensors"):
        assert_equal_weights(load_file(str(tmp_path / name)), load_file(str(lora_run / name)))


def test_lora_beyond_the_attention_projections_reloads_the_trained_adapter_from_both_files(
    tiny_sdxl, train_cache, trainer_args, tmp_path
):
    """Issue 16.6 through the flag: resnet and time-embedding targets beside the defaults, both files complete."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    from sdxl_ztsnr.lora import add_lora, load_lora_state

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "time_emb_proj", "time_embedding.linear_1"]
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--max_train_steps", "2",
        "--lora_rank", "4", "--lora_alpha", "2", "--learning_rate", "1e-2", "--lora_target_modules", *targets,
    )  # fmt: skip
    run(args)

    def deltas(unet):  # scale·B·A of each adapted layer's active adapter
        with torch.no_grad():
            return {
                n: m.get_delta_weight(m.active_adapters[0])
                for n, m in unet.named_modules()
                if isinstance(m, LoraLayer)
            }

    trained_unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    add_lora(trained_unet, rank=4, alpha=2, target_modules=targets)
    load_lora_state(trained_unet, tmp_path / "checkpoint-2")  # the adapter as the run ended
    trained = deltas(trained_unet)
    assert any(name.endswith(".conv1") for name in trained) and "time_embedding.linear_1" in trained
    for weight_name in ("pytorch_lora_weights.safetensors", f"{tmp_path.name}.safetensors"):
        pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipeline.load_lora_weights(tmp_path, weight_name=weight_name)
        loaded = deltas(pipeline.unet)
        assert loaded.keys() == trained.keys(), weight_name
        for name, delta in trained.items():
            assert delta.abs().max() > 0, name  # every adapted layer trained (B left zero)
            torch.testing.assert_close(
                loaded[name], delta, atol=1e-6, rtol=1e-5, msg=f"{weight_name}: {name}"
            )


def test_lora_on_an_epsilon_base_is_refused(tiny_sdxl, train_cache, trainer_args, tmp_path):
    base = build_tiny_sdxl(tmp_path / "eps-model", seed=0)
    config_path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "epsilon"
    config_path.write_text(json.dumps(config))
    args = trainer_args(base, tmp_path / "out", "--precomputed_dir", str(train_cache), "--lora_rank", "4")
    with pytest.raises(UserError, match="v-prediction"):
        run(args)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


# --- memory switches --------------------------------------------------------------------------------------


def test_fused_backward_pass_trains_the_same_weights_without_clipping(
    tiny_sdxl, train_cache, trainer_args, tmp_path
):
    common = ("--precomputed_dir", str(train_cache), "--max_train_steps", "3", "--max_grad_norm", "0")
    run(trainer_args(tiny_sdxl, tmp_path / "plain", *common, "--no_single_file"))
    run(trainer_args(tiny_sdxl, tmp_path / "fused", *common, "--no_single_file", "--fused_backward_pass"))
    plain, fused = unet_weights(tmp_path / "plain" / "unet"), unet_weights(tmp_path / "fused" / "unet")
    assert_equal_weights(fused, plain, atol=1e-5)
    assert any(not torch.equal(plain[k], unet_weights(tiny_sdxl / "unet")[k]) for k in plain)


def test_fused_backward_pass_refuses_accumulation(tiny_sdxl, train_cache, trainer_args, tmp_path):
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--fused_backward_pass",
        "--gradient_accumulation_steps", "2",
    )  # fmt: skip
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 1"):
        run(args)


def test_lowest_memory_combination_trains_and_resumes_exactly(tiny_sdxl, train_cache, trainer_args, tmp_path):
    low = (
        "--weights_dtype", "bf16", "--optimizer", "adafactor", "--fused_backward_pass",
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--learning_rate", "1e-3", "--no_single_file",
    )  # fmt: skip
    common = ("--precomputed_dir", str(train_cache), "--max_train_steps", "4", *low)
    result = run(trainer_args(tiny_sdxl, tmp_path / "a", *common))
    assert result["step"] == 4 and result["skipped_steps"] == 0
    trained = unet_weights(tmp_path / "a" / "unet")
    assert {v.dtype for v in trained.values()} == {torch.bfloat16}
    initial = unet_weights(tiny_sdxl / "unet")
    assert any(not torch.equal(trained[k], initial[k].to(torch.bfloat16)) for k in trained)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run(trainer_args(tiny_sdxl, tmp_path / "b", *common, "--resume_from_checkpoint", "latest"))
    assert_equal_weights(unet_weights(tmp_path / "b" / "unet"), trained, atol=0)


def test_seed_enable_xformers_without_xformers_warns_once_and_trains(
    tiny_sdxl, train_cache, trainer_args, tmp_path, caplog
):
    from diffusers.utils import is_xformers_available

    if is_xformers_available():
        pytest.skip("xformers is installed here")
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--max_train_steps", "1", "--enable_xformers",
        "--no_single_file",
    )  # fmt: skip
    assert args.attention_backend == "xformers"
    assert run(args)["step"] == 1
    warnings = [r for r in caplog.records if "xformers" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "scaled_dot_product_attention" in warnings[0].getMessage()
