"""Which training timesteps are drawn: uniform (the default), logit-normal, or biased towards high noise,
within [min_timestep, max_timestep).

Every mode is a distribution of the timestep fraction x ∈ [0, 1) laid over the n = max − min timesteps of the
range: timestep min + k takes the probability F((k+1)/n) − F(k/n) of its bin, F the mode's CDF. A sample's
timestep is the inverse CDF of one uniform draw u of its own (``keyed_random``), so a non-uniform run keeps what
a uniform one has: N processes × batch B draw what 1 process × N·B draws, and a resume draws what the unbroken
run drew. Bounds follow kohya's sd-scripts: ``min_timestep`` inclusive (default 0), ``max_timestep`` exclusive
(default T = 1000), both on the timestep that trains, i.e. after the resolution shift.

Loss weights are not importance-corrected by default (as in kohya's sd-scripts, SimpleTuner and OneTrainer):
the draw distribution is part of the objective, and drawing the pure-noise step more often trains it more —
what an ε→v conversion needs. With ``importance_weighting`` each sample's loss is multiplied by
p_uniform(t)/p_draw(t) = 1/(n·P(t)), so the expected loss equals the uniform-draw objective and only its
variance changes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from sdxl_ztsnr.console import UserError

TimestepMode = Literal["uniform", "logit_normal", "high_noise"]
TIMESTEP_MODES: tuple[str, ...] = ("uniform", "logit_normal", "high_noise")


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) via erfc: accurate far into the lower tail (torch's ndtr is 0 below z ≈ −8.3 in fp64)."""
    return 0.5 * torch.special.erfc(-z / math.sqrt(2.0))


def logit_normal_cdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """F(x) = Φ((logit x − μ)/s): x = sigmoid(μ + s·z), z ~ N(0, 1) (Esser et al. 2024, SD3, §3.1); fp64."""
    return _normal_cdf((torch.logit(x.double()) - mean) / std)


def high_noise_cdf(x: torch.Tensor, bias: float) -> torch.Tensor:
    """F(x) = 1 − (1 − x)^(1/(1+b)): density (1−x)^(−b/(1+b))/(1+b), rising to the pure-noise end; fp64.

    b = 0 is uniform. The low-noise end keeps 1/(1+b) of the uniform rate; the last of n bins gets
    (1/n)^(1/(1+b)) of the draws (T = 1000: b = 1 draws the pure-noise step 3.2% of the time, 32× uniform).
    """
    return 1.0 - _high_noise_survival(x, bias)


def _high_noise_survival(x: torch.Tensor, bias: float) -> torch.Tensor:
    return (1.0 - x.double()).clamp(min=0.0) ** (1.0 / (1.0 + bias))


@functools.lru_cache(maxsize=16)
def _bin_probabilities(mode: str, mean: float, std: float, bias: float, n: int) -> torch.Tensor:
    """P of each of n equal bins of x ∈ [0, 1), fp64 (n,); tails from the side where they are small, so a
    probability of 1e-20 is 1e-20 and not 0 or 1 − (1 − 1e-20)."""
    edges = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    if mode == "uniform":
        return edges.diff()
    if mode == "high_noise":
        return -_high_noise_survival(edges, bias).diff()
    if mode == "logit_normal":
        z = (torch.logit(edges) - mean) / std  # −inf … +inf
        lower = _normal_cdf(z).diff()  # F(b) − F(a): precise where F is small
        upper = -_normal_cdf(-z).diff()  # S(a) − S(b): precise where F is near 1
        return torch.where(z[1:] + z[:-1] > 0, upper, lower).nan_to_num(nan=0.0)
    raise ValueError(f"unknown timestep sampling {mode!r}; choose one of {', '.join(TIMESTEP_MODES)}")


# Importance weights beyond this make the loss a sum of rare, huge terms (a timestep drawn once per million
# samples counts a million-fold): refused rather than trained on.
MAX_IMPORTANCE_WEIGHT = 1000.0


