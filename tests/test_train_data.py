"""Bucket batch sampler: one bucket per batch, deterministic by seed, disjoint across ranks, resumable."""

import random

import pytest
import torch

from sdxl_ztsnr.train_data import BucketBatchSampler, normalize_latents, time_ids, vae_config_latent_stats


def random_buckets(n=97, seed=0):
    rng = random.Random(seed)
    choices = [(64, 64), (64, 128), (128, 64), (96, 160)]
    return [rng.choice(choices) for _ in range(n)]


def test_every_batch_is_one_bucket_and_every_row_is_seen():
    buckets = random_buckets()
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=3)
    seen = set()
    for batch in sampler:
        assert len(batch) == 4
        assert len({buckets[i] for i in batch}) == 1
        seen.update(batch)
    assert seen == set(range(len(buckets)))


def test_order_is_deterministic_by_seed_and_changes_with_epoch():
    buckets = random_buckets()
    a = BucketBatchSampler(buckets, 4, seed=1)
    b = BucketBatchSampler(buckets, 4, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    c = BucketBatchSampler(buckets, 4, seed=2)
    assert list(a) != list(c)


def test_ranks_get_disjoint_batches_of_equal_count():
    buckets = random_buckets(200)
    ranks = [BucketBatchSampler(buckets, 4, seed=0, rank=r, world_size=3) for r in range(3)]
    batches = [list(s) for s in ranks]
    assert len({len(b) for b in batches}) == 1
    flat = [tuple(batch) for rank in batches for batch in rank]
    assert len(flat) == len(set(flat))
    single = BucketBatchSampler(buckets, 4, seed=0)
    assert set(flat) <= {tuple(b) for b in single}


def test_resume_skips_the_batches_already_trained():
    buckets = random_buckets()
    full = list(BucketBatchSampler(buckets, 4, seed=5))
    resumed = BucketBatchSampler(buckets, 4, seed=5)
    resumed.set_epoch(0, start_batch=7)
    assert list(resumed) == full[7:]
    assert len(resumed) == len(full) - 7


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], 4)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler([(64, 64)], 0)
    with pytest.raises(ValueError, match="processes"):
        BucketBatchSampler([(64, 64)] * 4, 4, rank=0, world_size=2)


def test_time_ids_are_height_first_and_latent_stats_round_trip():
    ids = time_ids(torch.tensor([[300, 200]]), torch.tensor([[4, 0]]), torch.tensor([[128, 96]]))
    assert ids.tolist() == [[300.0, 200.0, 4.0, 0.0, 128.0, 96.0]]
    latents = torch.randn(64, 4, 8, 8) * torch.tensor([2.0, 1.0, 0.5, 3.0]).view(1, 4, 1, 1) + 1.5
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    normed = normalize_latents(latents, mean, std)
    assert normed.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (normed.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-5
    # diffusers decodes z = n·latents_std/sf + latents_mean: that must equal the scaled latent / sf
    sf = 0.13025
    vae_mean, vae_std = vae_config_latent_stats(mean.tolist(), std.tolist(), sf)
    decoded = normed * torch.tensor(vae_std).view(1, 4, 1, 1) / sf + torch.tensor(vae_mean).view(1, 4, 1, 1)
    torch.testing.assert_close(decoded, latents / sf, rtol=1e-4, atol=1e-4)
