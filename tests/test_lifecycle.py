"""A run's lifecycle in its output directory: fresh start, requeue, resume of leftovers, rotation, finish."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from sdxl_ztsnr import lifecycle
from sdxl_ztsnr.checkpointing import checkpoint_dirs, save_checkpoint_atomic


def fake_checkpoint(output_dir, step, run_id="old-run"):
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"version": 1, "step": step, "run_id": run_id}))
    return path


def test_fresh_start_over_another_runs_checkpoints_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 100)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache_metadata.json").write_text("{}")
    with pytest.raises(lifecycle.RunDirectoryError) as error:
        lifecycle.plan_run(tmp_path, None)
    assert "--resume_from_checkpoint latest" in str(error.value)
    assert "--overwrite_output_dir" in str(error.value)
    assert (tmp_path / "checkpoint-100").is_dir(), "a refusal must not delete anything"

    lifecycle.mark_outputs_complete(tmp_path, "old-run", 100)
    plan = lifecycle.plan_run(tmp_path, None, overwrite_output_dir=True)
    assert plan.resume is None and plan.run_id != "old-run"
    assert checkpoint_dirs(tmp_path) == []
    assert not (tmp_path / lifecycle.OUTPUTS_FILE).exists()
    assert (tmp_path / "cache" / "cache_metadata.json").is_file(), "the precomputed cache is kept"


def test_unfinished_saves_alone_also_block_a_fresh_start(tmp_path):
    (tmp_path / "checkpoint-3.tmp").mkdir()
    with pytest.raises(lifecycle.RunDirectoryError, match="checkpoint-3.tmp"):
        lifecycle.plan_run(tmp_path, None)


def test_latest_with_only_unfinished_saves_warns_loudly(tmp_path, caplog):
    (tmp_path / "checkpoint-5.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="sdxl_ztsnr.lifecycle"):
        plan = lifecycle.plan_run(tmp_path, "latest")
    assert plan.resume is None and plan.resume_step == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "UNFINISHED" in warnings[0].getMessage() and "STEP 0" in warnings[0].getMessage()


def test_latest_in_an_empty_directory_is_a_quiet_fresh_start(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        plan = lifecycle.plan_run(tmp_path, "latest")
    assert plan.resume is None and not caplog.records


def test_finished_run_and_its_outputs_marker(tmp_path):
    fake_checkpoint(tmp_path, 2, run_id="abc")
    fake_checkpoint(tmp_path, 4, run_id="abc")
    plan = lifecycle.plan_run(tmp_path, "latest")
    assert (plan.run_id, plan.resume_step) == ("abc", 4)
    assert plan.resume.endswith("checkpoint-4")
    assert plan.finished_at(4) and plan.finished_at(3)
    assert not plan.finished_at(6), "a requeue with a larger --max_train_steps continues the run"
    assert not plan.outputs_complete
    lifecycle.mark_outputs_complete(tmp_path, "abc", 4)
    assert lifecycle.plan_run(tmp_path, "latest").outputs_complete
    lifecycle.mark_outputs_complete(tmp_path, "abc", 2)  # outputs of an earlier step: not these
    assert not lifecycle.plan_run(tmp_path, "latest").outputs_complete
    lifecycle.mark_outputs_complete(tmp_path, "another", 4)
    assert not lifecycle.plan_run(tmp_path, "latest").outputs_complete


def test_bad_resume_path_is_a_run_directory_error(tmp_path):
    fake_checkpoint(tmp_path, 2)
    with pytest.raises(lifecycle.RunDirectoryError, match="checkpoint-2"):
        lifecycle.plan_run(tmp_path, "checkpoint-7")
    (tmp_path / "checkpoint-9").mkdir()  # no trainer_state.json
    with pytest.raises(lifecycle.RunDirectoryError, match="trainer_state.json"):
        lifecycle.plan_run(tmp_path, "checkpoint-9")


def _accelerator_and_model(output_dir):
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(output_dir)))
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return accelerator, *accelerator.prepare(model, optimizer)


def test_limit_one_keeps_the_old_checkpoint_until_the_new_one_is_complete(tmp_path, monkeypatch):
    accelerator, model, optimizer = _accelerator_and_model(tmp_path)
    save_checkpoint_atomic(accelerator, tmp_path, 1, {"run_id": "r"}, total_limit=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint_atomic(accelerator, tmp_path, 2, {"run_id": "r"}, total_limit=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    assert lifecycle.plan_run(tmp_path, "latest").resume_step == 1
    monkeypatch.undo()
    save_checkpoint_atomic(accelerator, tmp_path, 2, {"run_id": "r"}, total_limit=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2"]


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, run_id="other")
    accelerator, model, optimizer = _accelerator_and_model(tmp_path)
    for step in (10, 11, 12):
        save_checkpoint_atomic(accelerator, tmp_path, step, {"run_id": "mine"}, total_limit=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-11",
        "checkpoint-12",
    ]
