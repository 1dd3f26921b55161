"""Noise schedule math for v-prediction with zero terminal SNR (ZTSNR).

One convention everywhere: discrete VP diffusion with T training timesteps, SDXL's "scaled_linear"
betas, ``alpha_bar`` = ᾱ_t = ∏(1 − β). σ_t = √((1 − ᾱ_t) / ᾱ_t) and SNR_t = ᾱ_t / (1 − ᾱ_t) = 1/σ_t².

Every function that the training or sampling path uses works in ᾱ space, where the pure-noise step
(ᾱ = 0, SNR = 0, σ = ∞) is finite; nothing divides by σ or by SNR. Tensors are computed in fp32
(the schedule itself in fp64, then cast) whatever the dtype of the model.

References
- Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891.
- Ossa et al. 2024, "Improvements to SDXL in NovelAI Diffusion V3", arXiv:2409.15997.
- Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", arXiv:2303.09556.
- Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (v-prediction).
"""

from __future__ import annotations

import argparse
import math
from typing import Literal

import numpy as np
import torch

SDXL_BETA_START = 0.00085
SDXL_BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000
NAI_SIGMA_MAX = 20000.0
# ᾱ_T that diffusers' schedulers substitute for an exact zero when rescale_betas_zero_snr is set.
DIFFUSERS_TERMINAL_ALPHA_BAR = 2.0**-24

LossWeighting = Literal["min_snr", "min_snr_unguarded", "uniform", "debiased"]
LOSS_WEIGHTINGS: tuple[str, ...] = ("min_snr", "min_snr_unguarded", "uniform", "debiased")


def scaled_linear_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """SDXL's betas: √β linear from √0.00085 to √0.012 (fp64, shape (T,))."""
    root = torch.linspace(SDXL_BETA_START**0.5, SDXL_BETA_END**0.5, num_train_timesteps, dtype=torch.float64)
    return root**2


def rescale_zero_terminal_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the last value is 0 and the first unchanged (Lin et al. 2023, Algorithm 1)."""
    root = alpha_bar.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def alphas_cumprod(
    ztsnr: bool = True,
    sigma_max: float = NAI_SIGMA_MAX,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """ᾱ_t for SDXL's betas; with ZTSNR rescaled (Lin et al. 2023) and ᾱ_T = 1/(1+σ_max²) (NAI V3 §2.2).

    ``sigma_max=inf`` leaves the terminal ᾱ exactly 0. Returns fp32, shape (T,).
    """
    alpha_bar = torch.cumprod(1.0 - scaled_linear_betas(num_train_timesteps), dim=0)
    if ztsnr:
        if not sigma_max > 0:
            raise ValueError(
                f"sigma_max must be positive (got {sigma_max}); use math.inf for an exact zero SNR"
            )
        alpha_bar = rescale_zero_terminal_snr(alpha_bar)
        # 1/(1+σ²) is exactly 0.0 for σ = inf and 2.5e-9 for NAI's 20000: fp32 represents both.
        alpha_bar[-1] = 1.0 / (1.0 + float(sigma_max) ** 2)
    return alpha_bar.float()


def sigmas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1−ᾱ)/ᾱ); +inf where ᾱ = 0. For display and samplers' bookkeeping, never for scaling."""
    alpha_bar = alpha_bar.double()
    return ((1.0 - alpha_bar) / alpha_bar).sqrt().float()


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ/(1−ᾱ); 0 at the pure-noise step."""
    alpha_bar = alpha_bar.double()
    return (alpha_bar / (1.0 - alpha_bar)).float()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1/(1+σ²); exactly 0 at σ = inf."""
    return 1.0 / (1.0 + sigma.double() ** 2)


