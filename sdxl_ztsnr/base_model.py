"""The SDXL base a training run starts from, and the components it loads from it.

One place that knows where a base's UNet, VAE and pipeline come from (a diffusers directory or Hub id, its
revision and variant, a separate VAE), so the trainer's start, its validation and its exports load the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdxl_ztsnr.console import loading_model


@dataclass(frozen=True)
class BaseModel:
    """A diffusers SDXL pipeline (directory or Hub id) with an optional separate VAE (--pretrained_vae_...)."""

    path: str
    revision: str | None = None
    variant: str | None = None
    vae_path: str | None = None

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

    def load_pipeline(self, unet: torch.nn.Module, vae: torch.nn.Module | None = None, dtype=None):
        """A StableDiffusionXLPipeline of the base around ``unet`` (and ``vae``, default the base's)."""
        from diffusers import StableDiffusionXLPipeline

        with loading_model(self.path):
            return StableDiffusionXLPipeline.from_pretrained(
                self.path,
                unet=unet,
                vae=vae if vae is not None else self.load_vae(),
                revision=self.revision,
                variant=self.variant,
                **({"torch_dtype": dtype} if dtype is not None else {}),
            )
