"""Colour fixes after a tiled img2img redraw: bring the colours back to the pre-upscaled image's.

- ``adain``: per-channel mean and std of the result matched to the reference (Huang & Belongie 2017, AdaIN).
- ``wavelet``: the result's high frequencies over the reference's low frequencies, split by an à trous
  wavelet decomposition (dilated 3×3 binomial blurs, dilation 1, 2, 4, …), as StableSR does (Wang et al.
  2023, arXiv:2305.07015, §3.4). Keeps the redrawn detail and the original's colour and shading.

Images are (C, H, W) fp32 in [0, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ColorFix = Literal["none", "adain", "wavelet"]
COLOR_FIX_MODES: tuple[str, ...] = ("none", "adain", "wavelet")
WAVELET_LEVELS = 5


def adain(result: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel (x − μ_x)/σ_x·σ_r + μ_r (Huang & Belongie 2017, eq. 8)."""
    dims = (-2, -1)
    # Population std (correction=0): finite for a single pixel, where the unbiased one divides by zero.
    mean_x, std_x = result.mean(dims, keepdim=True), result.std(dims, keepdim=True, correction=0)
    mean_r, std_r = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True, correction=0)
    return ((result - mean_x) / (std_x + eps) * std_r + mean_r).clamp(0, 1)


def wavelet_low_frequency(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The residual low-pass after ``levels`` à trous steps (binomial kernel, dilation 2^i, replicate pad)."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=image.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(image.shape[0], 1, 3, 3)
    low = image[None].float()
    for level in range(levels):
        dilation = 2**level
        padded = F.pad(low, (dilation,) * 4, mode="replicate")
        low = F.conv2d(padded, kernel, groups=image.shape[0], dilation=dilation)
    return low[0]


def wavelet(result: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """result − low(result) + low(reference) (StableSR's wavelet colour fix)."""
    high = result - wavelet_low_frequency(result, levels)
    return (high + wavelet_low_frequency(reference, levels)).clamp(0, 1)


def color_fix(result: torch.Tensor, reference: torch.Tensor, mode: ColorFix) -> torch.Tensor:
    """Apply the named colour fix of ``result`` against ``reference`` (same shape)."""
    if result.shape != reference.shape:
        raise ValueError(f"color fix: shapes differ, {tuple(result.shape)} and {tuple(reference.shape)}")
    if mode == "none":
        return result
    if mode == "adain":
        return adain(result, reference)
    if mode == "wavelet":
        return wavelet(result, reference)
    raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIX_MODES)}, got {mode!r}")
