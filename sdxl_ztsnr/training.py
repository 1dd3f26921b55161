"""One training step's pieces: the UNet call, the optimizer, and skipping non-finite steps without a sync."""

from __future__ import annotations

import math
from typing import Literal

import torch

from sdxl_ztsnr.keyed_random import keyed_timesteps_and_noise
from sdxl_ztsnr.losses import PredictionType, noise_batch, weighted_loss
from sdxl_ztsnr.schedule import LossWeighting, sample_timesteps, shift_timesteps

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
    optionally sample_weights (B,) — the tag-based loss weights — and noise_seeds (B ints, see
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
    return weighted_loss(prediction, noised, weighting, snr_gamma, batch.get("sample_weights"))


def build_optimizer(
    params,
    name: OptimizerName,
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """AdamW: fused where torch has a fused kernel (one launch per step, and it can skip a step on device)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:  # pragma: no cover - depends on the install
            raise SystemExit("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused
    )


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
    """Remove the ``found_inf`` / ``grad_scale`` attributes after the step so they never leak into a later one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for name in ("found_inf", "grad_scale"):
        if hasattr(inner, name):
            delattr(inner, name)


def global_grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """‖g‖₂ over every gradient, as a 0-dim fp32 tensor on the gradients' device (one read pass, no sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def clip_and_check_gradients(
    accelerator,
    optimizer: torch.optim.Optimizer,
    parameters: list,
    max_norm: float,
    scaler_skips: bool = False,
) -> torch.Tensor:
    """Global-norm clipping to ``max_norm`` (math.inf: none) and the non-finite check for the coming step.

    Returns the non-finite flag (0/1, on the device). With torch's fused Adam/AdamW under DDP or one process,
    the clip factor is handed to the optimizer's kernel as ``grad_scale`` (GradScaler's mechanism: the kernel
    divides each gradient by it as it reads it), which spares clip_grad_norm_'s extra multiply pass over every
    gradient; the update is the same as clipping first. Elsewhere (FSDP and DeepSpeed shard gradients, fp16's
    GradScaler owns grad_scale, other optimizers) accelerate's clip_grad_norm_ does it.
    """
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", optimizer)
    whole_gradients = accelerator.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_GPU,
        DistributedType.MULTI_CPU,
    )
    if whole_gradients and not scaler_skips and supports_device_skip(inner):
        norm = global_grad_norm(parameters)
        if math.isfinite(max_norm):
            # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); dividing by its inverse is the same
            inner.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
    else:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
        if norm is None:  # DeepSpeed before its first step reports no norm
            norm = torch.zeros((), device=accelerator.device)
        norm = torch.as_tensor(norm, device=accelerator.device)
    return mark_nonfinite_step(optimizer, norm, scaler_skips)
