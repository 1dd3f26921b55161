"""The SDXL base a training run starts from, and the components it loads from it.

One place that knows where a base's UNet, VAE and pipeline come from (a diffusers directory or Hub id, its
revision and variant, a separate VAE, or a single .safetensors file in the original SDXL layout), so the
trainer's start, its validation and its exports load the same thing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl_ztsnr.base_schedule import BaseSchedule
from sdxl_ztsnr.console import UserError, loading_model


@dataclass(frozen=True)
class BaseModel:
    """A diffusers SDXL pipeline (directory or Hub id) with an optional separate VAE (--pretrained_vae_...)."""

    path: str  # what from_pretrained reads: a diffusers directory or Hub id
    revision: str | None = None
    variant: str | None = None
    vae_path: str | None = None
    name: str | None = None  # what the user passed (a single file's path), for cards and logs; default: path
    file_schedule: BaseSchedule | None = None  # a single file's, read from its markers and metadata

    @property
    def label(self) -> str:
        return self.name or self.path

    def schedule(self) -> BaseSchedule:
        """What the base predicts and on which schedule: a single file's markers and metadata, else the
        scheduler config (diffusers' default: ε)."""
        from diffusers import EulerDiscreteScheduler

        if self.file_schedule is not None:
            return self.file_schedule
        with loading_model(self.path, "scheduler"):
            config = EulerDiscreteScheduler.load_config(self.path, subfolder="scheduler", revision=self.revision)
        prediction = config.get("prediction_type", "epsilon")
        ztsnr = prediction == "v_prediction" and bool(config.get("rescale_betas_zero_snr", False))
        return BaseSchedule(prediction, ztsnr, f"{self.label}'s scheduler config")

    def load_unet(self):
        """The base's UNet2DConditionModel, as stored (fp32 unless the variant says otherwise)."""
        from diffusers import UNet2DConditionModel

        with loading_model(self.path, "unet"):
            return UNet2DConditionModel.from_pretrained(
                self.path, subfolder="unet", revision=self.revision, variant=self.variant
            )

    def load_trainable_unet(
        self, bf16_weights: bool = False, gradient_checkpointing: bool = False, channels_last: bool = False
    ):
        """The UNet in train mode, as the trainer steps it: bf16 weights (updated through --bf16_update),
        activations recomputed in backward, NHWC memory (what cuDNN's tensor-core convolutions read)."""
        unet = self.load_unet()
        unet.train()
        if bf16_weights:
            unet.to(torch.bfloat16)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        return unet

    def load_vae(self):
        """The VAE that made the latents: the separate one when given, else the pipeline's."""
        from diffusers import AutoencoderKL

        if self.vae_path:
            with loading_model(self.vae_path, "vae"):
                return AutoencoderKL.from_pretrained(self.vae_path)
        with loading_model(self.path, "vae"):
            return AutoencoderKL.from_pretrained(
                self.path, subfolder="vae", revision=self.revision, variant=self.variant
            )

    def load_pipeline(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module | None = None,
        dtype=None,
        components: Mapping[str, torch.nn.Module] | None = None,
    ):
        """A StableDiffusionXLPipeline of the base around ``unet`` (and ``vae``, default the base's); ``components``
        replace the base's by name (trained text encoders: ``text_encoder``, ``text_encoder_2``)."""
        from diffusers import StableDiffusionXLPipeline

        with loading_model(self.path):
            return StableDiffusionXLPipeline.from_pretrained(
                self.path,
                unet=unet,
                vae=vae if vae is not None else self.load_vae(),
                revision=self.revision,
                variant=self.variant,
                **({"torch_dtype": dtype} if dtype is not None else {}),
                **(components or {}),
            )


def resolve_base(
    name_or_path: str,
    config_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    variant: str | None = None,
    vae_path: str | None = None,
    first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> BaseModel:
    """A base from a diffusers directory, a Hub id, or a single .safetensors file; the file is converted once
    (with the project's own key mapping, bit-exact) into a cached diffusers directory, inside ``first()``
    (accelerate's ``local_main_process_first``: one process per machine writes it, the others then read it)."""
    if not Path(name_or_path).is_file():
        return BaseModel(name_or_path, revision, variant, vae_path)
    from sdxl_ztsnr.single_file import file_schedule, materialize_as_diffusers_dir

    if variant:
        raise UserError(f"--variant {variant}: a single-file base ({name_or_path}) has no weight variants")
    with first():
        directory = materialize_as_diffusers_dir(name_or_path, config_dir)
    schedule = file_schedule(name_or_path)
    return BaseModel(str(directory), None, None, vae_path, name=str(name_or_path), file_schedule=schedule)


def conversion_note(schedule: BaseSchedule, ztsnr: bool = True) -> str:
    """The log line on what training does with the base's schedule (it always trains v-prediction)."""
    target = "v-pred ZTSNR" if ztsnr else "v-pred (SDXL's schedule, --no_ztsnr)"
    if schedule.label == ("v-pred ZTSNR" if ztsnr else "v-pred"):
        return f"{schedule.label} base ({schedule.source}): training on as such"
    return f"{schedule.label} base ({schedule.source}): converting it to {target}"
