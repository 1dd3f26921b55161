"""Random draws keyed by a sample's identity, not by a rank's position in a random stream.

A training sample's timestep, noise, caption dropout and tag shuffle come from a seed made of the run's seed, the
global micro-batch number and the sample's position in the global batch (processes × per-process batch). So a
run does not depend on how its global batch is split across processes (N processes × batch B trains the same
weights as 1 process × batch N·B), and a resumed run draws what the unbroken run drew without any saved
generator state: the key is derived from the step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch

Stream = Literal["noise", "caption", "tags"]


def sample_seed(seed: int, micro_batch: int, position: int, stream: Stream) -> int:
    """A 63-bit seed for one sample's draws in one ``stream`` (independent streams per purpose)."""
    key = f"{seed}:{micro_batch}:{position}:{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def sample_seeds(seed: int, micro_batch: int, positions: Sequence[int], stream: Stream) -> list[int]:
    """``sample_seed`` for each position of a (per-process slice of a) global batch."""
    return [sample_seed(seed, micro_batch, int(p), stream) for p in positions]


def keyed_timesteps_and_noise(
    seeds: Sequence[int], shape: Sequence[int], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform timesteps (B,) int64 and Gaussian noise (B, *shape) fp32, each sample from its own seed, on the CPU."""
    timesteps, noise, _ = keyed_timesteps_noise_and_uniform(seeds, shape, num_train_timesteps)
    return timesteps, noise


def keyed_timesteps_noise_and_uniform(
    seeds: Sequence[int], shape: Sequence[int], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``keyed_timesteps_and_noise`` plus one uniform [0, 1) fp64 draw (B,) per sample, for a non-uniform
    timestep draw by inverse CDF (sdxl_ztsnr.timestep_sampling).

    The uniform comes from the sample's generator after its timestep and noise, so those two are exactly
    what they were without it (a uniform run, its tests and its checkpoints are unchanged).
    """
    timesteps = torch.empty(len(seeds), dtype=torch.long)
    noise = torch.empty((len(seeds), *shape), dtype=torch.float32)
    uniform = torch.empty(len(seeds), dtype=torch.float64)
    generator = torch.Generator()
    for index, seed in enumerate(seeds):
        generator.manual_seed(seed)
        timesteps[index] = torch.randint(0, num_train_timesteps, (1,), generator=generator)[0]
        noise[index] = torch.randn(tuple(shape), generator=generator)
        uniform[index] = torch.rand((), generator=generator, dtype=torch.float64)
    return timesteps, noise, uniform


def keyed_uniform(seeds: Sequence[int]) -> torch.Tensor:
    """One uniform [0, 1) draw per seed (B,) fp32 — caption dropout decisions."""
    generator = torch.Generator()
    out = torch.empty(len(seeds))
    for index, seed in enumerate(seeds):
        out[index] = torch.rand((), generator=generator.manual_seed(seed))
    return out
