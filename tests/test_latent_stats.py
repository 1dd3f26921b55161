"""Welford / Chan et al. per-channel latent statistics, merged across simulated ranks."""

import json

import pytest
import torch

from sdxl_ztsnr.latent_stats import WelfordState, merge_all, welford_merge, welford_update


def _batches(seed: int) -> list[torch.Tensor]:
    """Latent batches of several bucket shapes with per-channel offsets and scales, like VAE latents."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4, 8, 8), (2, 4, 6, 10), (5, 4, 10, 6), (1, 4, 12, 4), (4, 4, 8, 8), (2, 4, 4, 12)]
    offset = torch.tensor([0.5, -1.0, 2.0, 0.1]).view(1, 4, 1, 1)
    scale = torch.tensor([1.0, 0.3, 2.5, 0.05]).view(1, 4, 1, 1)
    return [torch.randn(shape, generator=g) * scale + offset for shape in shapes]


def _reference(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    per_channel = torch.cat([b.transpose(0, 1).reshape(4, -1) for b in batches], dim=1).double()
    return per_channel.mean(dim=1), per_channel.std(dim=1)


def test_two_ranks_merged_equal_torch_over_all_latents():
    batches = _batches(0)
    ranks = [WelfordState.empty(4), WelfordState.empty(4)]
    for i, batch in enumerate(batches):  # round-robin, like shards across ranks
        ranks[i % 2] = welford_update(ranks[i % 2], batch)
    # States travel between ranks as JSON (shard.json), so go through it.
    restored = [WelfordState.from_dict(json.loads(json.dumps(s.to_dict()))) for s in ranks]
    merged = merge_all(restored)
    mean, std = _reference(batches)
    assert merged.count == sum(b.numel() // 4 for b in batches)
    torch.testing.assert_close(merged.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.std(), std, rtol=1e-12, atol=1e-12)
    # Population std too (correction=0), against torch's.
    all_values = torch.cat([b.transpose(0, 1).reshape(4, -1) for b in batches], dim=1).double()
    torch.testing.assert_close(
        merged.std(correction=0), all_values.std(dim=1, correction=0), rtol=1e-12, atol=0
    )


def test_merge_order_and_single_latents():
    batches = _batches(1)
    one_by_one = WelfordState.empty(4)
    for batch in batches:
        for latent in batch:  # (C, H, W) one at a time
            one_by_one = welford_update(one_by_one, latent)
    reverse = merge_all([welford_update(WelfordState.empty(4), b) for b in reversed(batches)])
    mean, std = _reference(batches)
    for state in (one_by_one, reverse):
        torch.testing.assert_close(state.mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.std(), std, rtol=1e-12, atol=1e-12)


def test_stable_with_large_offset():
    """A mean far above the spread defeats the naive Σx² − n·mean² formula in fp32; Welford keeps it."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 4, 8, 8, generator=g) * 1e-3 + 1e4 for _ in range(3)]
    state = merge_all([welford_update(WelfordState.empty(4), b) for b in batches])
    _, std = _reference(batches)
    torch.testing.assert_close(state.std(), std, rtol=1e-6, atol=0)


def test_empty_states_and_errors():
    state = welford_update(WelfordState.empty(4), torch.ones(1, 4, 2, 2))
    assert welford_merge(WelfordState.empty(4), state) is state
    assert welford_merge(state, WelfordState.empty(4)) is state
    with pytest.raises(ValueError, match="more than 1"):
        WelfordState.empty(4).std()
    with pytest.raises(ValueError, match="channel"):
        welford_merge(state, welford_update(WelfordState.empty(3), torch.ones(3, 2, 2)))
    with pytest.raises(ValueError, match="shape"):
        welford_update(state, torch.ones(4, 4))
