"""How a training script starts under accelerate: the Accelerator, and torch.compile with an eager fallback.

Shared by the training scripts so that every one of them runs the same way on 1 process, N CPU processes (gloo)
and N GPUs (NCCL).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def make_accelerator(
    output_dir: str | Path,
    logging_dir: str = "logs",
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    report_to: str = "tensorboard",
):
    """An Accelerator for a training run in ``output_dir``; gloo when launched as several CPU processes.

    accelerate sets up gloo only when the FIRST accelerate object of the process asks for the CPU (its shared
    state is fixed by it), hence ``cpu=`` from WORLD_SIZE. The lr schedule advances once per optimizer update
    whatever the process count (``step_scheduler_with_optimizer=False``), so a checkpoint resumes on another
    number of processes with the same learning rate.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=os.path.join(str(output_dir), logging_dir)
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=launched > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=project,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != launched:
        raise SystemExit(
            f"error: launched as {launched} processes but accelerate sees {accelerator.num_processes}; "
            "check the launcher (accelerate launch --num_processes N)"
        )
    return accelerator


def compile_problem(device: torch.device | str) -> str | None:
    """None when torch.compile's default backend works on ``device``; else why not, in a few words.

    A two-op function is compiled and run: a missing C++ compiler (inductor's CPU code) or a broken Triton
    (its CUDA launcher is built with a C compiler) fails here in seconds, not at the first training step.
    """
    try:
        import torch._dynamo

        torch._dynamo.reset()

        def probe(x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2 + 1

        out = torch.compile(probe)(torch.ones(8, device=device))
        if not torch.equal(out.cpu(), torch.full((8,), 3.0)):
            return "a compiled test function gave a wrong result"
    except Exception as error:  # noqa: BLE001 - dynamo/inductor raise many kinds; all mean "not usable"
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line[:200]}"
    return None


def compile_or_eager(module: torch.nn.Module, device: torch.device | str, mode: str = "default"):
    """``torch.compile(module)`` where compiling works and pays; else ONE log line and the module as it is.

    On the CPU it does not pay: inductor's C++ build of a UNet takes many minutes (over ten for the toy UNet on a
    small machine) for a training step that is slow anyway, so --enable_compile runs eager there.
    """
    if torch.device(device).type == "cpu":
        logger.warning("--enable_compile: torch.compile is for GPUs; on the CPU the model runs eager")
        return module
    problem = compile_problem(device)
    if problem is not None:
        logger.warning("--enable_compile: torch.compile does not work here (%s); running eager", problem)
        return module
    return torch.compile(module, mode=mode)


def init_trackers(accelerator, project: str, options: dict, run_name: str | None = None) -> None:
    """Start the trackers on the main process with the run's scalar options as config (wandb: ``run_name``)."""
    if accelerator.is_main_process:
        accelerator.init_trackers(
            project,
            config={k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))},
            init_kwargs={"wandb": {"name": run_name}} if run_name else {},
        )
