"""Data at 12M-image scale: what a cache row costs on disk, what the trainer's data path costs in memory as the
cache grows, and how many rows per second it delivers. Prints three tables.

    python benchmarks/data_scale.py                           # all three, ~5 min on a 2-core CPU
    python benchmarks/data_scale.py --parts memory --rows 1000 100000 1000000
    python benchmarks/data_scale.py --parts sources          # 3 sources vs 1 of the same total rows

1. bytes per row at 1024² in both cache modes, from arrow files written by the cache's own writer (and the
   parquet `--push_to_hub` uploads): cached text (latents (4, 128, 128) + prompt_embeds (77·k, 2048) +
   pooled (1280,), fp16) for k = 1..3 chunks, and --text_online (latents + tags); × 12M images.
2. resident memory of the trainer's data path over synthetic caches of each --rows size, each measured in a
   fresh process, stage by stage: open the cache, split_rows, TrainingRows, tag lists and weights (as the
   training script builds them), BucketBatchSampler, then --batches batches through TrainingRows.stream.
   Rows are small (--latent_side, --embed_dim) so a 100k-row cache builds in seconds; the per-row Python
   objects, which are what could grow, are the same as at 1024². Private memory (RssAnon) is what matters;
   file-backed pages of the memory-mapped arrow files (RssFile) are page cache the kernel reclaims.
3. rows/s of TrainingRows.stream at 1024² (real shapes) with 0..--max_workers DataLoader workers, against
   ≈ 10 samples/s that one H200 trains at 1024² (DESIGN.md's anchors: 8.95-12.2 samples/s eager).
   On the CPU device the fp16 -> fp32 conversion of prompt embeddings runs on the CPU too (on a GPU it runs
   there): these numbers are a lower bound.
4. (--parts sources) 3 sources against 1 source of the same total: precompute throughput (the tiny SDXL on the
   CPU over --source_images demo images; 1 source through precompute as before, 3 through a data config's
   precompute_sources) and the trainer's data-path memory (part 2's probe over a --source_rows synthetic cache,
   merged from 3 source caches with repeats and a regularisation source, against one cache), alternating.

`write_synthetic_cache` builds a real cache directory (shards, merge, metadata, tag frequencies, pad chunk)
through sdxl_ztsnr.cache, so load_cache/open_cache and the trainer read it as any other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_ztsnr import cache  # noqa: E402
from sdxl_ztsnr.latent_stats import WelfordState, welford_update  # noqa: E402
from sdxl_ztsnr.tags import tag_frequencies  # noqa: E402
from sdxl_ztsnr.text_encoding import CHUNK_LENGTH  # noqa: E402

SDXL_EMBED_DIM, SDXL_POOLED_DIM = 2048, 1280  # CLIP ViT-L (768) + bigG (1280) penultimate states; bigG pooled
BUCKETS = ((1024, 1024), (832, 1216), (1216, 832), (896, 1152), (1152, 896), (768, 1344))  # (height, width)
GPU_SAMPLES_PER_S = (
    10.0  # one H200 at 1024² (DESIGN.md: 8.95 diffusers-style, 10.4-12.2 eager, 15.3 compiled)
)
IMAGES_AT_SCALE = 12_000_000


def synthetic_rows(
    start: int,
    count: int,
    latent_side: int | None,
    embed_dim: int | None,
    chunks: int = 1,
    tags_per_row: int = 25,
    vocabulary: int = 20_000,
    seed: int = 0,
    prefix: str = "",
) -> list[dict]:
    """Cache rows start .. start+count−1: random fp16 latents (4, s, s) (s = bucket/8 when latent_side is None),
    prompt_embeds (77·chunks, embed_dim) and pooled (1280,) unless embed_dim is None (--text_online), buckets
    cycled through SDXL's common ones, `tags_per_row` Zipf-distributed tags (anime captions hold ~20-40)."""
    rng = np.random.default_rng([seed, start])
    ranks = np.minimum(rng.zipf(1.3, size=(count, tags_per_row)), vocabulary) - 1
    rows = []
    for offset in range(count):
        index = start + offset
        bucket = BUCKETS[index % len(BUCKETS)]
        h, w = (latent_side, latent_side) if latent_side else (bucket[0] // 8, bucket[1] // 8)
        row = {
            "latents": rng.standard_normal((4, h, w), dtype=np.float32).astype(np.float16),
            "original_size": list(bucket),
            "crop_top_left": [0, 0],
            "target_size": list(bucket),
            "bucket": list(bucket),
            "tags": [f"tag_{t:05d}" for t in dict.fromkeys(ranks[offset].tolist())],
            "source": f"{prefix}images/{index:08d}.jpg",
            "flipped": False,
        }
        row["prompt"] = ", ".join(row["tags"])
        if embed_dim is not None:
            row["prompt_embeds"] = rng.standard_normal((CHUNK_LENGTH * chunks, embed_dim), np.float32).astype(
                np.float16
            )
            row["pooled_prompt_embeds"] = rng.standard_normal(SDXL_POOLED_DIM, np.float32).astype(np.float16)
        rows.append(row)
    return rows


def write_synthetic_cache(
    out_dir: Path,
    num_rows: int,
    latent_side: int | None = 8,
    embed_dim: int | None = None,
    chunks: int = 1,
    shard_rows: int = 10_000,
    seed: int = 0,
    prefix: str = "",
) -> Path:
    """A finished cache directory of `num_rows` synthetic rows written through sdxl_ztsnr.cache (write_shard,
    finalize_cache); embed_dim None makes a --text_online cache."""
    out_dir = Path(out_dir)
    num_shards = -(-num_rows // shard_rows)
    features = cache.cache_features(4, embed_dim, None if embed_dim is None else SDXL_POOLED_DIM)
    settings = {
        "format_version": cache.FORMAT_VERSION,
        "text_online": embed_dim is None,
        "max_token_chunks": chunks,
        "resolution": 1024,
        "buckets": [list(b) for b in BUCKETS],
        "input_kind": "synthetic",
        "inputs_fingerprint": f"synthetic-{num_rows}-{latent_side}-{embed_dim}-{chunks}-{seed}-{prefix}",
        "shard_size": shard_rows,
    }
    cache.check_or_start(out_dir, settings)
    for shard in range(num_shards):
        start = shard * shard_rows
        rows = synthetic_rows(
            start, min(shard_rows, num_rows - start), latent_side, embed_dim, chunks, seed=seed, prefix=prefix
        )
        welford = WelfordState.empty(4)
        for row in rows[:64]:  # a sample is enough for statistics nobody reads here
            welford = welford_update(welford, torch.from_numpy(row["latents"]).float()[None])
        summary = {
            "index": shard,
            "inputs": len(rows),
            "rows": len(rows),
            "skipped": [],
            "tag_counts": tag_frequencies(r["tags"] for r in rows),
            "welford": welford.to_dict(),
            "buckets": dict(Counter(f"{r['bucket'][0]}x{r['bucket'][1]}" for r in rows)),
            "upscaled": 0,
            "truncated_prompts": 0,
        }
        cache.write_shard(out_dir, shard, rows, features, summary)
    pad_chunk = None if embed_dim is None else torch.zeros(CHUNK_LENGTH, embed_dim, dtype=torch.float16)
    cache.finalize_cache(out_dir, settings, num_shards, pad_chunk, {"input": {"synthetic": num_rows}})
    return out_dir


def arrow_bytes(cache_dir: Path) -> int:
    """Bytes of the arrow data files of a cache (what the trainer memory-maps)."""
    return sum(p.stat().st_size for p in Path(cache_dir, cache.SHARDS_DIR).rglob("*.arrow"))


# --- 1. bytes per row ---------------------------------------------------------------------------------------


def measure_bytes(workdir: Path, rows: int) -> list[dict]:
    """Bytes per row at 1024² (square bucket: latents (4, 128, 128)) for --text_online and k = 1..3 chunks."""
    results = []
    for mode, embed_dim, chunks in (
        ("text_online", None, 1),
        *(("cached text", SDXL_EMBED_DIM, k) for k in (1, 2, 3)),
    ):
        directory = workdir / f"bytes-{mode.replace(' ', '_')}-{chunks}"
        write_synthetic_cache(directory, rows, latent_side=128, embed_dim=embed_dim, chunks=chunks)
        staged = workdir / f"{directory.name}-hub"
        cache.stage_for_hub(directory, staged)
        parquet = sum(p.stat().st_size for p in (staged / "data").glob("*.parquet"))
        per_row = arrow_bytes(directory) / rows
        results.append(
            dict(
                what="bytes_per_row",
                mode=mode,
                chunks=chunks if embed_dim else 0,
                arrow_bytes_per_row=per_row,
                parquet_bytes_per_row=parquet / rows,
                tensor_bytes_per_row=2
                * (4 * 128 * 128 + (CHUNK_LENGTH * chunks * SDXL_EMBED_DIM + 1280 if embed_dim else 0)),
                disk_12M_TB=per_row * IMAGES_AT_SCALE / 1e12,
            )
        )
        shutil.rmtree(directory)
        shutil.rmtree(staged)
    return results


# --- 2. resident memory -------------------------------------------------------------------------------------


def memory_now() -> dict:
    """Resident memory of this process in MiB: total, private (anonymous), file-backed (mapped files), and the
    peak total so far (VmHWM)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[name] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def memory_probe(cache_dir: str, batches: int, num_workers: int) -> list[dict]:
    """The trainer's data path stage by stage, resident memory after each (run in a fresh process)."""
    from sdxl_ztsnr.tags import load_tag_frequencies, scale_tag_weights, tag_factors
    from sdxl_ztsnr.train_data import TrainingRows, split_rows, training_tag_weights

    stages = []

    def record(stage: str) -> None:
        gc.collect()
        stages.append({"stage": stage, **memory_now()})

    record("imports")
    dataset, metadata, side_files = cache.open_cache(cache_dir)
    record("open_cache")
    train_ids, validation_ids = split_rows(dataset.with_format("arrow")["source"], 64, seed=0)
    record("split_rows")
    # The training script's tag weighting (train_sdxl_ztsnr.load_training_data), on the same rows: tags are
    # read from arrow a chunk at a time and weighted with numpy.
    frequencies = load_tag_frequencies(side_files / cache.TAG_FREQUENCIES_FILE)
    weights = torch.ones(len(dataset))
    raw = training_tag_weights(dataset, train_ids, tag_factors(frequencies))
    weights[torch.from_numpy(train_ids)] = scale_tag_weights(raw)
    record("tag weights")
    pad_chunk = cache.load_pad_chunk(side_files)
    encode = None
    if pad_chunk is None:  # --text_online: stand-in for the text encoders (GPU work, not the data path)
        encode = lambda prompts: (torch.zeros(len(prompts), 77, 16), torch.zeros(len(prompts), 16))  # noqa: E731
    data = TrainingRows(
        dataset,
        metadata,
        train_ids,
        validation_ids,
        weights,
        pad_chunk,
        encode=encode,
        num_workers=num_workers,
    )
    if metadata.get("sources"):  # what open_training_rows adds for a cache of several sources
        from sdxl_ztsnr.source_cache import row_sources
        from sdxl_ztsnr.train_data import SourceCaptions, source_epoch_counts

        data.source_names, data.row_source = row_sources(metadata, len(dataset))
        data.source_captions = [SourceCaptions() for _ in data.source_names]
        repeats = [e["config"]["repeats"] for e in metadata["sources"]]
        data.epoch_counts = source_epoch_counts(data.source_row_counts(), repeats)
        loss = torch.tensor([0.5 if e["config"]["is_regularisation"] else 1.0 for e in metadata["sources"]])
        data.sample_weights = weights * loss[torch.from_numpy(data.row_source.astype(np.int64))]
    record("TrainingRows")
    sampler = data.sampler(4, seed=0)
    record("BucketBatchSampler")
    seen = 0
    for _ in data.stream(sampler, torch.device("cpu"), seed=0):
        seen += 1
        if seen == batches:
            break
    record(f"loader, {seen} batches")
    return stages


def measure_memory(
    workdir: Path, sizes: list[int], latent_side: int, embed_dim: int | None, batches: int, workers: int
):
    results = []
    for rows in sizes:
        directory = workdir / f"memory-{rows}"
        start = time.perf_counter()
        write_synthetic_cache(directory, rows, latent_side=latent_side, embed_dim=embed_dim)
        built = time.perf_counter() - start
        command = [sys.executable, __file__, "--_memory_probe", str(directory), "--batches", str(batches)]
        command += ["--max_workers", str(workers)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        stages = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(
            dict(
                what="memory",
                rows=rows,
                build_s=built,
                arrow_MiB=arrow_bytes(directory) / 2**20,
                stages=stages,
            )
        )
        shutil.rmtree(directory)
    return results


# --- 4. several sources against one of the same total rows ----------------------------------------------------


def write_synthetic_sources(
    out_dir: Path, rows: int, parts: int, latent_side: int, embed_dim: int | None
) -> Path:
    """A --data_config cache of `parts` synthetic sources (rows split evenly; the last one a regularisation
    source, one repeats 2) merged by source_cache.merge_sources, as precompute leaves it."""
    from sdxl_ztsnr.data_config import DataConfig, SourceConfig
    from sdxl_ztsnr.source_cache import merge_sources, source_dir

    sizes = [rows // parts + (i < rows % parts) for i in range(parts)]
    sources = tuple(
        SourceConfig(
            name=f"s{i}",
            train_data_dir=f"synthetic/s{i}",
            repeats=2 if i == 1 else 1,
            is_regularisation=parts > 1 and i == parts - 1,
            prior_loss_weight=0.5,
        )
        for i in range(parts)
    )
    metadata = {}
    for source, size in zip(sources, sizes, strict=True):
        directory = write_synthetic_cache(
            source_dir(out_dir, source.name), size, latent_side, embed_dim, prefix=f"{source.name}/"
        )
        metadata[source.name] = cache.read_json(directory / cache.METADATA_FILE)
    merge_sources(out_dir, DataConfig("synthetic.toml", sources), metadata)
    return out_dir


def precompute_images(root: Path, count: int, parts: int) -> list[Path]:
    """`count` demo images (with captions) split over `parts` folders."""
    from sdxl_ztsnr.demo_data import write_demo_dataset

    every = root / "all"
    if not every.is_dir():
        write_demo_dataset(every, n=count, seed=0)
    images = sorted(p for p in every.iterdir() if p.suffix != ".txt")
    folders = []
    for i in range(parts):
        folder = root / f"{parts}-sources" / f"s{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for image in images[i::parts]:
            for path in (image, image.with_suffix(".txt")):
                if not (folder / path.name).exists():
                    os.link(path, folder / path.name)
        folders.append(folder)
    return folders


def measure_sources(workdir: Path, images: int, rows: int, repeats: int, latent_side: int, batches: int):
    """Precompute throughput (tiny SDXL on the CPU, demo images) and the trainer's data-path memory (synthetic
    caches, fresh processes) of 3 sources against 1 source with the same total, alternating, `repeats` times."""
    import datasets

    from sdxl_ztsnr import precompute
    from sdxl_ztsnr.data_config import DataConfig, SourceConfig
    from sdxl_ztsnr.inputs import FolderInputs
    from sdxl_ztsnr.source_cache import precompute_sources
    from sdxl_ztsnr.source_inputs import open_source
    from sdxl_ztsnr.text_encoding import load_text_encoders
    from sdxl_ztsnr.tiny import build_tiny_sdxl

    datasets.disable_progress_bars()  # as precompute_run does: save_to_disk's per-shard bars are noise
    model = build_tiny_sdxl(workdir / "tiny", seed=0)
    models = (precompute.load_vae(str(model)), *load_text_encoders(model))
    settings = dict(resolution=128, bucket_step=32, shard_size=64, progress=False, num_workers=0)
    folders = {parts: precompute_images(workdir / "images", images, parts) for parts in (1, 3)}
    results = []
    for attempt in range(repeats):
        for parts in (1, 3) if attempt % 2 == 0 else (3, 1):
            out = workdir / f"precompute-{parts}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            if parts == 1:  # the single-source path as it was: no data config
                done = precompute.precompute(FolderInputs(folders[1][0]), out, *models, **settings)
            else:
                config = DataConfig("bench.toml", tuple(SourceConfig(f.name, str(f)) for f in folders[parts]))
                done = precompute_sources(
                    config,
                    out,
                    lambda inputs, d, **kw: precompute.precompute(inputs, d, *models, **kw),
                    open_source,
                    **settings,
                )
            seconds = time.perf_counter() - start
            rows_done = done["metadata"]["counts"]["rows"]
            results.append(dict(what="sources_precompute", sources=parts, images=rows_done, seconds=seconds,
                                images_per_s=rows_done / seconds))  # fmt: skip
    for attempt in range(repeats):
        for parts in (1, 3) if attempt % 2 == 0 else (3, 1):
            directory = workdir / f"memory-sources-{parts}"
            shutil.rmtree(directory, ignore_errors=True)
            write_synthetic_sources(directory, rows, parts, latent_side, None)
            command = [sys.executable, __file__, "--_memory_probe", str(directory), "--batches", str(batches)]
            done = subprocess.run(
                command + ["--max_workers", "0"], capture_output=True, text=True, check=True
            )
            stages = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(dict(what="sources_memory", sources=parts, rows=rows, stages=stages))
            shutil.rmtree(directory)
    return results


def print_sources(results: list[dict]) -> None:
    def median(values):
        return float(np.median(values))

    pre = {p: [r for r in results if r["what"] == "sources_precompute" and r["sources"] == p] for p in (1, 3)}
    mem = {p: [r for r in results if r["what"] == "sources_memory" and r["sources"] == p] for p in (1, 3)}
    print("\n3 sources against 1 source of the same total (median of the runs; ratio = 3 / 1)")
    print(f"{'measure':<52}{'1 source':>10}{'3 sources':>11}{'ratio':>8}   runs (1 | 3)")

    def line(label: str, ones: list[float], threes: list[float]) -> None:
        a, b = median(ones), median(threes)
        runs = f"{' '.join(f'{v:.2f}' for v in ones)} | {' '.join(f'{v:.2f}' for v in threes)}"
        print(f"{label:<52}{a:>10.2f}{b:>11.2f}{b / a:>8.3f}   {runs}")

    images = pre[1][0]["images"]
    line(
        f"precompute, images/s ({images} images, tiny SDXL, CPU)",
        [r["images_per_s"] for r in pre[1]],
        [r["images_per_s"] for r in pre[3]],
    )
    rows = mem[1][0]["rows"]
    for key, label in (("RssAnon", "private"), ("VmHWM", "peak resident")):
        line(
            f"trainer data path, {label} MiB ({rows} rows)",
            [r["stages"][-1][key] for r in mem[1]],
            [r["stages"][-1][key] for r in mem[3]],
        )


# --- 3. rows per second -------------------------------------------------------------------------------------


def measure_throughput(
    workdir: Path, rows: int, max_workers: int, batches: int, batch_size: int
) -> list[dict]:
    """Rows/s of TrainingRows.stream on 1024²-shaped caches (both modes), 0..max_workers workers."""
    from sdxl_ztsnr.train_data import BucketBatchSampler, TrainingRows, split_rows

    results = []
    for mode, embed_dim in (("cached text", SDXL_EMBED_DIM), ("text_online", None)):
        directory = workdir / f"throughput-{mode.replace(' ', '_')}"
        write_synthetic_cache(directory, rows, latent_side=None, embed_dim=embed_dim, shard_rows=256)
        dataset, metadata, side_files = cache.open_cache(directory)
        train_ids, validation_ids = split_rows(dataset.with_format("arrow")["source"], 0, seed=0)
        pad_chunk = cache.load_pad_chunk(side_files)
        encode = None
        if embed_dim is None:  # the text encoders run on the GPU; the data path hands them the tags

            def encode(prompts):
                return torch.zeros(len(prompts), 77, SDXL_EMBED_DIM), torch.zeros(
                    len(prompts), SDXL_POOLED_DIM
                )

        for workers in range(max_workers + 1):
            data = TrainingRows(
                dataset, metadata, train_ids, validation_ids, torch.ones(len(dataset)), pad_chunk,
                encode=encode, num_workers=workers,
            )  # fmt: skip
            sampler = BucketBatchSampler(data.train_buckets, batch_size, seed=0, rank=0, world_size=1)
            seen, start = 0, None
            for _ in data.stream(sampler, torch.device("cpu"), seed=0):  # epoch after epoch
                seen += 1
                if seen == 2:  # workers started, first batches in flight: start the clock
                    start = time.perf_counter()
                if seen == batches + 2:
                    break
            seconds = time.perf_counter() - start
            rate = batches * batch_size / seconds
            results.append(
                dict(what="throughput", mode=mode, workers=workers, batch=batch_size, rows_per_s=rate,
                     gpu_ratio=rate / GPU_SAMPLES_PER_S)
            )  # fmt: skip
            del data
        shutil.rmtree(directory)
    return results


# --- report -------------------------------------------------------------------------------------------------


def print_bytes(results: list[dict]) -> None:
    print(
        "\nBytes per cache row at 1024² (square bucket), measured from arrow files; 12M images, no flip copies"
    )
    print(
        f"{'mode':<13} {'chunks':>6} {'tensors KiB':>12} {'arrow KiB':>10} {'parquet KiB':>12} {'12M rows TB':>12}"
    )
    for r in results:
        print(
            f"{r['mode']:<13} {r['chunks'] or '-':>6} {r['tensor_bytes_per_row'] / 1024:>12.1f} "
            f"{r['arrow_bytes_per_row'] / 1024:>10.1f} {r['parquet_bytes_per_row'] / 1024:>12.1f} {r['disk_12M_TB']:>12.2f}"
        )


def print_memory(results: list[dict]) -> None:
    print("\nResident memory of the trainer's data path (MiB; each size in a fresh process)")
    stages = [s["stage"] for s in results[0]["stages"]]
    header = "".join(f"{str(r['rows']) + ' rows: anon':>18}{'file':>8}{'peak':>8}" for r in results)
    print(f"{'stage':<26}{header}")
    for i, stage in enumerate(stages):
        cells = "".join(
            f"{r['stages'][i]['RssAnon']:>18.1f}{r['stages'][i]['RssFile']:>8.1f}{r['stages'][i]['VmHWM']:>8.1f}"
            for r in results
        )
        print(f"{stage:<26}{cells}")
    small, *larger = results
    scale = f"at {IMAGES_AT_SCALE // 10**6}M rows"
    for big in larger:
        rows = big["rows"] - small["rows"]
        for what, key in (("private memory", "RssAnon"), ("peak resident", "VmHWM")):
            a, b = small["stages"][-1][key], big["stages"][-1][key]
            per_row = (b - a) * 2**20 / rows
            print(
                f"{big['rows']} vs {small['rows']} rows, {what}: {b / a - 1:+.1%} (goal within 10%); "
                f"{per_row:.0f} B per row -> {per_row * IMAGES_AT_SCALE / 2**30:.1f} GiB {scale}"
            )


def print_throughput(results: list[dict]) -> None:
    print(
        f"\nRows/s of TrainingRows.stream at 1024² on the CPU device, against {GPU_SAMPLES_PER_S:g} samples/s per GPU"
    )
    print(f"{'mode':<13} {'workers':>7} {'batch':>5} {'rows/s':>8} {'× one GPU':>10}")
    for r in results:
        print(
            f"{r['mode']:<13} {r['workers']:>7} {r['batch']:>5} {r['rows_per_s']:>8.1f} {r['gpu_ratio']:>10.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["bytes", "memory", "throughput", "sources"],
        default=["bytes", "memory", "throughput"],
    )
    parser.add_argument("--source_images", type=int, default=96, help="sources: images precomputed per run")
    parser.add_argument("--source_rows", type=int, default=30_000, help="sources: rows of the memory caches")
    parser.add_argument("--source_repeats", type=int, default=3, help="sources: runs of each, alternating")
    parser.add_argument("--rows", nargs="+", type=int, default=[1000, 100_000], help="cache sizes for memory")
    parser.add_argument("--latent_side", type=int, default=8, help="memory caches: latents (4, s, s)")
    parser.add_argument(
        "--embed_dim", type=int, default=0, help="memory caches: prompt_embeds width; 0 = text_online"
    )
    parser.add_argument(
        "--batches", type=int, default=200, help="batches read (memory: per size; throughput: timed)"
    )
    parser.add_argument("--max_workers", type=int, default=2, help="throughput with 0..N DataLoader workers")
    parser.add_argument(
        "--throughput_rows", type=int, default=256, help="rows of each 1024² throughput cache"
    )
    parser.add_argument(
        "--bytes_rows", type=int, default=64, help="rows of each 1024² cache for bytes per row"
    )
    parser.add_argument("--workdir", help="where the synthetic caches go (default: a temporary folder)")
    parser.add_argument("--json", help="append one JSON line per measurement to this file")
    parser.add_argument("--_memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args._memory_probe:
        print(json.dumps(memory_probe(args._memory_probe, args.batches, args.max_workers)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; synthetic caches in {workdir}", flush=True)
    results = []
    try:
        if "bytes" in args.parts:
            results += measure_bytes(workdir, args.bytes_rows)
            print_bytes([r for r in results if r["what"] == "bytes_per_row"])
        if "memory" in args.parts:
            embed_dim = args.embed_dim or None
            memory = measure_memory(workdir, args.rows, args.latent_side, embed_dim, args.batches, 0)
            results += memory
            print_memory(memory)
        if "sources" in args.parts:
            sources = measure_sources(
                workdir,
                args.source_images,
                args.source_rows,
                args.source_repeats,
                args.latent_side,
                args.batches,
            )
            results += sources
            print_sources(sources)
        if "throughput" in args.parts:
            speed = measure_throughput(workdir, args.throughput_rows, args.max_workers, args.batches, 4)
            results += speed
            print_throughput(speed)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as out:
            for r in results:
                out.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
