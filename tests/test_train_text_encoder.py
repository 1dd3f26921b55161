"""--train_text_encoder end to end on the tiny model: both encoders train (whole or LoRA), with their own learning
rates, into every output; checkpoints resume exactly; what is refused."""

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

import precompute_latents
import train_sdxl_ztsnr
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.export import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    clip_g_to_original_state_dict,
    clip_l_to_original_state_dict,
)


def run(args):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train_sdxl_ztsnr.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def encoder_weights(directory, index: int) -> dict[str, torch.Tensor]:
    return load_file(str(directory / ("text_encoder", "text_encoder_2")[index] / "model.safetensors"))


def assert_close_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def unread_by_sdxl(key: str) -> bool:
    """Encoder 1's last layer (the tiny one has 2) and final layer norm: SDXL reads its penultimate layer."""
    return key.removeprefix("text_model.").startswith(("encoder.layers.1.", "final_layer_norm."))


FULL = [
    "--train_text_encoder",
    "--text_encoder_lr",
    "1e-3",
    "--text_encoder_2_lr",
    "2e-3",
    "--max_train_steps",
    "4",
]


@pytest.fixture(scope="module")
def full_run(tiny_sdxl, train_cache, trainer_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("te-full")
    args = trainer_args(
        tiny_sdxl, out, "--precomputed_dir", str(train_cache), "--learning_rate", "5e-4", *FULL
    )
    return out, run(args)


def test_full_run_trains_both_encoders_into_the_pipeline_and_the_single_file(full_run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    out, result = full_run
    assert result["step"] == 4 and result["skipped_steps"] == 0
    for index in (0, 1):
        trained, base = encoder_weights(out, index), encoder_weights(tiny_sdxl, index)
        changed = {k for k in trained if not torch.equal(trained[k], base[k])}
        if index == 0:  # what SDXL never reads of encoder 1 is frozen; the rest trained
            assert changed == {k for k in trained if not unread_by_sdxl(k)}
        else:
            assert changed == set(trained), "encoder 2 did not train everywhere"
    pipeline = StableDiffusionXLPipeline.from_pretrained(out)
    single = load_file(str(out / f"{out.name}.safetensors"))
    expected = {
        **clip_l_to_original_state_dict(pipeline.text_encoder.state_dict()),
        **clip_g_to_original_state_dict(pipeline.text_encoder_2.state_dict()),
    }
    keys = {k for k in single if k.startswith((CLIP_L_PREFIX, CLIP_G_PREFIX))}
    assert keys == set(expected)
    for key in keys:
        assert torch.equal(single[key], expected[key].to(single[key].dtype)), key

    # Checkpoints hold both encoders and an optimizer with one group per model at its own learning rate.
    checkpoint = out / "checkpoint-2"
    assert {"model_1.safetensors", "model_2.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    groups = torch.load(checkpoint / "optimizer.bin", weights_only=False)["param_groups"]
    assert [g["lr"] for g in groups] == [5e-4, 1e-3, 2e-3]


def test_full_run_resumes_exactly(full_run, tiny_sdxl, train_cache, trainer_args, tmp_path):
    out, _ = full_run
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--learning_rate", "5e-4", *FULL,
        "--resume_from_checkpoint", "latest", "--no_single_file",
    )  # fmt: skip
    assert run(args)["step"] == 4
    for index in (0, 1):
        assert_close_weights(encoder_weights(tmp_path, index), encoder_weights(out, index))
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert_close_weights(load_file(str(tmp_path / unet)), load_file(str(out / unet)))


def test_requeue_with_missing_outputs_writes_the_trained_encoders(
    full_run, tiny_sdxl, train_cache, trainer_args, tmp_path
):
    out, _ = full_run
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")  # a finished run whose outputs were lost
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--learning_rate", "5e-4", *FULL,
        "--resume_from_checkpoint", "latest", "--no_single_file",
    )  # fmt: skip
    assert run(args).get("finished_before")
    for index in (0, 1):
        assert_close_weights(encoder_weights(tmp_path, index), encoder_weights(out, index), atol=0)


def test_zero_learning_rate_freezes_that_encoder_and_the_log_says_online(
    tiny_sdxl, train_cache, trainer_args, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="train_sdxl_ztsnr")
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--train_text_encoder",
        "--text_encoder_2_lr", "0", "--max_train_steps", "1", "--no_single_file",
    )  # fmt: skip
    run(args)
    frozen, base = encoder_weights(tmp_path, 1), encoder_weights(tiny_sdxl, 1)
    assert all(torch.equal(frozen[k], base[k]) for k in base), "encoder 2 trained at learning rate 0"
    trained, base = encoder_weights(tmp_path, 0), encoder_weights(tiny_sdxl, 0)
    assert any(not torch.equal(trained[k], base[k]) for k in trained), "encoder 1 did not train"
    names = {p.name for p in (tmp_path / "checkpoint-1").iterdir()}
    assert "model_1.safetensors" in names and "model_2.safetensors" not in names
    online = [r for r in caplog.records if "encoding them online" in r.getMessage()]
    assert len(online) == 1 and "--train_text_encoder" in online[0].getMessage()


