"""The trainer with --lora_type and --lora_weights on the tiny model: a continued run starts from the file, the
variants train, export both layouts and resume exactly."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_files import _inputs, _perturb, _tiny_unet
from test_train_adapters import run

import train_sdxl_ztsnr
from sdxl_ztsnr.lora import add_lora, save_lora
from sdxl_ztsnr.lora_files import load_lora_file


def _source_lora(tiny_sdxl, out, lora_type: str, targets=("to_q", "to_v", "to_out.0", "conv1", "proj_in")):
    """A LoRA file made outside the run (another session, another trainer): random, non-zero adapter."""
    torch.manual_seed(3)
    unet = _tiny_unet(tiny_sdxl)
    add_lora(unet, rank=4, alpha=2, target_modules=targets, lora_type=lora_type)
    _perturb(unet, seed=4)
    unet.eval()
    return unet, save_lora(unet, out, "source")


def _output(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(**_inputs(11)).sample


@pytest.mark.slow
def test_a_run_with_lora_weights_starts_from_the_file(tiny_sdxl, train_cache, trainer_args, tmp_path):
    """Learning rate 0: the run's adapter is the file's, so what it saves computes what the file's adapter does."""
    source, (source_diffusers, source_kohya) = _source_lora(tiny_sdxl, tmp_path / "source", "dora")
    args = trainer_args(
        tiny_sdxl, tmp_path / "out", "--precomputed_dir", str(train_cache), "--max_train_steps", "1",
        "--learning_rate", "0", "--network_weights", str(source_kohya),
    )  # fmt: skip
    assert args.lora_weights == str(source_kohya)
    run(args)
    out = tmp_path / "out"
    saved, original = (
        load_file(str(out / "pytorch_lora_weights.safetensors")),
        load_file(str(source_diffusers)),
    )
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    continued = _tiny_unet(tiny_sdxl)
    load_lora_file(continued, out / f"{out.name}.safetensors")
    torch.testing.assert_close(_output(continued), _output(source), atol=1e-5, rtol=0)
    with safe_open(str(out / f"{out.name}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (
        meta["ss_network_module"] == "lycoris.kohya"
        and json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    )
    config = json.loads((out / "training_config.json").read_text())
    assert config["lora_weights"] == str(source_kohya)


@pytest.mark.slow
def test_a_continued_lokr_trains_and_resumes_exactly(tiny_sdxl, train_cache, trainer_args, tmp_path):
    source, (_, source_kohya) = _source_lora(tiny_sdxl, tmp_path / "source", "lokr")
    common = (
        "--precomputed_dir", str(train_cache), "--max_train_steps", "4", "--learning_rate", "1e-2",
        "--lora_weights", str(source_kohya), "--lora_rank", "4", "--no_single_file",
    )  # fmt: skip
    run(trainer_args(tiny_sdxl, tmp_path / "a", *common))
    trained = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith(".lokr_w2") for k in trained)
    continued = _tiny_unet(tiny_sdxl)
    load_lora_file(continued, tmp_path / "a" / "pytorch_lora_weights.safetensors")
    assert (_output(continued) - _output(source)).abs().max() > 1e-4  # it trained on from the file
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run(trainer_args(tiny_sdxl, tmp_path / "b", *common, "--resume_from_checkpoint", "latest"))
    resumed = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == trained.keys() and all(torch.equal(resumed[k], trained[k]) for k in trained)


@pytest.mark.slow
def test_a_new_loha_run_writes_lycoris_keys(tiny_sdxl, train_cache, trainer_args, tmp_path):
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", str(train_cache), "--max_train_steps", "2", "--lora_rank", "4",
        "--lora_type", "loha", "--lora_target_modules", "to_q", "conv1", "--learning_rate", "1e-2",
    )  # fmt: skip
    run(args)
    kohya = load_file(str(tmp_path / f"{tmp_path.name}.safetensors"))
    assert {k.split(".", 1)[1] for k in kohya} == {
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "alpha",
    }
    assert any("_resnets_" in k or "input_blocks_1_0" in k for k in kohya)  # the conv target is in
    base, trained = _tiny_unet(tiny_sdxl), _tiny_unet(tiny_sdxl)
    load_lora_file(trained, tmp_path / f"{tmp_path.name}.safetensors")
    assert (_output(trained) - _output(base)).abs().max() > 1e-4


def test_lora_type_needs_a_rank_or_a_file():
    with pytest.raises(SystemExit):
        train_sdxl_ztsnr.parse_args(["--model_path", "m", "--data_dir", "d", "--lora_type", "dora"])
    args = train_sdxl_ztsnr.parse_args(
        ["--model_path", "m", "--data_dir", "d", "--network_weights", "x.safetensors"]
    )
    assert args.lora_weights == "x.safetensors" and args.lora_type is None
