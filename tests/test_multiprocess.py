"""Two processes through `accelerate launch` (gloo on the CPU): the same weights as one process with the whole
global batch, precompute done by both ranks inside the run, and checkpoints that resume across process counts.

Why atol 1e-5 needs `--adam_epsilon 1e-6` here: summing a batch in two halves instead of at once changes the
last bits of the gradient, and AdamW's update ≈ lr·sign(g) for |g| ≲ ε flips with them on gradients that are zero
up to rounding. Splitting the batch inside ONE process (no processes at all) moves the tiny UNet by up to 1.5e-4 at
lr 1e-3, ε 1e-8 after 4 steps, and by 4e-6 at ε 1e-6 — float rounding, not the data path. The logged losses, which
see the data and every random draw, must agree to float precision.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_sdxl_ztsnr

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU launch; on GPUs the same path runs with NCCL"),
]
COMMON = [
    "--max_train_steps",
    "4",
    "--checkpointing_steps",
    "2",
    "--adam_epsilon",
    "1e-6",
    "--no_single_file",
]


def launch_two_processes(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", str(REPO / "train_sdxl_ztsnr.py"), *argv,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def run_one_process(args) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train_sdxl_ztsnr.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def logged_losses(output_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(output_dir / "logs" / "sdxl_ztsnr"))  # the run's scalars (not hparams)
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars("loss")}


def assert_same_unet(a: Path, b: Path, atol: float = 1e-5) -> None:
    weights_a = load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))
    weights_b = load_file(str(b / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    worst = max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a)
    assert worst <= atol, f"UNets differ by {worst:.3g}"


@pytest.fixture(scope="module")
def two_process_run(tiny_sdxl, demo_data, tmp_path_factory):
    """2 processes × batch 2 from a RAW folder: both ranks precompute OUTPUT_DIR/cache, then train 4 steps."""
    out = tmp_path_factory.mktemp("two-process") / "out"
    done = launch_two_processes(
        "--model_path", str(tiny_sdxl), "--data_dir", str(demo_data), "--output_dir", str(out),
        "--resolution", "128", "--bucket_step", "32", "--precompute_shard_size", "8",
        "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--validation_steps", "0", "--dataloader_num_workers", "0", "--seed", "7",
        *COMMON, cwd=out.parent,
    )  # fmt: skip
    return out, done


@pytest.fixture(scope="module")
def one_process_run(tiny_sdxl, two_process_run, tmp_path_factory, trainer_args):
    """1 process × batch 4 on the cache the two-process run built."""
    out = tmp_path_factory.mktemp("one-process")
    args = trainer_args(
        tiny_sdxl,
        out,
        "--precomputed_dir",
        str(two_process_run[0] / "cache"),
        "--train_batch_size",
        "4",
        *COMMON,
    )
    run_one_process(args)
    return out


def test_two_processes_precompute_together_and_train_like_one_with_the_whole_batch(
    two_process_run, one_process_run
):
    out, done = two_process_run
    # both ranks encoded a share of the images inside the training run: shards of 8 of the 24 demo images,
    # dealt round-robin (rank 0: shards 0 and 2, rank 1: shard 1)
    encoded = re.findall(r"this process: (\d+) inputs", done.stdout)
    assert sorted(int(n) for n in encoded) == [8, 16]
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    assert "launched as 2 processes but accelerate sees 1" not in done.stderr
    two, one = logged_losses(out), logged_losses(one_process_run)
    assert sorted(two) == [1, 2, 3, 4]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert_same_unet(out, one_process_run)


def test_checkpoints_resume_across_process_counts(
    tiny_sdxl, two_process_run, one_process_run, tmp_path, trainer_args
):
    cache = two_process_run[0] / "cache"
    # 2 processes → 1: the two-process run's checkpoint-2 finished by one process with the whole batch
    one_from_two = tmp_path / "one-from-two"
    shutil.copytree(two_process_run[0] / "checkpoint-2", one_from_two / "checkpoint-2")
    args = trainer_args(
        tiny_sdxl, one_from_two, "--precomputed_dir", str(cache), "--train_batch_size", "4",
        "--resume_from_checkpoint", "latest", *COMMON,
    )  # fmt: skip
    assert run_one_process(args)["step"] == 4
    assert_same_unet(one_from_two, two_process_run[0])

    # 1 process → 2: the one-process run's checkpoint-2 finished by two processes (with --precomputed_dir)
    two_from_one = tmp_path / "two-from-one"
    shutil.copytree(one_process_run / "checkpoint-2", two_from_one / "checkpoint-2")
    launch_two_processes(
        "--model_path", str(tiny_sdxl), "--precomputed_dir", str(cache), "--output_dir", str(two_from_one),
        "--train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--validation_steps", "0",
        "--dataloader_num_workers", "0", "--seed", "7", "--resume_from_checkpoint", "latest", *COMMON,
        cwd=tmp_path,
    )  # fmt: skip
    assert_same_unet(two_from_one, one_process_run)


def assert_same_text_encoders(a: Path, b: Path, atol: float = 1e-5) -> None:
    for name in ("text_encoder", "text_encoder_2"):
        weights_a = load_file(str(a / name / "model.safetensors"))
        weights_b = load_file(str(b / name / "model.safetensors"))
        assert weights_a.keys() == weights_b.keys()
        worst = max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a)
        assert worst <= atol, f"{name}s differ by {worst:.3g}"


def test_text_encoders_train_in_two_processes_as_in_one_and_resume_across(
    tiny_sdxl, train_cache, tmp_path, trainer_args
):
    """--train_text_encoder: DDP over the UNet and both encoders (captions encoded inside the step on each rank)
    trains what one process with the whole batch trains; its checkpoint resumes in one process."""
    text = ["--train_text_encoder", "--text_encoder_2_lr", "5e-4"]
    two = tmp_path / "two"
    launch_two_processes(
        "--model_path", str(tiny_sdxl), "--precomputed_dir", str(train_cache), "--output_dir", str(two),
        "--train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--validation_steps", "0",
        "--dataloader_num_workers", "0", "--seed", "7", *COMMON, *text, cwd=tmp_path,
    )  # fmt: skip
    one = tmp_path / "one"
    args = trainer_args(
        tiny_sdxl, one, "--precomputed_dir", str(train_cache), "--train_batch_size", "4", *COMMON, *text
    )
    run_one_process(args)
    losses_two, losses_one = logged_losses(two), logged_losses(one)
    assert sorted(losses_two) == [1, 2, 3, 4]
    for step in losses_two:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5), step
    assert_same_unet(two, one)
    assert_same_text_encoders(two, one)

    # 2 processes -> 1: the two-process checkpoint-2 (UNet, both encoders, optimizer) finished by one process.
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    args = trainer_args(
        tiny_sdxl, resumed, "--precomputed_dir", str(train_cache), "--train_batch_size", "4",
        "--resume_from_checkpoint", "latest", *COMMON, *text,
    )  # fmt: skip
    assert run_one_process(args)["step"] == 4
    assert_same_unet(resumed, two)
    assert_same_text_encoders(resumed, two)