LORA = ["--train_text_encoder", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"]
LORA += ["--max_train_steps", "2", "--checkpointing_steps", "1", "--gradient_checkpointing", "--use_ema"]


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, train_cache, trainer_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("te-lora")
    run(trainer_args(tiny_sdxl, out, "--precomputed_dir", str(train_cache), *LORA))
    return out


def prompt_states(encoder, tokenizer) -> torch.Tensor:
    ids = tokenizer(["solid black, anime style"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        return encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]


def test_lora_run_saves_the_encoders_loras_in_both_files(lora_run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_ztsnr.text_encoder_training import TEXT_LORA_STATE_NAME, add_text_encoder_lora, unread_modules

    kohya = load_file(str(lora_run / f"{lora_run.name}.safetensors"))
    modules = {k.split(".")[0] for k in kohya}
    te1 = {m for m in modules if m.startswith("lora_te1_text_model_encoder_layers_")}
    te2 = {m for m in modules if m.startswith("lora_te2_text_model_encoder_layers_")}
    assert len(te1) == 6 and all("_layers_0_" in m for m in te1), "encoder 1: its first layer's 6 linears"
    assert len(te2) == 18, "encoder 2: 6 linears in each of its 3 layers"
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    ema = load_file(str(lora_run / "lora_ema" / f"{lora_run.name}_ema.safetensors"))
    assert {k for k in kohya if k.startswith("lora_te")} == {k for k in ema if k.startswith("lora_te")}
    checkpoint = {p.name for p in (lora_run / "checkpoint-2").iterdir()}
    assert TEXT_LORA_STATE_NAME in checkpoint and not any(n.startswith("model") for n in checkpoint)

    # diffusers loads the encoders' LoRAs from its file: the same encoders as the run's final checkpoint.
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = [prompt_states(e, pipeline.tokenizer) for e in (pipeline.text_encoder, pipeline.text_encoder_2)]
    pipeline.load_lora_weights(lora_run)
    state = load_file(str(lora_run / "checkpoint-2" / TEXT_LORA_STATE_NAME))
    for index, (kind, name) in enumerate(
        [(CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")]
    ):
        encoder = kind.from_pretrained(tiny_sdxl, subfolder=name)
        add_text_encoder_lora(encoder, 4, 8.0, 0.0, unread_modules(encoder) if index == 0 else ())
        loaded = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.split(".")[0] == name}
        missing, unexpected = encoder.load_state_dict(loaded, strict=False)
        assert not unexpected and not [k for k in missing if "lora_" in k]
        from_file = prompt_states(getattr(pipeline, name), pipeline.tokenizer)
        assert (from_file - before[index]).abs().max() > 1e-4, f"{name}: the LoRA changed nothing"
        torch.testing.assert_close(from_file, prompt_states(encoder, pipeline.tokenizer), atol=1e-5, rtol=0)


def test_lora_run_resumes_exactly(lora_run, tiny_sdxl, train_cache, trainer_args, tmp_path):
    shutil.copytree(lora_run / "checkpoint-1", tmp_path / "checkpoint-1")
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(train_cache),
        *LORA,
        "--resume_from_checkpoint",
        "latest",
    )
    run(args)
    name = "pytorch_lora_weights.safetensors"
    resumed, unbroken = load_file(str(tmp_path / name)), load_file(str(lora_run / name))
    assert any(k.startswith("text_encoder_2.") for k in resumed)
    assert_close_weights(resumed, unbroken)


def test_a_cache_without_captions_is_refused(tiny_sdxl, demo_data, trainer_args, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for picture in sorted(demo_data.glob("*.png"))[:4]:
        shutil.copy(picture, images / picture.name)
        (images / picture.with_suffix(".txt").name).write_text("")
    cache = tmp_path / "cache"
    precompute_latents.main(
        precompute_latents.parse_args(
            [
                "--train_data_dir",
                str(images),
                "--model_path",
                str(tiny_sdxl),
                "--output_dir",
                str(cache),
                "--resolution",
                "128",
                "--bucket_step",
                "32",
                "--allow_empty_captions",
                "--no_progress",
                "--num_workers",
                "0",
            ]
        )  # fmt: skip
    )
    args = trainer_args(
        tiny_sdxl,
        tmp_path / "out",
        "--precomputed_dir",
        str(cache),
        "--train_text_encoder",
        "--max_train_steps",
        "1",
    )
    with pytest.raises(UserError, match="holds no captions") as error:
        run(args)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--text_encoder_lr", "1e-5"], "are for --train_text_encoder"),
        (["--train_text_encoder", "--text_encoder_lr", "0"], "trains neither"),
        (["--train_text_encoder", "--text_encoder_2_lr", "-1"], "must be >= 0"),
        (["--train_text_encoder", "--lora_weights", "x.safetensors"], "a continued LoRA trains the UNet's"),
        (["--train_text_encoder", "--lora_rank", "4", "--lora_type", "loha"], "plain LoRA"),
    ],
)
def test_text_encoder_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", *flags])
    assert message in capsys.readouterr().err


def test_kohya_spellings_and_defaults():
    from sdxl_ztsnr.text_encoder_training import text_encoder_learning_rates

    args = train_sdxl_ztsnr.parse_args(
        ["--model_path", "m", "--data_dir", "d", "--train_text_encoder", "--learning_rate_te1", "3e-5",
         "--learning_rate_te2", "0"]
    )  # fmt: skip
    assert (args.text_encoder_lr, args.text_encoder_2_lr) == (3e-5, 0.0)
    assert args.text_online and args.text_online_implied
    assert text_encoder_learning_rates(1e-4, None, None) == (1e-4, 1e-4)
    assert text_encoder_learning_rates(1e-4, 2e-5, None) == (2e-5, 2e-5)
    assert text_encoder_learning_rates(1e-4, None, 0.0) == (1e-4, 0.0)


@pytest.mark.parametrize("form", ["plain", "bf16", "fused_backward"])
def test_parameter_groups_keep_their_learning_rates_in_every_optimizer_form(form):
    from sdxl_ztsnr.optimizers import build_training_optimizer

    dtype = torch.bfloat16 if form == "bf16" else torch.float32
    unet = [torch.nn.Parameter(torch.ones(3, dtype=dtype)), torch.nn.Parameter(torch.ones(2, dtype=dtype))]
    encoder = [torch.nn.Parameter(torch.ones(4))]
    optimizer = build_training_optimizer(
        [{"params": unet, "lr": 1e-3}, {"params": encoder, "lr": 0.25}],
        "adamw",
        1.0,
        weight_decay=0.0,
        fused_backward=form == "fused_backward",
        bf16_update="stochastic" if form == "bf16" else None,
    )
    for p in unet + encoder:
        p.grad = torch.ones_like(p)
    optimizer.step()
    # AdamW's first step moves every weight by its learning rate (sign of the gradient).
    assert torch.allclose(encoder[0].detach(), torch.full((4,), 0.75))
    for p in unet:
        assert torch.allclose(p.detach().float(), torch.full(p.shape, 1 - 1e-3), atol=4e-3)