def _expand(alpha_bar_t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ, √(1−ᾱ)) in fp32, shaped (B, 1, 1, ...) to broadcast over ``like`` (B, C, H, W)."""
    alpha_bar_t = alpha_bar_t.to(device=like.device, dtype=torch.float32)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha_bar_t.sqrt().view(shape), (1.0 - alpha_bar_t).sqrt().view(shape)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ·x₀ + √(1−ᾱ)·ε (Ho et al. 2020, eq. 4), computed in fp32."""
    a, s = _expand(alpha_bar_t, x0)
    return a * x0.float() + s * noise.float()


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022, §4); equals −x₀ at the pure-noise step."""
    a, s = _expand(alpha_bar_t, x0)
    return a * noise.float() - s * x0.float()


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x̂₀ = √ᾱ·x_t − √(1−ᾱ)·v̂ (Salimans & Ho 2022)."""
    a, s = _expand(alpha_bar_t, x_t)
    return a * x_t.float() - s * v.float()


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂ (Salimans & Ho 2022)."""
    a, s = _expand(alpha_bar_t, x_t)
    return s * x_t.float() + a * v.float()


def loss_weights(
    alpha_bar_t: torch.Tensor, mode: LossWeighting = "min_snr", gamma: float = 5.0
) -> torch.Tensor:
    """Per-sample weights for an MSE on v, written in ᾱ so SNR = 0 stays finite (Hang et al. 2023).

    - ``min_snr`` (default): min(SNR+1, γ)/(SNR+1) = min(1, γ·(1−ᾱ)). The guard: MinSNR caps the
      x₀-space weight of the low-noise steps at γ; here the x₀ weight of a v-loss, SNR+1, is capped
      instead of SNR, so the v-loss weight is 1 up to SNR = γ−1 and falls as γ/(SNR+1) past it. The
      pure-noise step (SNR = 0, v = −x₀: the step that teaches the prompt's mean image, the one ZTSNR
      exists to train) keeps weight 1.
    - ``min_snr_unguarded``: the textbook v form min(SNR, γ)/(SNR+1) = min(ᾱ, γ·(1−ᾱ)); at σ = 20000
      it gives the pure-noise step a weight of 2.5e-9, i.e. never trains it (diffusers#9451).
    - ``uniform``: plain v-loss, weight 1.
    - ``debiased``: 1/√(SNR+1) = √(1−ᾱ), the v form of debiased estimation (Yu et al. 2024,
      arXiv:2310.08442), finite at SNR = 0.
    """
    alpha_bar_t = alpha_bar_t.float()
    if mode == "min_snr":
        return torch.clamp(gamma * (1.0 - alpha_bar_t), max=1.0)
    if mode == "min_snr_unguarded":
        return torch.minimum(alpha_bar_t, gamma * (1.0 - alpha_bar_t))
    if mode == "uniform":
        return torch.ones_like(alpha_bar_t)
    if mode == "debiased":
        return (1.0 - alpha_bar_t).sqrt()
    raise ValueError(f"unknown loss weighting {mode!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def resolution_shift(height: int, width: int, base: int = 1024) -> float:
    """s = √(H·W)/1024: NAI V3 §2.3, a larger canvas needs a proportionally larger σ for equal destruction."""
    return math.sqrt(height * width) / base


def timesteps_for_sigmas(sigma: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Fractional timesteps whose σ equals ``sigma``, by linear interpolation in log σ; clamped to [0, T−1]."""
    log_sigmas = sigmas(alpha_bar).double().log()  # increasing in t; +inf at an exact ZTSNR terminal
    log_sigmas = torch.where(torch.isinf(log_sigmas), torch.finfo(torch.float64).max, log_sigmas)
    target = sigma.double().log().clamp(log_sigmas[0], log_sigmas[-1])
    hi = torch.searchsorted(log_sigmas, target).clamp(1, len(log_sigmas) - 1)
    lo = hi - 1
    frac = ((target - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0.0, 1.0)
    return (lo.double() + frac).float()


def shift_timesteps(timesteps: torch.Tensor, alpha_bar: torch.Tensor, shift: float) -> torch.Tensor:
    """Map t to the timestep whose σ is ``shift``·σ_t (NAI V3 §2.3), rounded; shift=1 is the identity."""
    if shift == 1.0:
        return timesteps.long()
    sigma = sigmas(alpha_bar)[timesteps.long().cpu()] * shift
    return timesteps_for_sigmas(sigma, alpha_bar).round().long().to(timesteps.device)


def sample_timesteps(
    batch_size: int,
    alpha_bar: torch.Tensor,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training timesteps: uniform over [0, T), optionally shifted for resolution (LongTensor (B,))."""
    t = torch.randint(0, len(alpha_bar), (batch_size,), generator=generator)
    return shift_timesteps(t, alpha_bar, shift).to(device)


def inference_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Trailing spacing (Lin et al. 2023, Table 2): t_i = round(T − i·T/n) − 1, i < n; LongTensor (n,), T−1 first."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    step = num_train_timesteps / num_steps
    # diffusers' trailing rule, np.round(np.arange(T, 0, -T/n)) - 1, with its float64 values (so ties such as
    # 937.5 round as there), but exactly n of them: arange takes ceil(T / fl(T/n)) values, n + 1 where T/n
    # rounds down (n = 61, 103, 121, ...), and the extra one, ~1e-13, would be t = -1.
    points = np.arange(num_train_timesteps, 0, -step)[:num_steps]
    return torch.from_numpy(np.round(points)).long() - 1


def inference_sigmas(alpha_bar: torch.Tensor, num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """σ ladder for Euler/DPM++ with trailing spacing, first σ = σ_max, last 0; fp32 (n+1,).

    With ``shift`` ≠ 1 the interior σ are multiplied by s (NAI V3 §2.3); the first stays σ_max.
    """
    ladder = sigmas(alpha_bar)[inference_timesteps(num_steps, len(alpha_bar))]
    if shift != 1.0:
        ladder = torch.cat([ladder[:1], (ladder[1:] * shift).clamp(max=ladder[0])])
    return torch.cat([ladder, torch.zeros(1)])


def ddim_step(
    x_t: torch.Tensor, v: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_next: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step from a v prediction (Song et al. 2021, eq. 12), finite at ᾱ_t = 0.

    Equals an Euler step of the probability-flow ODE in σ, written in ᾱ so it starts from pure noise.
    """
    x0 = x0_from_v(x_t, v, alpha_bar_t)
    eps = eps_from_v(x_t, v, alpha_bar_t)
    a, s = _expand(alpha_bar_next, x_t)
    return a * x0 + s * eps


def rescale_cfg(guided: torch.Tensor, conditional: torch.Tensor, phi: float = 0.7) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, eq. 15–16): match the guided output's std to the conditional's."""
    dims = tuple(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * guided * ratio + (1.0 - phi) * guided


def scheduler_config(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, ztsnr: bool = True) -> dict:
    """The EulerDiscreteScheduler config we ship: v-prediction, rescaled zero SNR, trailing spacing.

    ``ztsnr=False`` describes a model trained on SDXL's own schedule (ablations only).
    """
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_start": SDXL_BETA_START,
        "beta_end": SDXL_BETA_END,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": ztsnr,
        "timestep_spacing": "trailing",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "steps_offset": 1,
        "final_sigmas_type": "zero",
    }


def make_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, ztsnr: bool = True):
    """diffusers' EulerDiscreteScheduler built from :func:`scheduler_config`."""
    from diffusers import EulerDiscreteScheduler

    config = {k: v for k, v in scheduler_config(num_train_timesteps, ztsnr).items() if not k.startswith("_")}
    return EulerDiscreteScheduler.from_config(config)


def plot_schedules(path: str, sigma_max: float = NAI_SIGMA_MAX) -> None:
    """Draw σ_t and log SNR_t against t for plain SDXL and ZTSNR (σ_max) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.arange(NUM_TRAIN_TIMESTEPS)
    curves = {
        "SDXL (σ_max 14.6)": (alphas_cumprod(ztsnr=False), "-", 2.0),
        f"ZTSNR (σ_max {sigma_max:g})": (alphas_cumprod(ztsnr=True, sigma_max=sigma_max), "-", 3.0),
        "ZTSNR (σ_max 4096, diffusers)": (alphas_cumprod(ztsnr=True, sigma_max=4096.0), "--", 1.5),
    }
    fig, (ax_sigma, ax_snr, ax_tail) = plt.subplots(1, 3, figsize=(15, 4))
    tail = t >= 940
    for label, (alpha_bar, style, width) in curves.items():
        ax_sigma.plot(t, sigmas(alpha_bar), style, lw=width, label=label)
        ax_snr.plot(t, snr(alpha_bar).log(), style, lw=width, label=label)
        ax_tail.plot(t[tail], sigmas(alpha_bar)[tail], style, lw=width, marker=".", label=label)
    ax_sigma.set(yscale="log", xlabel="timestep t", ylabel="σ_t", title="noise level σ_t")
    ax_snr.set(xlabel="timestep t", ylabel="ln SNR_t", title="log signal-to-noise ratio")
    ax_tail.set(yscale="log", xlabel="timestep t", ylabel="σ_t", title="the last 60 steps")
    for ax in (ax_sigma, ax_snr, ax_tail):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print or plot the SDXL and ZTSNR noise schedules.")
    parser.add_argument("--plot", metavar="PNG", help="write σ and log-SNR against t to this image")
    parser.add_argument(
        "--sigma_max", type=float, default=NAI_SIGMA_MAX, help="terminal σ of the ZTSNR schedule"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="number of steps of the printed inference ladder"
    )
    args = parser.parse_args(argv)
    for name, alpha_bar in (
        ("SDXL", alphas_cumprod(ztsnr=False)),
        ("ZTSNR", alphas_cumprod(sigma_max=args.sigma_max)),
    ):
        s = sigmas(alpha_bar)
        ladder = ", ".join(f"{x:.3g}" for x in inference_sigmas(alpha_bar, args.steps).tolist())
        print(
            f"{name:6s} σ_0={s[0]:.4f} σ_999={s[-1]:.4g} SNR_999={snr(alpha_bar)[-1]:.3g}  ladder: [{ladder}]"
        )
    if args.plot:
        plot_schedules(args.plot, sigma_max=args.sigma_max)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
