"""Crash-safe training checkpoints around accelerate's save_state / load_state (`checkpoint-<step>` dirs)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from sdxl_ztsnr.export import apply_umask
from sdxl_ztsnr.train_data import DataPosition

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINER_STATE_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^checkpoint-(\d+)\.tmp$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished `checkpoint-<step>` directories, oldest step first (`.tmp` leftovers are not checkpoints)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The finished checkpoint with the highest step, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    """The step in a `checkpoint-<step>` directory name."""
    match = _CHECKPOINT_NAME.match(Path(checkpoint_dir).name)
    if match is None:
        raise ValueError(f"{checkpoint_dir}: not a checkpoint directory name (expected checkpoint-<step>).")
    return int(match.group(1))


def temp_dirs(output_dir: str | Path) -> list[Path]:
    """Unfinished `checkpoint-<step>.tmp` saves (a run killed while saving), oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _TMP_NAME.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def remove_stale_temp_dirs(output_dir: str | Path) -> list[Path]:
    """Delete `checkpoint-<step>.tmp` dirs left by a run killed mid-save; returns what was removed."""
    stale = temp_dirs(output_dir)
    for path in stale:
        shutil.rmtree(path)
    return stale


def checkpoint_run_id(checkpoint_dir: str | Path) -> str | None:
    """The run id in a checkpoint's trainer_state.json (None for an unreadable state or an older checkpoint)."""
    try:
        return json.loads((Path(checkpoint_dir) / TRAINER_STATE_NAME).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """`--resume_from_checkpoint` -> a checkpoint dir: None (fresh run), "latest" (None if there is none), or a path.

    A bare name such as `checkpoint-500` is looked up in `output_dir` when it is not a path that exists.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.exists() and not path.is_absolute():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        available = [p.name for p in checkpoint_dirs(output_dir)] or "none"
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint directory (checkpoints in "
            f"{output_dir}: {available}). Pass 'latest', an existing checkpoint-<step> dir, or omit the flag."
        )
    if _TMP_NAME.match(path.name):
        raise ValueError(
            f"--resume_from_checkpoint {path}: an unfinished save (.tmp) from a killed run; "
            "resume from 'latest' or a finished checkpoint-<step> instead."
        )
    return path


def rotate_checkpoints(
    output_dir: str | Path, total_limit: int | None, run_id: str | None = None
) -> list[Path]:
    """After a save: delete the oldest checkpoints of run ``run_id`` so that at most ``total_limit`` remain.

    Called once the new checkpoint is complete, so a kill or a full disk during a save never leaves fewer
    finished checkpoints than before. With ``run_id`` only that run's checkpoints count and go.
    """
    if total_limit is None:
        return []
    if total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1 (or unset), got {total_limit}.")
    dirs = checkpoint_dirs(output_dir)
    if run_id is not None:
        dirs = [p for p in dirs if checkpoint_run_id(p) == run_id]
    removed = dirs[: max(0, len(dirs) - total_limit)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: flush the directory entry (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _trainer_state(step: int, epoch: int | None, batch_offset: int | None, extra_state: dict | None) -> dict:
    state: dict = {"version": TRAINER_STATE_VERSION, "step": int(step)}
    if epoch is not None:
        state["epoch"] = int(epoch)
    if batch_offset is not None:
        state["batch_offset"] = int(batch_offset)
    clash = set(extra_state or {}) & set(state)
    if clash:
        raise ValueError(
            f"save_checkpoint_atomic: extra_state repeats {sorted(clash)}; pass them as arguments."
        )
    state.update(extra_state or {})
    json.dumps(state)  # fail before anything is written if extra_state is not JSON-serialisable
    return state


def save_checkpoint_atomic(
    accelerator,
    output_dir: str | Path,
    step: int,
    extra_state: dict | None = None,
    *,
    epoch: int | None = None,
    batch_offset: int | None = None,
    total_limit: int | None = None,
) -> Path:
    """accelerator.save_state into `checkpoint-<step>.tmp`, add trainer_state.json, then rename to `checkpoint-<step>`.

    A run killed mid-save leaves only a `.tmp` dir, which resume ignores: `checkpoint-<step>` is always
    complete. All ranks write (RNG states are per rank); one process per filesystem renames, between barriers.
    Then `total_limit` rotates the oldest checkpoints of the same run (``extra_state["run_id"]``), never before
    the new one is complete. trainer_state.json is flat: {"version", "step", "epoch", "batch_offset",
    **extra_state}; `extra_state` must be JSON-serialisable.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "save_checkpoint_atomic: the Accelerator has automatic_checkpoint_naming=True, which ignores the "
            "target directory; create it with ProjectConfiguration(automatic_checkpoint_naming=False)."
        )
    state = _trainer_state(step, epoch, batch_offset, extra_state)
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{CHECKPOINT_PREFIX}{step}{TMP_SUFFIX}"
    # Without a shared filesystem (save_on_each_node) every node holds its own copy and renames it.
    renamer = (
        accelerator.is_local_main_process
        if accelerator.project_configuration.save_on_each_node
        else accelerator.is_main_process
    )
    if renamer:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(output_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if renamer:
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if renamer:
        replaced = None
        if final.exists():  # saving the same step again (e.g. the last step after a resume): swap it out
            replaced = final.with_name(final.name + ".old")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        apply_umask(final)  # safetensors writes 0600 whatever the umask
        if replaced is not None:
            shutil.rmtree(replaced)
        rotate_checkpoints(output_dir, total_limit, state.get("run_id"))
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint_dir: str | Path) -> dict:
    """Read `trainer_state.json` (step, and epoch / batch_offset / extra keys as saved) from a checkpoint."""
    path = Path(checkpoint_dir) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; {checkpoint_dir} was not written by save_checkpoint_atomic (or is incomplete)."
        )
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: has no 'step'; the file is damaged or from another tool.")
    return state


def load_checkpoint(accelerator, checkpoint_dir: str | Path) -> dict:
    """accelerator.load_state (models, optimizers, schedulers, RNG) and return the trainer state saved beside it."""
    state = load_trainer_state(checkpoint_dir)
    accelerator.load_state(str(checkpoint_dir))
    return state


class GeneratorState:
    """A torch.Generator made checkpointable per rank: `accelerator.register_for_checkpointing(GeneratorState(g))`.

    accelerate calls state_dict() on every rank but writes only the main rank's result, so the states of all
    ranks are gathered into it; on load each rank takes its own row. A rank beyond the saved world size (resume
    on more GPUs) keeps its fresh seed.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        state = self.generator.get_state()  # (N,) uint8
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return {"rank_states": torch.stack(states)}
        return {"rank_states": state[None]}

    def load_state_dict(self, state: dict) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        rank_states = state["rank_states"]
        if rank < len(rank_states):
            # A fresh copy: set_state on a row view (nonzero storage offset) crashes torch 2.x.
            self.generator.set_state(rank_states[rank].to(device="cpu", dtype=torch.uint8).clone())


def resume_position(state: dict, global_batch_size: int) -> DataPosition:
    """The data position of a checkpoint; a changed global batch size keeps the epoch's fraction (and says so)."""
    saved = state.get("global_batch_size", global_batch_size)
    offset = state["batch_offset"]
    if saved != global_batch_size:
        offset = offset * saved // global_batch_size
        logger.warning(
            "the global batch changed from %d to %d rows since the checkpoint: continuing epoch %d at batch %d; "
            "the run will not equal an unbroken one",
            saved,
            global_batch_size,
            state["epoch"],
            offset,
        )
    return DataPosition(state["epoch"], offset)
