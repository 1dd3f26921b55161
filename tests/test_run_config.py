"""--config_file: a TOML (kohya's layout) or a run's training_config.json, keys = flag names, CLI wins."""

import json

import pytest
import torch
from safetensors.torch import load_file

import precompute_latents
import train_sdxl_ztsnr
import train_vae
import upscale
from sdxl_ztsnr import sample as sample_command
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.run_config import saved_options


def _write(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_file_sets_flags_by_any_spelling_sections_are_flattened_and_the_command_line_wins(tmp_path):
    config = _write(
        tmp_path,
        """
        [model_arguments]
        model_path = "base-model"          # the seed's alias of --pretrained_model_name_or_path
        [optimizer_arguments]
        learning_rate = 2e-6
        batch_size = 3                     # alias of --train_batch_size
        use_8bit_adam = true
        [training_arguments]
        train_data_dir = "images"
        validation_prompt = ["solid black", "solid white"]
        lora_target_modules = ["to_q", "to_v"]
        resolution = 768
        """,
    )
    args = train_sdxl_ztsnr.parse_args(["--config_file", config, "--learning_rate", "1e-4"])
    assert args.pretrained_model_name_or_path == "base-model"  # a required flag, given by the file
    assert args.learning_rate == 1e-4  # the command line overrides the file
    assert args.train_batch_size == 3 and args.resolution == 768
    assert args.optimizer == "adamw8bit"  # aliases resolve as on the command line
    assert args.validation_prompt == ["solid black", "solid white"]
    assert args.lora_target_modules == ["to_q", "to_v"]
    assert args.adam_weight_decay == 1e-2  # untouched flags keep their defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat = 1e-5", r"run.toml: learning_rat: unknown option; did you mean 'learning_rate'"),
        ("[optimizer]\nlearnig_rate = 1e-5", r"\[optimizer\] learnig_rate: unknown option; did you mean"),
        ("learning_rate = 'fast'", r"learning_rate = 'fast': expected a float"),
        ("train_batch_size = 2.5", r"train_batch_size = 2.5: expected a int"),
        ("use_ema = 'yes'", r"use_ema = 'yes': expected true or false"),
        ("mixed_precision = 'fp8'", r"mixed_precision = 'fp8': expected one of no, fp16, bf16"),
        ("resolution = [1024, 1024]", r"resolution = \[1024, 1024\]: expected one value, not a list"),
        ("learning_rate = ", r"run.toml: not valid TOML"),
        ("xyzzy = 1", r"xyzzy: unknown option; see"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    config = _write(tmp_path, text)
    with pytest.raises(UserError, match=message) as raised:
        train_sdxl_ztsnr.parse_args(["--config_file", config, "--model_path", "m", "--train_data_dir", "d"])
    assert "\n" not in str(raised.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"--config_file .*nope.toml: no such file"):
        precompute_latents.parse_args(["--config_file", str(tmp_path / "nope.toml")])


def test_every_script_reads_a_config_file(tmp_path):
    """The sampler keeps --config (a diffusers directory for a single file) beside --config_file."""
    config = _write(
        tmp_path, 'steps = 7\nguidance_scale = 3.5\nsampler = "dpmpp_2m"\nmodel = "m.safetensors"'
    )
    args = sample_command.parse_args(
        ["--config_file", config, "--prompt", "x", "--out", "o", "--config", "base"]
    )
    assert (args.steps, args.guidance_scale, args.sampler, args.config) == (7, 3.5, "dpmpp_2m", "base")
    args = upscale.parse_args(["--config_file", config, "--image", "i.png", "--out", "o.png"])
    assert (args.steps, args.model) == (7, "m.safetensors")
    vae = _write(tmp_path, 'data_dir = "imgs"\ncrop_size = 128\nenable_amp = true', "vae.toml")
    args = train_vae.parse_args(["--config_file", vae, "--model_path", "m"])
    assert (args.train_data_dir, args.crop_size, args.mixed_precision) == ("imgs", 128, "bf16")
    pre = _write(tmp_path, 'train_data_dir = "imgs"\noutput_dir = "cache"\nmodel_path = "m"', "pre.toml")
    args = precompute_latents.parse_args(["--config_file", pre])
    assert (args.train_data_dir, args.output_dir) == ("imgs", "cache")


def test_saved_options_are_accepted_back_and_give_the_same_options(tmp_path):
    argv = ["--model_path", "m", "--train_data_dir", "d", "--tag_dropout", "0.1", "--enable_amp"]
    argv += ["--validation_prompt", "a", "--lora_rank", "4", "--hub_token", "secret"]
    args = train_sdxl_ztsnr.parse_args(argv)
    saved = saved_options(args)
    assert "hub_token" not in saved and "text_online_implied" not in saved and "config_file" not in saved
    path = tmp_path / "training_config.json"
    path.write_text(json.dumps(saved, default=str))
    again = train_sdxl_ztsnr.parse_args(["--config_file", str(path)])
    assert saved_options(again) == saved
    assert again.hub_token is None  # never written, never read back


@pytest.mark.slow
def test_a_run_from_its_training_config_json_trains_the_same_weights(
    tiny_sdxl, train_cache, trainer_args, tmp_path, fresh_accelerate_state
):
    from accelerate.state import AcceleratorState

    first = tmp_path / "first"
    train_sdxl_ztsnr.main(
        trainer_args(tiny_sdxl, first, "--precomputed_dir", str(train_cache), "--max_train_steps", "2")
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    second = tmp_path / "second"
    config = str(first / "training_config.json")
    train_sdxl_ztsnr.main(train_sdxl_ztsnr.parse_args(["--config_file", config, "--output_dir", str(second)]))
    a = load_file(str(first / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(second / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "training_config.json").read_text())["output_dir"] == str(second)
