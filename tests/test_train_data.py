"""Bucket batch sampler: one bucket per global batch, deterministic by seed, split across ranks, resumable;
held-out rows by source image; per-sample random draws keyed by identity, not by rank."""

import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from sdxl_ztsnr.keyed_random import keyed_timesteps_and_noise, sample_seeds
from sdxl_ztsnr.train_data import (
    BucketBatchSampler,
    normalize_latents,
    pack_tensors,
    split_rows,
    time_ids,
    unpack_tensors,
    vae_config_latent_stats,
)


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


def test_ranks_split_each_global_batch_as_one_process_with_the_whole_batch_sees_it():
    buckets = random_buckets(200)
    ranks = [BucketBatchSampler(buckets, 4, seed=0, rank=r, world_size=3) for r in range(3)]
    batches = [list(s) for s in ranks]
    assert len({len(b) for b in batches}) == 1
    single = list(BucketBatchSampler(buckets, 12, seed=0))
    # step k of 3 processes × 4 rows is exactly step k of 1 process × 12 rows, in the same order
    assert [sum((rank[k] for rank in batches), []) for k in range(len(single))] == single
    assert [r.positions for r in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for step in zip(*batches, strict=True):
        assert len({buckets[i] for batch in step for i in batch}) == 1  # one bucket per global batch


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
    with pytest.raises(ValueError, match="world_size"):
        BucketBatchSampler([(64, 64)] * 4, 4, rank=2, world_size=2)


def test_held_out_rows_are_whole_source_images():
    # 40 images, each stored twice (a mirrored copy, as --random_flip writes), rows interleaved
    sources = [f"img{i % 40}.png" for i in range(80)]
    train, held = split_rows(sources, validation_rows=7, seed=3)
    assert sorted(train.tolist() + held.tolist()) == list(range(80))
    held_sources = {sources[i] for i in held}
    assert not held_sources & {sources[i] for i in train}, "a held-out image is also trained on"
    assert len(held) == 6  # three whole images; a fourth would pass the 7 rows asked for
    again = split_rows(pa.chunked_array([sources[:50], sources[50:]]), 7, seed=3)  # the arrow column as read
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)
    assert not np.array_equal(split_rows(sources, 7, seed=4)[1], held)
    assert len(split_rows(sources[:9], 16, seed=0)[1]) == 0  # at most a tenth of the rows


def test_keyed_draws_depend_on_identity_not_on_rank_split():
    seeds_whole = sample_seeds(7, micro_batch=3, positions=range(6), stream="noise")
    seeds_split = [sample_seeds(7, 3, range(r * 3, r * 3 + 3), "noise") for r in range(2)]
    assert seeds_split[0] + seeds_split[1] == seeds_whole
    t_whole, n_whole = keyed_timesteps_and_noise(seeds_whole, (4, 8, 8), 1000)
    parts = [keyed_timesteps_and_noise(s, (4, 8, 8), 1000) for s in seeds_split]
    assert torch.equal(torch.cat([p[0] for p in parts]), t_whole)
    assert torch.equal(torch.cat([p[1] for p in parts]), n_whole)
    assert len(set(seeds_whole)) == 6
    assert sample_seeds(7, 4, range(6), "noise") != seeds_whole  # the next micro-batch draws anew
    assert sample_seeds(7, 3, range(6), "caption") != seeds_whole  # streams are independent
    assert t_whole.min() >= 0 and t_whole.max() < 1000


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


def test_tag_weights_from_arrow_equal_the_python_definition():
    import datasets

    from sdxl_ztsnr.tags import scale_tag_weights, tag_factors, tag_frequencies, tag_loss_weights
    from sdxl_ztsnr.train_data import training_tag_frequencies, training_tag_weights

    rng = random.Random(0)
    vocabulary = ["1girl", "solo", "black hair", "outdoors", "smile", "hatsune miku", "masterpiece", "sky"]
    tags = [rng.sample(vocabulary, rng.randint(0, 5)) for _ in range(50)]
    tags[3] = ["solo", "solo", "sky"]  # a tag repeated within one caption counts once
    tags[4] = []
    dataset = datasets.Dataset.from_dict({"tags": tags})
    ids = np.array([i for i in range(50) if i % 7], dtype=np.int64)
    chosen = [tags[i] for i in ids]
    assert training_tag_frequencies(dataset, ids, chunk_rows=9) == tag_frequencies(chosen)
    frequencies = tag_frequencies(chosen)
    raw = training_tag_weights(dataset, ids, tag_factors(frequencies), chunk_rows=9)
    assert raw[list(ids).index(4)] == 1.0
    torch.testing.assert_close(
        scale_tag_weights(raw), tag_loss_weights(chosen, frequencies), rtol=1e-6, atol=0
    )


def test_packed_batch_tensors_come_back_equal_in_dtype_shape_and_value():
    """A worker's batch crosses to the training process as one buffer; every tensor must come back intact."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "latents": torch.randn(3, 4, 5, 7, generator=generator),
        "prompt_embeds": torch.randn(3, 77, 9, generator=generator).half(),  # 2-byte elements, odd sizes
        "target_size": torch.tensor([[128, 96]] * 3),
        "sample_weights": torch.rand(3, generator=generator, dtype=torch.float64),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    buffer, layout = pack_tensors(tensors)
    assert buffer.dtype == torch.uint8 and buffer.ndim == 1
    unpacked = unpack_tensors(buffer, layout)
    assert list(unpacked) == list(tensors)
    for name, tensor in tensors.items():
        assert unpacked[name].dtype == tensor.dtype and unpacked[name].shape == tensor.shape, name
        assert torch.equal(unpacked[name], tensor), name
    # Views of one buffer, not copies; tensors do not overlap.
    assert all(
        t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for t in unpacked.values()
    )
    unpacked["latents"].zero_()
    assert torch.equal(unpack_tensors(buffer, layout)["prompt_embeds"], tensors["prompt_embeds"])
