"""Validation: images sampled with the ZTSNR settings, and a loss at fixed timesteps and fixed noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdxl_ztsnr.sampling import generate
from sdxl_ztsnr.schedule import alphas_cumprod
from sdxl_ztsnr.schedule import make_scheduler as make_training_scheduler
from sdxl_ztsnr.training import training_loss

# Spread over the whole ladder, the pure-noise step included: the step ZTSNR exists to train.
VALIDATION_TIMESTEPS: tuple[int, ...] = (99, 299, 499, 699, 899, 999)


@torch.no_grad()
def fixed_validation_loss(
    unet: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    alpha_bar: torch.Tensor,
    timesteps: Sequence[int] = VALIDATION_TIMESTEPS,
    seed: int = 0,
) -> dict[str, float]:
    """Unweighted v-MSE on held-out batches at fixed timesteps with fixed noise: comparable across runs.

    Returns {"val_loss": mean over timesteps, "val_loss_t{t}": per timestep}. The noise of batch i
    comes from a generator seeded with (seed, i), so two runs (or two steps) see identical inputs.
    """
    was_training = unet.training
    unet.eval()
    totals = {t: 0.0 for t in timesteps}
    count = 0
    for index, batch in enumerate(batches):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        noise = torch.randn(batch["latents"].shape, generator=generator)
        for t in timesteps:
            t_batch = torch.full((len(noise),), t, dtype=torch.long)
            _, mse = training_loss(
                unet, batch, alpha_bar, timesteps=t_batch, noise=noise, weighting="uniform"
            )
            totals[t] += mse.sum().item()
        count += len(noise)
    unet.train(was_training)
    if count == 0:
        return {}
    result = {f"val_loss_t{t}": total / count for t, total in totals.items()}
    result["val_loss"] = sum(result.values()) / len(timesteps)
    return result


@torch.no_grad()
def sample_images(
    pipeline,
    prompts: Sequence[str],
    num_images_per_prompt: int = 1,
    num_inference_steps: int = 28,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.7,
    alpha_bar: torch.Tensor | None = None,
    height: int = 1024,
    width: int = 1024,
    seed: int = 0,
) -> list[Image.Image]:
    """Sample as the model was trained: v-prediction Euler, trailing spacing from σ_max, CFG rescale φ.

    ``alpha_bar`` is the training schedule (default: ZTSNR with σ_max 20000); sampling goes through
    `sdxl_ztsnr.sampling.generate`, the path of the sampler command. Prompts are used verbatim (no emphasis
    syntax), as training captions are; image j of prompt i has seed ``seed + i·num_images_per_prompt + j``.
    """
    if alpha_bar is None:
        alpha_bar = alphas_cumprod()
    # The pipeline may come from the base model (an ε scheduler): sample with the training schedule's config.
    pipeline.scheduler = make_training_scheduler(ztsnr=bool(alpha_bar[-1] < 1e-6))
    repeated = [prompt for prompt in prompts for _ in range(num_images_per_prompt)]
    return generate(
        pipeline,
        repeated,
        [""] * len(repeated),
        [seed + index for index in range(len(repeated))],
        height=height,
        width=width,
        num_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        alpha_bar=alpha_bar,
        emphasis=False,
        batch_size=max(1, num_images_per_prompt),
    )


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Paste images (all the size of the first) into a grid ``columns`` wide."""
    if not images:
        raise ValueError("no images to put in a grid")
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.resize((width, height)), ((index % columns) * width, (index // columns) * height))
    return grid


def log_images(trackers, grid: Image.Image, prompts: Sequence[str], step: int) -> None:
    """Send a validation grid to tensorboard and/or wandb trackers of an accelerate Accelerator."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid, caption=" | ".join(prompts))}, step=step)


@dataclass(frozen=True)
class ValidationSampling:
    """The grid sampled at each validation: prompts × images per prompt, with the sampler's settings."""

    prompts: Sequence[str]
    num_images: int = 2
    steps: int = 28
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.7


def validation_grid(
    pipeline,
    settings: ValidationSampling,
    alpha_bar: torch.Tensor,
    size: tuple[int, int],
    seed: int = 0,
) -> Image.Image:
    """One row per prompt, sampled with the training schedule from σ_max (same seeds at every validation)."""
    pipeline.set_progress_bar_config(disable=True)
    images = sample_images(
        pipeline,
        settings.prompts,
        settings.num_images,
        settings.steps,
        settings.guidance_scale,
        settings.guidance_rescale,
        alpha_bar,
        *size,
        seed=seed,
    )
    return image_grid(images, columns=settings.num_images)