@dataclass(frozen=True)
class TimestepSampling:
    """How training timesteps are drawn (see the module docstring); the default is today's uniform draw."""

    mode: TimestepMode = "uniform"
    logit_mean: float = 0.0  # logit_normal: μ and s of logit(x)
    logit_std: float = 1.0
    high_noise_bias: float = 1.0  # high_noise: b ≥ 0 of high_noise_cdf
    min_timestep: int = 0  # inclusive
    max_timestep: int | None = None  # exclusive; None: T
    importance_weighting: bool = False  # multiply each sample's loss by p_uniform(t)/p_draw(t)

    def bounds(self, num_train_timesteps: int) -> tuple[int, int]:
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
        return self.min_timestep, high

    def check(self, num_train_timesteps: int) -> None:
        """Refuse settings that cannot be drawn from, naming the flag."""
        low, high = self.bounds(num_train_timesteps)
        if self.mode not in TIMESTEP_MODES:
            raise UserError(f"--timestep_sampling {self.mode!r}: choose one of {', '.join(TIMESTEP_MODES)}")
        if not 0 <= low < high <= num_train_timesteps:
            raise UserError(
                f"--min_timestep {low} / --max_timestep {high}: need 0 <= min < max <= {num_train_timesteps} "
                "(min inclusive, max exclusive, as kohya's)"
            )
        if self.mode == "logit_normal" and not (self.logit_std > 0 and math.isfinite(self.logit_mean)):
            raise UserError(f"--logit_std {self.logit_std:g} must be positive (and --logit_mean finite)")
        if self.mode == "high_noise" and not (0 <= self.high_noise_bias < math.inf):
            raise UserError(
                f"--high_noise_bias {self.high_noise_bias:g} must be finite and >= 0 (0 = uniform)"
            )
        if self.importance_weighting:
            p = self.probabilities(num_train_timesteps)[low:high]
            largest = (1.0 / ((high - low) * p)).max().item()
            if not largest <= MAX_IMPORTANCE_WEIGHT:
                raise UserError(
                    f"--timestep_importance_weighting: these draws give timesteps weights up to {largest:.3g} "
                    f"(steps drawn almost never, counted that much more when they are); above "
                    f"{MAX_IMPORTANCE_WEIGHT:g} the loss is ruled by rare huge terms. Widen --logit_std, bound the "
                    "range with --min_timestep/--max_timestep, or train without the weighting"
                )

    def is_default(self, num_train_timesteps: int) -> bool:
        """Uniform over every timestep: drawn exactly as before this module existed (bit-identical runs)."""
        return self.mode == "uniform" and self.bounds(num_train_timesteps) == (0, num_train_timesteps)

    def probabilities(self, num_train_timesteps: int) -> torch.Tensor:
        """P(t) for t in [0, T): fp64 (T,), zero outside [min, max), summing to 1."""
        low, high = self.bounds(num_train_timesteps)
        out = torch.zeros(num_train_timesteps, dtype=torch.float64)
        out[low:high] = _bin_probabilities(
            self.mode, float(self.logit_mean), float(self.logit_std), float(self.high_noise_bias), high - low
        )
        return out

    def from_uniform(self, u: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        """Inverse CDF: uniform [0, 1) draws (B,) to timesteps (B,) int64 distributed as ``probabilities``."""
        low, high = self.bounds(num_train_timesteps)
        cdf = self.probabilities(num_train_timesteps)[low:high].cumsum(0)
        k = torch.searchsorted(cdf, u.double().cpu(), right=True).clamp(max=high - low - 1)
        return low + k

    def draw(self, batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None):
        """Timesteps (B,) int64 from ``generator`` (the path without per-sample seeds)."""
        if self.is_default(num_train_timesteps):
            return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return self.from_uniform(u, num_train_timesteps)

    def bounded(self, timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        """Clamp (shifted) timesteps into [min, max): the bounds hold for the timestep that trains."""
        low, high = self.bounds(num_train_timesteps)
        if (low, high) == (0, num_train_timesteps):
            return timesteps
        return timesteps.clamp(low, high - 1)

    def importance_weights(self, drawn: torch.Tensor, num_train_timesteps: int) -> torch.Tensor | None:
        """1/(n·P(t)) (B,) fp32 for the drawn (unshifted) timesteps with ``importance_weighting``, else None.

        E over the draw of w(t)·L(t) = mean of L over the n timesteps of the range: the uniform-draw objective.
        """
        if not self.importance_weighting:
            return None
        low, high = self.bounds(num_train_timesteps)
        p = self.probabilities(num_train_timesteps)[drawn.long().cpu()]
        return (1.0 / ((high - low) * p)).float()

    def describe(self, num_train_timesteps: int) -> str:
        """One log line: the mode, its range and how often it draws the top timestep of the range."""
        low, high = self.bounds(num_train_timesteps)
        p = self.probabilities(num_train_timesteps)
        settings = {
            "uniform": "",
            "logit_normal": f" (mean {self.logit_mean:g}, std {self.logit_std:g})",
            "high_noise": f" (bias {self.high_noise_bias:g})",
        }[self.mode]
        line = (
            f"timesteps: {self.mode}{settings} over [{low}, {high}); t = {high - 1} drawn "
            f"{100 * p[high - 1].item():.2g}% of the time (uniform: {100 / (high - low):.2g}%)"
        )
        if self.importance_weighting:
            weights = 1.0 / ((high - low) * p[low:high])
            line += f"; importance weights {weights.min().item():.3g} to {weights.max().item():.3g}"
        return line
