"""Per-channel mean and standard deviation of VAE latents, streamed and mergeable across shards and ranks:
Welford's online update (Welford 1962) applied batch-wise through Chan et al.'s pairwise merge (Chan,
Golub & LeVeque 1979). NovelAI Diffusion V3 (arXiv:2409.15997, appendix) normalises latents with these
statistics; diffusers' SDXL pipeline reads them as the VAE config's `latents_mean` / `latents_std`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WelfordState:
    """count (elements per channel), mean (C,) and m2 (C,) = Σ(x - mean)², all float64."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def empty(channels: int) -> WelfordState:
        zeros = torch.zeros(channels, dtype=torch.float64)
        return WelfordState(0, zeros, zeros.clone())

    def std(self, correction: int = 1) -> torch.Tensor:
        """(C,) standard deviation; correction=1 is the sample std (torch.std's default)."""
        if self.count <= correction:
            raise ValueError(f"std needs more than {correction} element(s) per channel, have {self.count}")
        return (self.m2 / (self.count - correction)).sqrt()

    def to_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @staticmethod
    def from_dict(d: dict) -> WelfordState:
        return WelfordState(
            int(d["count"]),
            torch.tensor(d["mean"], dtype=torch.float64),
            torch.tensor(d["m2"], dtype=torch.float64),
        )


def welford_merge(a: WelfordState, b: WelfordState) -> WelfordState:
    """Chan et al. 1979, eq. 2.1: combine two partial (count, mean, M2) into the state of their union."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"channel counts differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
    count = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    m2 = a.m2 + b.m2 + delta.square() * (a.count * b.count / count)
    return WelfordState(count, mean, m2)


def welford_update(state: WelfordState, latents: torch.Tensor) -> WelfordState:
    """Add a batch of latents (B, C, H, W) or (C, H, W): its own exact (count, mean, M2) in float64,
    merged into `state`."""
    x = latents.detach().to(device="cpu", dtype=torch.float64)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"latents must be (B, C, H, W) or (C, H, W), got shape {tuple(latents.shape)}")
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, B·H·W)
    mean = per_channel.mean(dim=1)
    m2 = (per_channel - mean[:, None]).square().sum(dim=1)
    return welford_merge(state, WelfordState(per_channel.shape[1], mean, m2))


def merge_all(states: list[WelfordState]) -> WelfordState:
    """Left fold of welford_merge (order changes the result only by float rounding)."""
    if not states:
        raise ValueError("no Welford states to merge")
    merged = states[0]
    for state in states[1:]:
        merged = welford_merge(merged, state)
    return merged
