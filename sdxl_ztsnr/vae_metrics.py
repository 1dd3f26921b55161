"""Reconstruction quality of a VAE on fixed held-out crops: PSNR, SSIM (torchmetrics), LPIPS (the lpips package).

SSIM is the usual definition (Wang et al. 2004; scikit-image's ``structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``): an 11×11 Gaussian window (σ 1.5) over the
window positions that lie inside the image. torchmetrics computes the map on a reflection-padded image and, in
its current releases, averages the padded border too; we take its full map and drop that border, which gives
scikit-image's numbers to float precision (tests/test_vae_training.py checks it against a direct sum).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

METRICS = ("psnr", "ssim", "lpips")
BETTER = {"psnr": "higher", "ssim": "higher", "lpips": "lower"}
SSIM_SIGMA = 1.5
SSIM_BORDER = int(
    3.5 * SSIM_SIGMA + 0.5
)  # half the 11-tap window: torchmetrics' and scikit-image's truncation


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) of [0, 1] images (B, 3, H, W): 10·log10(1 / MSE)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        reconstruction.double(), original.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).float()


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) of [0, 1] images (B, 3, H, W), Wang et al. 2004, Gaussian window σ 1.5, valid region."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if min(original.shape[-2:]) <= 2 * SSIM_BORDER:
        raise ValueError(
            f"SSIM needs images larger than {2 * SSIM_BORDER + 1} px, got {tuple(original.shape)}"
        )
    _, full = structural_similarity_index_measure(
        reconstruction.double(),
        original.double(),
        sigma=SSIM_SIGMA,
        data_range=1.0,
        reduction="none",
        return_full_image=True,
    )
    b = SSIM_BORDER
    return full[..., b:-b, b:-b].mean(dim=(1, 2, 3)).float()


def lpips_distance(
    lpips_model: torch.nn.Module, reconstruction: torch.Tensor, original: torch.Tensor
) -> torch.Tensor:
    """Per-image LPIPS (B,) of [0, 1] images (Zhang et al. 2018); the lpips network takes [-1, 1]."""
    return lpips_model(reconstruction * 2 - 1, original * 2 - 1).reshape(-1).float()


@torch.no_grad()
def reconstruct(
    vae,
    pixels: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """(K, 3, S, S) uint8 -> the VAE's reconstruction from the posterior MEAN (what latent caches hold), [0, 1] fp32."""
    from sdxl_ztsnr.vae_data import to_model_range

    was_training = vae.training
    vae.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        x = to_model_range(pixels[start : start + batch_size].to(device))
        with autocast():
            z = vae.encode(x).latent_dist.mean
            decoded = vae.decode(z).sample
        out.append(((decoded.float().clamp(-1, 1) + 1) / 2).cpu())
    vae.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def reconstruction_metrics(
    reconstruction: torch.Tensor, original_pixels: torch.Tensor, lpips_model: torch.nn.Module | None = None
) -> dict[str, float]:
    """Mean PSNR, SSIM (and LPIPS when a network is given) over the crops; ``original_pixels`` are uint8."""
    original = original_pixels.float() / 255
    metrics = {
        "psnr": psnr(reconstruction, original).mean().item(),
        "ssim": ssim(reconstruction, original).mean().item(),
    }
    if lpips_model is not None:
        device = next(lpips_model.parameters()).device
        distances = [
            lpips_distance(lpips_model, reconstruction[i : i + 8].to(device), original[i : i + 8].to(device))
            for i in range(0, len(original), 8)
        ]
        metrics["lpips"] = torch.cat(distances).mean().item()
    return metrics


def to_images(batch: torch.Tensor) -> list[Image.Image]:
    """(K, 3, H, W) uint8 or [0, 1] floats -> K PIL images."""
    if batch.is_floating_point():
        batch = (batch.clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy())) for x in batch]


def comparison_grid(original: torch.Tensor, starting: torch.Tensor, finetuned: torch.Tensor) -> Image.Image:
    """One row per crop: original | starting VAE | fine-tuned VAE."""
    from sdxl_ztsnr.validation import image_grid

    rows = zip(to_images(original), to_images(starting), to_images(finetuned), strict=True)
    return image_grid([image for row in rows for image in row], columns=3)


def metrics_markdown(start: dict[str, float], final: dict[str, float], final_label: str) -> str:
    """A markdown table: one row for the starting VAE, one for the fine-tuned one."""
    names = [m for m in METRICS if m in start or m in final]
    header = "| VAE | " + " | ".join(f"{m.upper()} ({BETTER[m]} is better)" for m in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    for label, values in (("starting", start), (final_label, final)):
        cells = [f"{values[m]:.4f}" if m in values else "n/a" for m in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_metrics(
    output_dir: str | Path,
    start: dict[str, float],
    final: dict[str, float],
    step: int,
    history: Sequence[dict] = (),
    crops: int = 0,
    crop_size: int = 0,
) -> tuple[Path, Path]:
    """vae_metrics.json (start, final, every validation) and vae_metrics.md (the table) in ``output_dir``."""
    output_dir = Path(output_dir)
    record = {
        "held_out_crops": crops,
        "crop_size": crop_size,
        "starting": start,
        "final": {"step": step, **final},
        "validations": list(history),
    }
    json_path, md_path = output_dir / "vae_metrics.json", output_dir / "vae_metrics.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    table = metrics_markdown(start, final, f"fine-tuned (step {step})")
    md_path.write_text(f"Held-out reconstruction, {crops} fixed {crop_size}² crops:\n\n{table}\n")
    return json_path, md_path
