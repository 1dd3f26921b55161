"""A training run's lifecycle in its output directory: start, resume, requeue, finish — with no silent surprises.

Every script that trains (train_sdxl_ztsnr.py, train_vae.py) follows the same rules:

- a fresh start (no ``--resume_from_checkpoint``) in a directory that holds another run's checkpoints is refused,
  naming ``--resume_from_checkpoint latest`` and ``--overwrite_output_dir``; with the latter they are deleted;
- ``--resume_from_checkpoint latest`` resumes the newest finished checkpoint; when only unfinished saves
  (``checkpoint-N.tmp``) exist it warns loudly and starts from step 0;
- a run whose checkpoint already reached ``max_train_steps`` is finished: rerunning it (a requeue) trains nothing
  and overwrites nothing, and writes the outputs only if they are missing;
- each run has an id, stored in its checkpoints (trainer_state.json) and in ``outputs.json`` (written last by the
  save path, so its presence with the final step means the outputs are complete).

The plan is made on the main process (which may delete files) and shared with the others, so every rank of a
multi-process run acts on the same decision.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sdxl_ztsnr import checkpointing
from sdxl_ztsnr.console import UserError

logger = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.json"


class RunDirectoryError(UserError):
    """The output directory does not fit the requested start (another run's checkpoints, a bad resume path)."""


@dataclass(frozen=True)
class RunPlan:
    """What this invocation does: start fresh, resume a checkpoint, or only finish an already finished run."""

    run_id: str
    resume: str | None = None  # checkpoint directory to load, or None for a fresh start
    resume_step: int = 0
    outputs_complete: bool = False  # outputs.json says this run's outputs of resume_step were written

    def finished_at(self, max_train_steps: int) -> bool:
        """The resumed checkpoint already reached ``max_train_steps``: a requeue of a finished run."""
        return self.resume is not None and self.resume_step >= max_train_steps


def _leftovers(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """(finished checkpoints, unfinished `.tmp` saves) in ``output_dir``."""
    finished = checkpointing.checkpoint_dirs(output_dir)
    tmp = checkpointing.temp_dirs(output_dir)
    return finished, tmp


def read_outputs_marker(output_dir: str | Path) -> dict | None:
    """The content of ``outputs.json`` ({"run_id", "step"}), or None when absent or unreadable."""
    path = Path(output_dir) / OUTPUTS_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def mark_outputs_complete(output_dir: str | Path, run_id: str, step: int) -> None:
    """Write ``outputs.json`` last, atomically: the outputs of ``step`` of run ``run_id`` are all on disk."""
    path = Path(output_dir) / OUTPUTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "step": int(step)}, indent=2) + "\n")
    os.replace(tmp, path)


def clear_output_dir(output_dir: Path, keep: tuple[str, ...] = ("cache",)) -> list[Path]:
    """--overwrite_output_dir: delete the previous run's checkpoints and outputs.json; ``keep`` entries stay.

    Only what a run's lifecycle depends on goes (checkpoints, unfinished saves, the outputs marker); the
    exported model files are replaced by the new run's save anyway, and a precomputed cache is reused.
    """
    finished, tmp = _leftovers(output_dir)
    removed = []
    for path in [*finished, *tmp]:
        if path.name not in keep:
            shutil.rmtree(path)
            removed.append(path)
    marker = output_dir / OUTPUTS_FILE
    if marker.exists():
        marker.unlink()
        removed.append(marker)
    return removed


def plan_run(
    output_dir: str | Path, resume_from_checkpoint: str | None, overwrite_output_dir: bool = False
) -> RunPlan:
    """Decide how this invocation starts (main process only: it may delete files with --overwrite_output_dir)."""
    output_dir = Path(output_dir)
    finished, tmp = _leftovers(output_dir)
    if resume_from_checkpoint is None:
        if finished or tmp:
            if not overwrite_output_dir:
                names = ", ".join(p.name for p in [*finished, *tmp][-3:])
                raise RunDirectoryError(
                    f"{output_dir} already holds checkpoints of a run ({names}): pass "
                    "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to delete them "
                    "and start a new run (or choose another --output_dir)"
                )
            removed = clear_output_dir(output_dir)
            logger.warning("--overwrite_output_dir: removed %d entries of the previous run", len(removed))
        return RunPlan(run_id=uuid.uuid4().hex[:12])

    try:
        resume = checkpointing.resolve_resume(output_dir, resume_from_checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise RunDirectoryError(str(error)) from error
    if resume is None:  # "latest" with no finished checkpoint
        if tmp:
            logger.warning(
                "!!! --resume_from_checkpoint latest: %s holds only UNFINISHED checkpoint saves (%s), left by a "
                "run killed while saving; none can be resumed. STARTING FROM STEP 0. !!!",
                output_dir,
                ", ".join(p.name for p in tmp),
            )
        return RunPlan(run_id=uuid.uuid4().hex[:12])
    try:
        state = checkpointing.load_trainer_state(resume)
    except (FileNotFoundError, ValueError) as error:
        raise RunDirectoryError(str(error)) from error
    step = int(state["step"])
    run_id = state.get("run_id") or uuid.uuid4().hex[:12]
    marker = read_outputs_marker(output_dir) or {}
    outputs_complete = marker.get("run_id") == run_id and marker.get("step") == step
    return RunPlan(run_id, str(resume), step, outputs_complete)


def plan_run_on_all_ranks(accelerator, *args, **kwargs) -> RunPlan:
    """``plan_run`` on the main process, shared with every rank (errors are raised on every rank alike)."""
    from accelerate.utils import broadcast_object_list

    payload: list = [None]
    if accelerator.is_main_process:
        try:
            payload[0] = ("plan", asdict(plan_run(*args, **kwargs)))
        except RunDirectoryError as error:
            payload[0] = ("error", str(error))
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    kind, value = payload[0]
    if kind == "error":
        raise RunDirectoryError(value)
    return RunPlan(**value)
