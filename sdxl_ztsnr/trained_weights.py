"""What a run trains and exports: the whole UNet or a LoRA on it, and optionally an EMA of those weights.

The trainer sees one small interface whatever the mode:

    weights = TrainedWeights.create(unet, lora=LoraSettings(...) or None, ema=EmaSettings(...) or None)
    optimizer = build_optimizer(weights.parameters, ...)
    unet = accelerator.prepare(unet); weights.register_checkpoint_hooks(accelerator)
    ... after each optimizer update: weights.after_update(global_step)
    with weights.exported(use_ema): save / validate

A LoRA run checkpoints and exports only the adapter (sdxl_ztsnr.lora); an EMA is checkpointed beside the raw
weights (sdxl_ztsnr.ema) and saved as ``unet_ema/`` (full) or ``lora_ema/`` (LoRA).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl_ztsnr import lora as lora_lib
from sdxl_ztsnr.ema import EMA_UNET_SUBFOLDER, EmaDevice, EmaWarmup, EmaWeights
from sdxl_ztsnr.lora_files import continue_lora
from sdxl_ztsnr.lora_variants import LoraType

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """A new adapter (rank given), or one continued from ``weights`` (a LoRA file), whose type, rank, alpha and
    targets are then the file's: those given here (not None) must agree with it."""

    rank: int | None
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: Sequence[str] | None = None  # None: DEFAULT_TARGET_MODULES (new) or the file's
    lora_type: LoraType | None = None  # None: lora (new) or the file's
    weights: str | None = None


@dataclass(frozen=True)
class EmaSettings:
    decay: float = 0.9999
    update_every: int = 1
    device: EmaDevice = "accelerator"
    warmup: EmaWarmup = "power"
    inv_gamma: float = 1.0
    power: float = 2 / 3


def check_lora_base(model_name_or_path: str, allow_epsilon_base: bool, revision: str | None = None) -> None:
    """Refuse a LoRA on an ε-prediction base (or, with ``allow_epsilon_base``, warn plainly and go on)."""
    from diffusers import EulerDiscreteScheduler

    from sdxl_ztsnr.console import UserError, loading_model

    with loading_model(model_name_or_path, "scheduler"):
        config = EulerDiscreteScheduler.load_config(
            model_name_or_path, subfolder="scheduler", revision=revision
        )
    problem = lora_lib.check_lora_base(config)
    if problem is None:
        return
    if not allow_epsilon_base:
        raise UserError(f"--lora_rank / --lora_weights: {problem} (--allow_epsilon_base trains it anyway)")
    logger.warning("--allow_epsilon_base: %s", problem)


