"""One cache for all the sources of a data config: each source is a cache of its own under ``sources/<name>/``
(made, resumed and checked by precompute.precompute exactly as a single-source cache), and the top of the output
directory is the merged view the trainer reads.

Layout of ``output_dir`` (besides the cache files of cache.py, which describe the merged view):
    sources/<name>/              one source's cache (its shards, plan, metadata, skipped.jsonl)
    sources/<name>/source.json   the source's encoding settings and fingerprint, as last precomputed

A source whose encoding settings changed (its folder, columns, caption settings, buckets) is re-encoded alone; a
new source is encoded and merged in without touching the others; repeats, weights, regularisation and the
training-time caption settings change nothing on disk. Rows are in config order, source after source;
``cache_metadata.json`` lists each source's first row and row count (``sources``), so a row's source is known
without reading a column, and each row's ``source`` column reads ``<name>/<path>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdxl_ztsnr import cache
from sdxl_ztsnr.console import UserError, make_output_dir
from sdxl_ztsnr.data_config import DataConfig, SourceConfig
from sdxl_ztsnr.latent_stats import WelfordState, merge_all
from sdxl_ztsnr.tags import load_tag_frequencies, save_tag_frequencies

logger = logging.getLogger(__name__)

SOURCES_DIR = "sources"
SOURCE_FILE = "source.json"
SKIPPED_LISTED = 20  # skipped files named per source in the metadata and training_config.json
BUCKET_KEYS = ("resolution", "bucket_step", "min_bucket_side", "max_bucket_side")
# Settings that may differ between sources (everything else must agree for one merged cache).
PER_SOURCE_SETTINGS = (
    *BUCKET_KEYS,
    "buckets",
    "input_kind",
    "image_column",
    "caption_column",
    "num_inputs",
    "inputs_fingerprint",
    "stream_fingerprint",
    "data_files",
    "num_data_files",
    "world_size",
    "split_strategy",
    "masks",
)


def source_dir(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / SOURCES_DIR / name


def _source_state(source: SourceConfig, inputs) -> dict:
    """What a source's rows depend on besides the models: its encoding settings and its masks (mask files are
    found in its folder, so adding one changes the source without a change to the config)."""
    masks = getattr(inputs, "mask_settings", dict)()
    return {**source.encoding_settings(), "masks": json.loads(json.dumps(masks))}


def _source_changed(directory: Path, state: dict) -> list[str]:
    """What changed in a source since its cache was made ([] for nothing or a new source)."""
    path = directory / SOURCE_FILE
    if not path.is_file():
        return []
    before = cache.read_json(path).get("encoding", {})
    return [f"{k}: {_short(before.get(k))} -> {_short(state[k])}" for k in state if before.get(k) != state[k]]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def source_settings(source: SourceConfig, settings: dict) -> dict:
    """precompute's settings for one source: the command line's, with the source's bucket settings."""
    return {**settings, **{k: getattr(source, k) for k in BUCKET_KEYS if getattr(source, k) is not None}}


