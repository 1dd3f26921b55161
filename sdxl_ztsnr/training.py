"""One training step's pieces: the UNet call and the loss (optimizers, clipping and the non-finite skip live in
sdxl_ztsnr.optimizers)."""

from __future__ import annotations

import torch

from sdxl_ztsnr.keyed_random import keyed_timesteps_and_noise
from sdxl_ztsnr.losses import PredictionType, noise_batch, weighted_loss
from sdxl_ztsnr.schedule import LossWeighting, sample_timesteps, shift_timesteps


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise a batch, run the UNet, return (weighted scalar loss, per-sample MSE (B,)).

    ``batch`` holds latents (B, 4, h, w), prompt_embeds, pooled_prompt_embeds, time_ids and
    optionally sample_weights (B,) — the tag-based loss weights —, loss_mask (B, 1, h, w) — the masked loss's
    per-pixel weights, see ``sdxl_ztsnr.masks`` — and noise_seeds (B ints, see
    ``sdxl_ztsnr.keyed_random``): each sample's timestep and noise then come from its own seed, so the result
    does not depend on how a global batch is split across processes. Without seeds they are drawn from
    ``generator``. Either way on the CPU unless given, so a run is reproducible on any device.
    """
    latents = batch["latents"]
    seeds = batch.get("noise_seeds")
    if seeds is not None and (timesteps is None or noise is None):
        drawn_timesteps, drawn_noise = keyed_timesteps_and_noise(seeds, latents.shape[1:], len(alpha_bar))
        if timesteps is None:
            timesteps = shift_timesteps(drawn_timesteps, alpha_bar, timestep_shift)
        noise = drawn_noise if noise is None else noise
    if timesteps is None:
        timesteps = sample_timesteps(len(latents), alpha_bar, timestep_shift, generator)
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
    return weighted_loss(
        prediction, noised, weighting, snr_gamma, batch.get("sample_weights"), batch.get("loss_mask")
    )