@dataclass
class TrainedWeights:
    unet: torch.nn.Module  # the unwrapped UNet (carrying the adapter for LoRA)
    parameters: list[torch.nn.Parameter]  # what the optimizer updates
    lora: LoraSettings | None = None
    ema: EmaWeights | None = None

    @classmethod
    def create(
        cls,
        unet: torch.nn.Module,
        lora: LoraSettings | None = None,
        ema: EmaSettings | None = None,
        frozen_dtype: torch.dtype | None = None,
    ) -> TrainedWeights:
        """Add the LoRA adapter (the frozen base cast to ``frozen_dtype`` first, the adapter fp32) and the EMA.

        ``frozen_dtype`` is the run's autocast dtype (bf16/fp16 mixed precision), None without autocast.
        """
        if lora is not None:
            if frozen_dtype is not None:
                unet.to(dtype=frozen_dtype)  # frozen weights need no fp32 master copy
            if lora.weights is not None:
                targets = list(lora.target_modules) if lora.target_modules else None
                parameters = continue_lora(
                    unet,
                    lora.weights,
                    lora.lora_type,
                    lora.rank,
                    lora.alpha,
                    targets,
                    lora.dropout,
                    under_autocast=frozen_dtype is not None,
                )
                settings = lora_lib.lora_settings(unet)
                logger.info(
                    "--lora_weights: continuing the %s of %s (rank %d, alpha %g, %d modules)",
                    settings["type"], lora.weights, settings["rank"], settings["alpha"],
                    len(lora_lib.lora_modules(unet)),
                )  # fmt: skip
            else:
                parameters = lora_lib.add_lora(
                    unet,
                    lora.rank,
                    lora.alpha,
                    lora.dropout,
                    lora.target_modules or lora_lib.DEFAULT_TARGET_MODULES,
                    under_autocast=frozen_dtype is not None,
                    lora_type=lora.lora_type or "lora",
                )
        else:
            parameters = [p for p in unet.parameters() if p.requires_grad]
        average = None
        if ema is not None:
            average = EmaWeights(
                parameters, ema.decay, ema.update_every, ema.device, ema.warmup, ema.inv_gamma, ema.power
            )
        return cls(unet, parameters, lora, average)

    def register_checkpoint_hooks(self, accelerator) -> None:
        """LoRA: checkpoints hold the adapter only; EMA: its average beside (safetensors, no pickle)."""
        writer = (
            accelerator.is_local_main_process
            if accelerator.project_configuration.save_on_each_node
            else accelerator.is_main_process
        )
        if self.lora is not None:
            save_hook, load_hook = lora_lib.lora_checkpoint_hooks(self.unet, writer)
            accelerator.register_save_state_pre_hook(save_hook)
            accelerator.register_load_state_pre_hook(load_hook)
        if self.ema is not None:
            accelerator.register_save_state_pre_hook(self.ema.save_state_hook(writer))
            accelerator.register_load_state_pre_hook(self.ema.load_state_hook())

    def main_process_unet(self, accelerator, prepared: torch.nn.Module) -> torch.nn.Module | None:
        """The UNet with all of its weights on the main process (None on the others); every process must call.

        DDP and DeepSpeed ZeRO-2 keep whole weights on every process: the trained module itself. Under FSDP each
        process holds a shard: accelerate gathers the full state dict to the main process into a copy of the UNet
        (one more UNet in the main process's memory while validating or exporting).
        """
        from accelerate.utils import DistributedType

        if accelerator.distributed_type != DistributedType.FSDP:
            return self.unet if accelerator.is_main_process else None
        state = accelerator.get_state_dict(prepared)  # a collective: all processes take part
        if not accelerator.is_main_process:
            return None
        full = type(self.unet).from_config(self.unet.config)
        full.load_state_dict(state)
        return full.to(accelerator.device)

    def after_update(self, step: int, final: bool = False) -> None:
        """After optimizer update ``step``: the EMA follows (``final`` folds in steps skipped by update_every)."""
        if self.ema is not None:
            self.ema.update(step, force=final)

    @contextlib.contextmanager
    def exported(self, use_ema: bool) -> Iterator[None]:
        """Within the block the UNet holds the weights to export or validate: the EMA ones when asked."""
        if use_ema and self.ema is None:
            raise ValueError("--export_ema / --validate_ema need --use_ema")
        if not use_ema:
            yield
            return
        with self.ema.swapped_in():
            yield

    def save(self, output_dir: Path, name: str, base_model: str, ztsnr: bool, export_ema: bool) -> list[Path]:
        """LoRA files (diffusers + kohya format), and the EMA beside the raw weights. Returns the files written.

        The full UNet itself is written with the pipeline by the caller; this adds ``unet_ema/`` for it. With
        ``export_ema`` the exported LoRA (or pipeline, by the caller) holds the EMA weights and ``lora_ema/`` /
        ``unet_ema/`` the same, so both names hold what a user would load.
        """
        written: list[Path] = []
        if self.lora is not None:
            with self.exported(export_ema):
                written += lora_lib.save_lora(self.unet, output_dir, name, base_model=base_model, ztsnr=ztsnr)
            if self.ema is not None:
                with self.exported(True):
                    written += lora_lib.save_lora(
                        self.unet, output_dir / lora_lib.EMA_LORA_SUBFOLDER, f"{name}_ema", base_model, ztsnr
                    )
        elif self.ema is not None:
            written.append(self.ema.save(self.unet, output_dir / EMA_UNET_SUBFOLDER))
        return written