def precompute_sources(
    config: DataConfig,
    output_dir: str | os.PathLike,
    run_one: Callable[..., dict],
    open_inputs: Callable[[SourceConfig], object],
    rank: int = 0,
    overwrite: bool = False,
    **settings,
) -> dict:
    """Precompute every source of ``config`` into ``output_dir/sources/<name>`` with ``run_one(inputs, dir,
    overwrite=..., **settings)`` (precompute.precompute bound to the models), then merge them (rank 0).

    Returns {"status", "metadata" (rank 0), "run": summed counts, "sources": {name: precompute's result}}.
    """
    output_dir = make_output_dir(output_dir)
    if rank == 0:
        if overwrite:
            cache.remove_cache(output_dir)
            if (output_dir / SOURCES_DIR).exists():
                shutil.rmtree(output_dir / SOURCES_DIR)
        metadata_path = output_dir / cache.METADATA_FILE
        if metadata_path.is_file() and "sources" not in cache.read_json(metadata_path):
            raise UserError(
                f"{output_dir} holds a single-source cache; pick another --output_dir for --data_config, or pass "
                "--overwrite to rebuild it"
            )
        if (output_dir / cache.SHARDS_DIR).is_dir():
            raise UserError(
                f"{output_dir} holds an unfinished single-source cache (shards/); pick another --output_dir for "
                "--data_config, or pass --overwrite"
            )
    results, run = {}, Counter()
    for source in config:
        directory = source_dir(output_dir, source.name)
        inputs = open_inputs(source)
        changed: list[str] = []
        if rank == 0:
            state = _source_state(source, inputs)
            changed = _source_changed(directory, state)
            if changed:
                logger.info("source %s changed (%s): re-encoding it alone", source.name, "; ".join(changed))
                print(f"source {source.name} changed ({'; '.join(changed)}): re-encoding it", flush=True)
            directory.mkdir(parents=True, exist_ok=True)
            cache.write_json_atomic(
                directory / SOURCE_FILE, {"encoding": state, "fingerprint": source.fingerprint()}
            )
        try:
            result = run_one(inputs, directory, overwrite=bool(changed), **source_settings(source, settings))
        except cache.NoUsableInputsError as error:
            raise cache.NoUsableInputsError(f"source {source.name}: {error}") from None
        results[source.name] = result
        for key, value in result.get("run", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run[key] += value
    out = {"status": "rank done", "metadata": None, "run": dict(run), "sources": results}
    if rank == 0:
        sub = {name: r["metadata"] for name, r in results.items()}
        out["metadata"] = merge_sources(output_dir, config, sub)
        out["status"] = (
            "already complete"
            if all(r["status"] == "already complete" for r in results.values())
            else "complete"
        )
    return out


def merge_sources(output_dir: Path, config: DataConfig, metadata: dict[str, dict]) -> dict:
    """Rank 0: the merged view of the sources' finished caches at the top of ``output_dir`` (state.json,
    dataset_info.json, skipped.jsonl, tag_frequencies.json, pad chunk, and cache_metadata.json last)."""
    output_dir = Path(output_dir)
    (output_dir / cache.METADATA_FILE).unlink(missing_ok=True)  # the old view is no longer finished
    data_files, info, state, first_row = [], None, None, 0
    skipped, frequencies, buckets, stats, entries = [], Counter(), Counter(), [], []
    shared = None
    for source in config:
        directory, meta = source_dir(output_dir, source.name), metadata[source.name]
        settings = {  # a stream's split (stream_*) is its own as well
            k: v
            for k, v in meta["settings"].items()
            if k not in PER_SOURCE_SETTINGS and not k.startswith("stream_")
        }
        if shared is None:
            shared = settings
        else:
            diffs = cache.settings_differences(settings, shared)
            if diffs:
                raise UserError(f"source {source.name} was encoded differently from the others: {diffs[0]}")
        source_state = cache.read_json(directory / "state.json")
        source_info = cache.read_json(directory / "dataset_info.json")
        if info is None:
            info, state = source_info, source_state
        elif source_info.get("features") != info.get("features"):
            raise UserError(
                f"source {source.name}: its cache has other columns than the first source's; rebuild with --overwrite"
            )
        prefix = directory.relative_to(output_dir).as_posix()
        data_files += [{"filename": f"{prefix}/{f['filename']}"} for f in source_state["_data_files"]]
        first_skipped = len(skipped)
        for line in (directory / cache.SKIPPED_FILE).read_text(encoding="utf-8").splitlines():
            if line.strip():
                skipped.append({**json.loads(line), "source_name": source.name})
        skipped_files = [
            _named_path(e["path"], source) for e in skipped[first_skipped : first_skipped + SKIPPED_LISTED]
        ]
        frequencies.update(load_tag_frequencies(directory / cache.TAG_FREQUENCIES_FILE))
        buckets.update(meta["counts"]["buckets"])
        stats.append(WelfordState.from_dict(meta["latent_stats"]))
        counts = meta["counts"]
        entries.append(
            {
                "name": source.name,
                "first_row": first_row,
                "rows": counts["rows"],
                "inputs": counts["inputs"],
                "skipped": counts["skipped"],
                "skipped_by_kind": counts["skipped_by_kind"],
                "skipped_files": skipped_files,  # the first SKIPPED_LISTED; all of them in skipped.jsonl
                "resolution": meta["settings"]["resolution"],
                "fingerprint": source.fingerprint(),
                "config": source.as_dict(),
            }
        )
        first_row += counts["rows"]
    digest = hashlib.sha256(json.dumps([(e["name"], e["fingerprint"]) for e in entries]).encode("utf-8"))
    fingerprint = digest.hexdigest()[:16]
    state = {**state, "_data_files": data_files, "_fingerprint": fingerprint, "_split": None}
    cache.write_json_atomic(output_dir / "dataset_info.json", info)
    cache.write_json_atomic(output_dir / "state.json", state)
    tmp = output_dir / (cache.SKIPPED_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in skipped), encoding="utf-8")
    os.replace(tmp, output_dir / cache.SKIPPED_FILE)
    tmp = output_dir / (cache.TAG_FREQUENCIES_FILE + ".tmp")
    save_tag_frequencies(tmp, dict(frequencies))
    os.replace(tmp, output_dir / cache.TAG_FREQUENCIES_FILE)
    first = source_dir(output_dir, config.sources[0].name)
    if (first / cache.PAD_CHUNK_FILE).is_file():
        shutil.copyfile(first / cache.PAD_CHUNK_FILE, output_dir / cache.PAD_CHUNK_FILE)
    merged = merge_all(stats)
    resolutions = {e["resolution"] for e in entries}
    all_buckets = sorted({tuple(b) for name in metadata for b in metadata[name]["settings"]["buckets"]})
    settings = {
        **shared,
        "resolution": resolutions.pop() if len(resolutions) == 1 else None,
        "buckets": [list(b) for b in all_buckets],
        "input_kind": "data_config",
        "inputs_fingerprint": fingerprint,
    }
    by_kind = Counter()
    for e in entries:
        by_kind.update(e["skipped_by_kind"])
    first_meta = metadata[config.sources[0].name]
    result = {
        "format_version": cache.FORMAT_VERSION,
        "settings": settings,
        "model": first_meta.get("model", {}),
        "input": {"data_config": config.path, "sources": [e["name"] for e in entries]},
        "sources": entries,
        "counts": {
            "inputs": sum(e["inputs"] for e in entries),
            "rows": first_row,
            "skipped": sum(e["skipped"] for e in entries),
            "skipped_by_kind": dict(by_kind.most_common()),
            "upscaled": sum(metadata[e["name"]]["counts"]["upscaled"] for e in entries),
            "truncated_prompts": sum(metadata[e["name"]]["counts"]["truncated_prompts"] for e in entries),
            "masked": sum(metadata[e["name"]]["counts"].get("masked", 0) for e in entries),
            "buckets": dict(buckets.most_common()),
            "shards": sum(metadata[e["name"]]["counts"]["shards"] for e in entries),
        },
        "latents_mean": merged.mean.tolist(),
        "latents_std": merged.std().tolist(),
        "latent_stats": merged.to_dict(),
        "pad_chunk": cache.PAD_CHUNK_FILE if (output_dir / cache.PAD_CHUNK_FILE).is_file() else None,
        "created": first_meta.get("created"),
    }
    stale = sorted(
        p.name for p in (output_dir / SOURCES_DIR).iterdir() if p.is_dir() and p.name not in config.by_name()
    )
    if stale:
        print(
            f"not in the data config, left on disk and not trained on: sources {', '.join(stale)}", flush=True
        )
    cache.write_json_atomic(output_dir / cache.METADATA_FILE, result)
    return result


