"""The training loss: ZTSNR noising, v target, per-sample MSE, and every weighting in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sdxl_ztsnr.masks import masked_per_sample_mse
from sdxl_ztsnr.schedule import LossWeighting, add_noise, loss_weights, v_target

PredictionType = Literal["v_prediction", "epsilon"]


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch axis, in fp32: (B, C, H, W) -> (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class NoisedBatch:
    """What the model sees and what it must predict for one batch."""

    noisy_latents: torch.Tensor  # (B, 4, h, w) fp32: x_t = √ᾱ·x₀ + √(1−ᾱ)·ε
    target: torch.Tensor  # (B, 4, h, w) fp32: v (or ε for the ε-prediction ablation)
    alpha_bar_t: torch.Tensor  # (B,) fp32
    prediction_type: PredictionType = "v_prediction"


def noise_batch(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: PredictionType = "v_prediction",
) -> NoisedBatch:
    """Forward process and target for timesteps ``t`` (B,) under the schedule ``alpha_bar`` (T,)."""
    alpha_bar_t = alpha_bar.to(latents.device)[timesteps]
    noisy = add_noise(latents, noise, alpha_bar_t)
    target = v_target(latents, noise, alpha_bar_t) if prediction_type == "v_prediction" else noise.float()
    return NoisedBatch(noisy, target, alpha_bar_t, prediction_type)


def weighted_loss(
    prediction: torch.Tensor,
    batch: NoisedBatch,
    weighting: LossWeighting = "min_snr",
    snr_gamma: float = 5.0,
    sample_weights: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place the loss is formed: mean over the batch of MSE × timestep weight × tag weight.

    Returns (scalar loss, per-sample unweighted MSE (B,)) — the second for logging and validation.
    ``weighting`` applies to v-prediction; the ε-prediction ablation uses uniform weights.
    ``sample_weights`` (B,) are the NAI tag-based loss weights (dataset mean 1). ``loss_mask`` (B, 1, h, w)
    weighs the MSE per latent pixel, scaled to mean 1 per sample (masks.py): the other weights keep their scale.
    """
    if loss_mask is None:
        mse = per_sample_mse(prediction, batch.target)
    else:
        mse = masked_per_sample_mse(prediction, batch.target, loss_mask)
    if batch.prediction_type == "v_prediction":
        weights = loss_weights(batch.alpha_bar_t, weighting, snr_gamma)
    else:
        weights = torch.ones_like(mse)
    if sample_weights is not None:
        weights = weights * sample_weights.to(device=mse.device, dtype=torch.float32)
    return (mse * weights).mean(), mse.detach()
