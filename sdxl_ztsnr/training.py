"""One training step's pieces: the UNet call, the optimizer, and skipping non-finite steps without a sync."""

from __future__ import annotations

from typing import Literal

import torch

from sdxl_ztsnr.losses import PredictionType, noise_batch, weighted_loss
from sdxl_ztsnr.schedule import LossWeighting, sample_timesteps

OptimizerName = Literal["adamw", "adamw8bit"]


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
    optionally sample_weights (B,) — the tag-based loss weights. Timesteps and noise are drawn from
    ``generator`` on the CPU unless given, so a run is reproducible on any device.
    """
    latents = batch["latents"]
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
    return weighted_loss(prediction, noised, weighting, snr_gamma, batch.get("sample_weights"))


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, whose kernel reads ``found_inf`` and skips the update on device."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))


def mark_nonfinite_step(
    optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, scaler_skips: bool = False
) -> torch.Tensor:
    """Make the coming ``optimizer.step()`` a no-op when the gradient norm is not finite; returns the flag (0/1).

    torch's fused Adam kernels take a ``found_inf`` tensor (the mechanism GradScaler uses) and leave
    parameters, moments and the step count unchanged when it is 1 — decided on the device, so the
    host never waits for the backward pass. A NaN/Inf loss gives a NaN gradient norm, hence a skip.
    Other optimizers (bitsandbytes' 8-bit AdamW) cost one host sync: on a bad step their gradients
    are dropped, and an optimizer skips parameters without a gradient. With fp16 autocast the
    GradScaler already skips such steps (``scaler_skips``); only the flag is returned.
    """
    found_inf = (~torch.isfinite(grad_norm.detach().float())).float().reshape(())
    if scaler_skips:
        return found_inf
    inner = getattr(optimizer, "optimizer", optimizer)
    if supports_device_skip(inner):
        inner.found_inf = found_inf
    elif found_inf.item():
        for group in inner.param_groups:
            for param in group["params"]:
                param.grad = None
    return found_inf


def clear_nonfinite_mark(optimizer: torch.optim.Optimizer) -> None:
    """Remove the ``found_inf`` attribute after the step so it never leaks into a later one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if hasattr(inner, "found_inf"):
        del inner.found_inf