def _named_path(path: str, source: SourceConfig) -> str:
    """A skipped file as ``<name>/<path under the source's folder>``: reports that may be published (the model
    card's training_config.json) name no folder of this machine."""
    if source.train_data_dir:
        try:
            return f"{source.name}/{Path(path).relative_to(source.train_data_dir).as_posix()}"
        except ValueError:
            pass
    return path if path.startswith(f"{source.name}/") else f"{source.name}/{Path(path).name}"


def row_sources(metadata: dict, num_rows: int) -> tuple[list[str], np.ndarray]:
    """(source names, (rows,) int32 index of each row's source) of a cache; one source "" for a plain cache."""
    entries = metadata.get("sources")
    if not entries:
        return [""], np.zeros(num_rows, dtype=np.int32)
    names = [e["name"] for e in entries]
    counts = np.asarray([e["rows"] for e in entries], dtype=np.int64)
    if counts.sum() != num_rows:
        raise UserError(
            f"the cache lists {counts.sum()} rows over its sources but holds {num_rows}; rebuild it"
        )
    return names, np.repeat(np.arange(len(names), dtype=np.int32), counts)


def source_summary(metadata: dict) -> list[dict]:
    """Per-source counts as the logs and training_config.json report them."""
    return [
        {
            "name": e["name"],
            "rows": e["rows"],
            "inputs": e["inputs"],
            "skipped": e["skipped"],
            "skipped_by_kind": e["skipped_by_kind"],
            "skipped_files": e.get("skipped_files", []),
        }
        for e in metadata.get("sources", [])
    ]
