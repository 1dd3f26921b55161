"""Several sources in training: the sampler's repeats and weights (counted over an epoch, balanced across ranks,
resumable), regularisation rows' loss weight, per-source captions, and the trainer end to end with --data_config
(resumed in the middle of an epoch, it ends with the weights of an unbroken run)."""

import json
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_sdxl_ztsnr
from sdxl_ztsnr.train_data import BucketBatchSampler, SourceCaptions, TrainingRows, source_epoch_counts

BUCKETS = [(64, 64), (64, 128), (128, 64)]


def _rows(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(buckets (rows, 2), source index (rows,)) of sources with ``sizes`` rows in random buckets."""
    rng = random.Random(seed)
    sources = np.repeat(np.arange(len(sizes)), sizes)
    buckets = np.asarray([BUCKETS[rng.randrange(3)] for _ in sources])
    return buckets, sources


def _epoch_counts(sampler: BucketBatchSampler, sources: np.ndarray, epoch: int) -> Counter:
    """How often each source's rows appear in ``epoch``, refill rows excluded (a bucket's last batch)."""
    seen = Counter()
    for batch in sampler.global_batches(epoch):
        seen.update(sources[batch].tolist())
    return seen


def test_repeats_count_each_row_exactly_n_times_per_epoch():
    buckets, sources = _rows([40, 7, 13])
    repeats = [1, 10, 2]
    counts = source_epoch_counts([40, 7, 13], repeats)
    assert counts == [40, 70, 26]
    sampler = BucketBatchSampler(buckets, 4, seed=3, row_sources=sources, epoch_counts=counts)
    for epoch in range(3):
        rows = Counter(row for batch in sampler.global_batches(epoch) for row in batch)
        refill = sampler.batches_per_epoch * 4 - sum(counts)
        assert 0 <= refill < 4 * len(BUCKETS)
        # every row at least its repeats, and only a bucket's refill rows once more
        assert all(rows[r] >= repeats[sources[r]] for r in range(len(sources)))
        assert sum(rows[r] - repeats[sources[r]] for r in range(len(sources))) == refill
    # every batch holds one bucket
    assert all(len({tuple(buckets[r]) for r in batch}) == 1 for batch in sampler.global_batches(0))


def test_weights_give_each_source_its_share_of_the_epoch():
    buckets, sources = _rows([100, 10, 30], seed=1)
    counts = source_epoch_counts([100, 10, 30], [1, 1, 1], weights=[0.5, 0.25, 0.25])
    assert counts == [70, 35, 35] and sum(counts) == 140  # an epoch is one pass over all rows
    sampler = BucketBatchSampler(buckets, 4, seed=0, row_sources=sources, epoch_counts=counts)
    seen = _epoch_counts(sampler, sources, 0)
    for source, expected in enumerate(counts):
        assert abs(seen[source] - expected) < 4 * len(BUCKETS), (source, seen[source], expected)
    # a source sampled below one pass shows different rows each epoch, and all of them over a few epochs
    first = {r for b in sampler.global_batches(0) for r in b if sources[r] == 0}
    second = {r for b in sampler.global_batches(1) for r in b if sources[r] == 0}
    assert first != second
    seen_any = set().union(
        *({r for b in sampler.global_batches(e) for r in b if sources[r] == 0} for e in range(6))
    )
    assert seen_any == set(np.flatnonzero(sources == 0).tolist())
    assert (
        sampler.batches_per_epoch
        == BucketBatchSampler(buckets, 4, seed=9, row_sources=sources, epoch_counts=counts).batches_per_epoch
    )  # fixed per run: a checkpoint's (epoch, batch) means the same on resume


def test_two_ranks_equal_one_rank_and_resume_mid_epoch_with_sources():
    buckets, sources = _rows([30, 5, 9], seed=2)
    counts = source_epoch_counts([30, 5, 9], [1, 4, 2])
    single = BucketBatchSampler(buckets, 6, seed=4, row_sources=sources, epoch_counts=counts)
    ranks = [
        BucketBatchSampler(buckets, 3, seed=4, rank=r, world_size=2, row_sources=sources, epoch_counts=counts)
        for r in range(2)
    ]
    for epoch in range(2):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        assert [a + b for a, b in zip(*(list(r) for r in ranks), strict=True)] == list(single)
    full = list(single)
    resumed = BucketBatchSampler(buckets, 6, seed=4, row_sources=sources, epoch_counts=counts)
    resumed.set_epoch(1, start_batch=5)
    assert list(resumed) == full[5:]


def test_one_source_keeps_the_order_it_had():
    buckets, sources = _rows([37])
    plain = BucketBatchSampler(buckets, 4, seed=5)
    assert plain.global_batches(0) == BucketBatchSampler(buckets, 4, seed=5).global_batches(0)
    assert plain.samples_per_epoch == 37


def test_per_source_captions_lines_and_dropout():
    rows = TrainingRows.__new__(TrainingRows)  # only the caption logic: no dataset
    rows.row_source = np.asarray([0, 1])
    rows.source_captions = [
        SourceCaptions(keep_tokens=1, shuffle=False, tag_dropout=0.0),
        SourceCaptions(keep_tokens=0, shuffle=True, tag_dropout=0.0),
    ]
    tags = ["a", "b", "c", "d"]
    assert rows._caption(tags, "a, b, c, d", 0, random.Random(0)) == "a, b, c, d"  # no shuffle for source 0
    shuffled = {rows._caption(tags, "a, b, c, d", 1, random.Random(s)) for s in range(20)}
    assert len(shuffled) > 1
    picked = {rows._caption(["x", "y"], "x\ny", 0, random.Random(s)) for s in range(20)}
    assert picked == {"x", "y"}  # one line of several, per draw


# --- the trainer, end to end ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state):
    yield


def run(args):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return train_sdxl_ztsnr.main(args)


@pytest.fixture(scope="module")
def data_config(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    images = sorted(p for p in demo_data.iterdir() if p.suffix != ".txt")
    folders = {}
    for name, part in (("main", images[:10]), ("char", images[10:13]), ("reg", images[13:17])):
        folders[name] = root / name
        folders[name].mkdir()
        for image in part:
            shutil.copy(image, folders[name] / image.name)
            shutil.copy(image.with_suffix(".txt"), folders[name] / f"{image.stem}.txt")
    path = root / "datasets.toml"
    path.write_text(
        f"""
