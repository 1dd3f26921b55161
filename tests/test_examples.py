"""The example accelerate configs load with accelerate's own config loader and launch validation."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples" / "accelerate").glob("*.yaml"))


def test_there_is_a_config_for_each_setup():
    assert {p.name for p in CONFIGS} >= {
        "ddp_1node_8gpu.yaml",
        "fsdp_1node_8gpu.yaml",
        "deepspeed_zero2_2nodes_8gpu.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates_as_accelerate_launch_reads_it(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(path))
    expected = {
        "ddp_1node_8gpu.yaml": ("MULTI_GPU", 8, 1),
        "fsdp_1node_8gpu.yaml": ("FSDP", 8, 1),
        "deepspeed_zero2_2nodes_8gpu.yaml": ("DEEPSPEED", 16, 2),
    }[path.name]
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == expected
    assert config.mixed_precision == "bf16"

    monkeypatch.chdir(REPO)  # the DeepSpeed config names its JSON relative to the repository
    args = launch_command_parser().parse_args(["--config_file", str(path), "train_sdxl_ztsnr.py"])
    _validate_launch_command(args)
    assert args.num_processes == expected[1] and args.num_machines == expected[2]
    if path.name.startswith("fsdp"):
        from accelerate.utils import prepare_multi_gpu_env

        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_USE_FSDP"] == "true"
        assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "BasicTransformerBlock,ResnetBlock2D"
    if path.name.startswith("deepspeed"):
        ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == 2
        # "auto" values are filled by accelerate from the trainer's own flags
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
        assert config.main_process_ip and config.main_process_port


def test_fsdp_wrap_classes_exist_in_the_unet():
    import diffusers.models.attention as attention
    import diffusers.models.resnet as resnet

    assert hasattr(attention, "BasicTransformerBlock") and hasattr(resnet, "ResnetBlock2D")
