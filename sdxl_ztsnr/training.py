"""One training step's pieces: the UNet call and the loss (optimizers, clipping and the non-finite skip live in
sdxl_ztsnr.optimizers)."""

from __future__ import annotations

import torch

from sdxl_ztsnr.keyed_random import keyed_timesteps_noise_and_uniform
from sdxl_ztsnr.losses import PredictionType, noise_batch, weighted_loss
from sdxl_ztsnr.schedule import LossWeighting, shift_timesteps
from sdxl_ztsnr.timestep_sampling import TimestepSampling


def unet_prediction(
    unet: torch.nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    time_ids: torch.Tensor,
) -> torch.Tensor:
    """The SDXL UNet on (B, 4, h, w) latents with text (B, L, C), pooled (B, P) and size (B, 6) conditioning."""
    dtype = next(unet.parameters()).dtype
    return unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=prompt_embeds.to(dtype),
        added_cond_kwargs={"text_embeds": pooled_prompt_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
        return_dict=False,
    )[0]


def to_device_async(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor.to(device)`` that leaves the host free to queue more GPU work.

    A CUDA copy from pageable CPU memory synchronises the stream (the host waits for every queued kernel);
    from pinned memory with ``non_blocking`` it does not, and torch keeps the pinned buffer until the copy ran.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def training_loss(
    unet: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    alpha_bar: torch.Tensor,
    generator: torch.Generator | None = None,
    weighting: LossWeighting = "min_snr",
    snr_gamma: float = 5.0,
    timestep_shift: float = 1.0,
    prediction_type: PredictionType = "v_prediction",
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    timestep_sampling: TimestepSampling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise a batch, run the UNet, return (weighted scalar loss, per-sample MSE (B,)).

    ``batch`` holds latents (B, 4, h, w), prompt_embeds, pooled_prompt_embeds, time_ids and
    optionally sample_weights (B,) — the tag-based loss weights —, loss_mask (B, 1, h, w) — the masked loss's
    per-pixel weights, see ``sdxl_ztsnr.masks`` — and noise_seeds (B ints, see
    ``sdxl_ztsnr.keyed_random``): each sample's timestep and noise then come from its own seed, so the result
    does not depend on how a global batch is split across processes. Without seeds they are drawn from
    ``generator``. Either way on the CPU unless given, so a run is reproducible on any device.
    ``timestep_sampling`` says which timesteps are drawn (default: uniform over [0, T), as always); with its
    importance weighting the weights multiply the tag weights.
    """
    latents = batch["latents"]
    seeds = batch.get("noise_seeds")
    timestep_sampling = timestep_sampling or TimestepSampling()
    num_train_timesteps = len(alpha_bar)
    sample_weights = batch.get("sample_weights")
    drawn = None  # the unshifted draw, when this call draws the timesteps
    if seeds is not None and (timesteps is None or noise is None):
        drawn, drawn_noise, uniform = keyed_timesteps_noise_and_uniform(
            seeds, latents.shape[1:], num_train_timesteps
        )
        if not timestep_sampling.is_default(num_train_timesteps):
            drawn = timestep_sampling.from_uniform(uniform, num_train_timesteps)
        noise = drawn_noise if noise is None else noise
    elif timesteps is None:
        drawn = timestep_sampling.draw(len(latents), num_train_timesteps, generator)
    if timesteps is None:
        # Draw, shift for resolution (σ → s·σ), then hold the bounds on the timestep that trains.
        shifted = shift_timesteps(drawn, alpha_bar, timestep_shift)
        timesteps = timestep_sampling.bounded(shifted, num_train_timesteps)
        importance = timestep_sampling.importance_weights(drawn, num_train_timesteps)
        if importance is not None:  # a per-sample weight like the tag weight: multiplied in weighted_loss
            if sample_weights is not None:
                importance = sample_weights * to_device_async(importance, sample_weights.device)
            sample_weights = importance
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    # Drawn on the CPU (reproducible on any device), copied without a host sync so the host keeps queueing.
    device = latents.device
    timesteps, noise = to_device_async(timesteps, device), to_device_async(noise, device)
    alpha_bar = to_device_async(alpha_bar, device)
    noised = noise_batch(latents.float(), noise, timesteps, alpha_bar, prediction_type)
    prediction = unet_prediction(
        unet,
        noised.noisy_latents,
        timesteps,
        batch["prompt_embeds"],
        batch["pooled_prompt_embeds"],
        batch["time_ids"],
    )
    return weighted_loss(prediction, noised, weighting, snr_gamma, sample_weights, batch.get("loss_mask"))
