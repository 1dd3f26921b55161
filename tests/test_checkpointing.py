"""Checkpoints: atomic save, rotation, resume of weights and optimizer, stale .tmp leftovers ignored."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from sdxl_ztsnr.checkpointing import (
    GeneratorState,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint_atomic,
)


def _setup(output_dir, seed=0):
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(output_dir)))
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_step(model, optimizer):
    loss = model(torch.ones(2, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_rotate_and_resume_latest(tmp_path):
    accelerator, model, optimizer = _setup(tmp_path)
    for step in (1, 2, 3):
        _train_step(model, optimizer)
        saved = save_checkpoint_atomic(
            accelerator, tmp_path, step, {"ema_decay": 0.999}, epoch=0, batch_offset=step * 2, total_limit=2
        )
        assert saved == tmp_path / f"checkpoint-{step}"
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob("*.tmp"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()

    # A fresh process: different init, then resume from "latest".
    accelerator2, model2, optimizer2 = _setup(tmp_path, seed=1)
    assert not torch.equal(model2.weight, weights["weight"])
    path = resolve_resume(tmp_path, "latest")
    state = load_checkpoint(accelerator2, path)
    assert (
        state["step"] == 3
        and state["epoch"] == 0
        and state["batch_offset"] == 6
        and state["ema_decay"] == 0.999
    )
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert optimizer2.state_dict()["state"][0]["step"] == 3


def test_stale_tmp_is_ignored_and_cleaned(tmp_path):
    accelerator, model, optimizer = _setup(tmp_path)
    save_checkpoint_atomic(accelerator, tmp_path, 5, {})
    # A run killed mid-save at step 10 left a half-written directory behind.
    stale = tmp_path / "checkpoint-10.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-5"
    with pytest.raises(ValueError, match="unfinished"):
        resolve_resume(tmp_path, str(stale))
    save_checkpoint_atomic(accelerator, tmp_path, 6, {})
    assert not stale.exists()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-5", "checkpoint-6"]


def test_resave_same_step_replaces_checkpoint(tmp_path):
    accelerator, model, optimizer = _setup(tmp_path)
    save_checkpoint_atomic(accelerator, tmp_path, 7, {"pass": 1})
    save_checkpoint_atomic(accelerator, tmp_path, 7, {"pass": 2})
    assert load_trainer_state(tmp_path / "checkpoint-7")["pass"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-7"]


def test_resolve_resume_paths_and_errors(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing saved yet: fresh run
    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-100").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-9", "checkpoint-20", "checkpoint-100"]
    assert resolve_resume(tmp_path, "checkpoint-20") == tmp_path / "checkpoint-20"
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-9")) == tmp_path / "checkpoint-9"
    with pytest.raises(FileNotFoundError, match="checkpoint-30.*checkpoint-100"):
        resolve_resume(tmp_path, "checkpoint-30")
    assert [p.name for p in rotate_checkpoints(tmp_path, 1)] == ["checkpoint-9", "checkpoint-20"]
    with pytest.raises(ValueError, match="checkpoints_total_limit"):
        rotate_checkpoints(tmp_path, 0)


def test_trainer_state_file_is_checked(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_trainer_state(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"epoch": 1}))
    with pytest.raises(ValueError, match="'step'"):
        load_trainer_state(tmp_path / "checkpoint-1")


def test_extra_state_is_checked_before_writing(tmp_path):
    accelerator, model, optimizer = _setup(tmp_path)
    with pytest.raises(ValueError, match="repeats"):
        save_checkpoint_atomic(accelerator, tmp_path, 1, {"step": 5})
    with pytest.raises(TypeError):
        save_checkpoint_atomic(accelerator, tmp_path, 1, {"tensor": torch.zeros(1)})
    assert not list(tmp_path.glob("checkpoint-*"))


def test_generator_state_resumes_the_random_stream(tmp_path):
    accelerator, model, optimizer = _setup(tmp_path)
    generator = torch.Generator().manual_seed(3)
    accelerator.register_for_checkpointing(GeneratorState(generator))
    torch.rand(5, generator=generator)
    save_checkpoint_atomic(accelerator, tmp_path, 1, {"epoch": 0, "batch_in_epoch": 4})
    expected = torch.rand(5, generator=generator)

    accelerator2, _, _ = _setup(tmp_path, seed=1)
    generator2 = torch.Generator().manual_seed(99)
    accelerator2.register_for_checkpointing(GeneratorState(generator2))
    state = load_checkpoint(accelerator2, resolve_resume(tmp_path, "latest"))
    assert state["batch_in_epoch"] == 4
    assert torch.equal(torch.rand(5, generator=generator2), expected)


def _two_rank_worker(output_dir):
    """Runs in each of 2 forked CPU processes (gloo): every rank saves, one renames; each rank gets its RNG back."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the fork inherits the parent's single-process state
    torch.set_num_threads(1)
    accelerator, model, optimizer = _setup(output_dir)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)
    accelerator.register_for_checkpointing(GeneratorState(generator))
    for step in (1, 2, 3):
        _train_step(model, optimizer)
        save_checkpoint_atomic(accelerator, output_dir, step, {"epoch": 0}, total_limit=2)
    expected = torch.rand(3, generator=generator)
    generator.manual_seed(7)
    state = load_checkpoint(accelerator, resolve_resume(output_dir, "latest"))
    accelerator.wait_for_everyone()
    assert state["step"] == 3
    assert torch.equal(torch.rand(3, generator=generator), expected), accelerator.process_index
    assert [p.name for p in checkpoint_dirs(output_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (output_dir / "checkpoint-3").iterdir()
    }


def test_two_processes_save_and_resume_their_own_random_streams(tmp_path):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        debug_launcher(_two_rank_worker, args=(tmp_path,), num_processes=2)
    finally:
        AcceleratorState._reset_state(True)
    assert not list(tmp_path.glob("*.tmp"))