[[datasets]]
name = "main"
train_data_dir = "{folders["main"]}"

[[datasets]]
name = "char"
train_data_dir = "{folders["char"]}"
repeats = 3
caption_prefix = "mychar, "

[[datasets]]
name = "reg"
train_data_dir = "{folders["reg"]}"
is_regularisation = true
prior_loss_weight = 0.5
""",
        encoding="utf-8",
    )
    return path


SOURCE_ARGS = ("--resolution", "128", "--bucket_step", "32", "--validation_rows", "0", "--no_single_file")


@pytest.fixture(scope="module")
def unbroken(tiny_sdxl, data_config, trainer_args, tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("sources-run")
    args = trainer_args(
        tiny_sdxl,
        out,
        "--data_config",
        str(data_config),
        "--max_train_steps",
        "4",
        "--no_tag_weighting",
        *SOURCE_ARGS,
    )
    result = train_sdxl_ztsnr.main(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out, result, args


def test_trainer_reads_the_sources_and_reports_them(unbroken, tiny_sdxl):
    out, result, args = unbroken
    assert result["step"] == 4
    config = json.loads((out / "training_config.json").read_text())
    report = {e["name"]: e for e in config["data_sources"]}
    assert {n: (e["rows"], e["samples_per_epoch"], e["skipped"]) for n, e in report.items()} == {
        "main": (10, 10, 0),
        "char": (3, 9, 0),
        "reg": (4, 4, 0),
    }
    # the file a run keeps is accepted back as --config_file
    again = train_sdxl_ztsnr.parse_args(["--config_file", str(out / "training_config.json")])
    assert again.data_config == args.data_config
    # regularisation rows weigh prior_loss_weight, the others 1 (no tag weighting here)
    accelerator = train_sdxl_ztsnr.make_accelerator(args)
    data = train_sdxl_ztsnr.load_training_data(
        args, accelerator, train_sdxl_ztsnr.base_model(args, accelerator)
    )
    names = [data.source_names[s] for s in data.row_source]
    weights = dict(zip(names, data.sample_weights.tolist(), strict=True))
    assert weights == {"main": 1.0, "char": 1.0, "reg": 0.5}
    prompts = data.dataset["prompt"]
    assert all(p.startswith("mychar, ") for p, n in zip(prompts, names, strict=True) if n == "char")
    batches = data.sampler(2, 7).batches_per_epoch
    assert batches > 4 * 1, "the resume test needs step 2 to be in the middle of an epoch"


def test_a_cache_trained_with_an_edited_config_is_refused_naming_the_source(
    unbroken, tiny_sdxl, trainer_args, tmp_path
):
    from sdxl_ztsnr.console import UserError

    out, _, args = unbroken
    edited = tmp_path / "datasets.toml"
    text = open(args.data_config, encoding="utf-8").read()
    edited.write_text(
        text.replace('caption_prefix = "mychar, "', 'caption_prefix = "other, "'), encoding="utf-8"
    )
    again = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(out / "cache"),
        "--data_config",
        str(edited),
        *SOURCE_ARGS,
    )
    accelerator = train_sdxl_ztsnr.make_accelerator(again)
    with pytest.raises(UserError, match=r"source 'char' changed since the cache was made \(caption_prefix\)"):
        train_sdxl_ztsnr.load_training_data(
            again, accelerator, train_sdxl_ztsnr.base_model(again, accelerator)
        )
    # training-time settings may change freely: repeats 3 -> 5
    edited.write_text(text.replace("repeats = 3", "repeats = 5"), encoding="utf-8")
    again = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(out / "cache"),
        "--data_config",
        str(edited),
        *SOURCE_ARGS,
    )
    data = train_sdxl_ztsnr.load_training_data(
        again, accelerator, train_sdxl_ztsnr.base_model(again, accelerator)
    )
    assert data.epoch_counts == [10, 15, 4]


def test_caption_dropout_per_source(unbroken, tiny_sdxl, trainer_args, tmp_path):
    from sdxl_ztsnr.train_data import _BatchReader

    out, _, args = unbroken
    text = open(args.data_config, encoding="utf-8").read()
    edited = tmp_path / "datasets.toml"
    edited.write_text(
        text.replace('caption_prefix = "mychar, "', 'caption_prefix = "mychar, "\ncaption_dropout = 1.0')
    )
    again = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(out / "cache"),
        "--data_config",
        str(edited),
        *SOURCE_ARGS,
    )
    accelerator = train_sdxl_ztsnr.make_accelerator(again)
    data = train_sdxl_ztsnr.load_training_data(
        again, accelerator, train_sdxl_ztsnr.base_model(again, accelerator)
    )
    names = [data.source_names[s] for s in data.row_source[data.train_ids]]
    reader = _BatchReader(data.dataset, data.train_ids, data.pad_chunk, data.sample_weights, with_tags=False)
    dropped = []
    for position in range(len(names)):  # one row a batch: a batch holds one bucket
        batch = data._finish(reader[[position]], torch.device("cpu"), (0, position, [0]))
        dropped.append(bool(batch["pooled_prompt_embeds"].abs().sum() == 0))
    assert dropped == [n == "char" for n in names]  # every char caption dropped, no other


def test_resume_mid_epoch_with_sources_equals_unbroken_run(unbroken, tiny_sdxl, trainer_args, tmp_path):
    out, _, _ = unbroken
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    shutil.copytree(out / "cache", tmp_path / "cache")
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and state["batch_offset"] > 0  # in the middle of the first epoch
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--data_config",
        str(unbroken[2].data_config),
        "--max_train_steps",
        "4",
        "--no_tag_weighting",
        "--resume_from_checkpoint",
        "latest",
        *SOURCE_ARGS,
    )
    assert run(args)["step"] == 4
    resumed = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    unbroken_weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    for key in resumed:
        torch.testing.assert_close(resumed[key], unbroken_weights[key], atol=1e-6, rtol=0)


# --- train_vae.py ------------------------------------------------------------------------------------------------


def test_train_vae_reads_the_sources_with_their_repeats(tiny_sdxl, data_config, tmp_path, caplog):
    import logging

    import train_vae
    from sdxl_ztsnr import vae_data
    from sdxl_ztsnr.data_config import load_data_config

    images = vae_data.SourceImages(load_data_config(data_config))
    assert len(images) == 17 and images.source(10).startswith("char/")
    sources, counts = images.epoch_counts(range(17))
    assert counts == [
        10,
        9,
        4,
    ]  # main once, char × 3, reg once (a VAE trains regularisation images as images)
    caplog.set_level(logging.INFO)
    argv = [
        "--pretrained_vae_model_name_or_path", str(tiny_sdxl / "vae"), "--data_config", str(data_config),
        "--output_dir", str(tmp_path), "--crop_size", "64", "--train_batch_size", "2", "--lpips_net", "alex",
        "--_lpips_random_backbone", "--dataloader_num_workers", "0", "--max_train_steps", "2",
        "--validation_steps", "0", "--validation_images", "2",
    ]  # fmt: skip
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    result = train_vae.main(train_vae.parse_args(argv))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert result["step"] == 2
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source ")]
    assert any(m.startswith("source char:") and m.endswith("samples per epoch") for m in logged), logged
    with pytest.raises(SystemExit):
        train_vae.parse_args([*argv, "--train_data_dir", str(tmp_path)])
