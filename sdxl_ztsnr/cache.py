"""The precompute cache on disk: a Hugging Face `datasets` directory that `datasets.load_from_disk` opens as
one Dataset, built from crash-safe shards, plus its metadata, skipped-input log, tag frequencies and the
empty-chunk embedding that pads prompts.

Layout of `output_dir`:
    shards/plan.json                 settings + input fingerprint the shards were made under (resume check)
    shards/shard-00007/              one finished shard: a save_to_disk dataset + shard.json (its skipped
                                     inputs, tag counts, Welford state; for a stream also where the stream
                                     stood after it and whether it was its rank's last); written as
                                     shard-00007.tmp, renamed
    state.json, dataset_info.json    the merged Dataset; its arrow files stay in shards/ (no copy at merge)
    cache_metadata.json              written last: its presence marks a finished cache
    skipped.jsonl, tag_frequencies.json, pad_chunk.safetensors

Columns (fp16 tensors as nested lists, so any datasets formatter returns them in shape):
    latents (4, H/8, W/8) VAE latent mean × scaling_factor; prompt_embeds (77·k, C) with k the row's own
    chunk count; pooled_prompt_embeds (P,); original_size, crop_top_left, target_size, bucket as
    [height, width]; tags list[str]; prompt str (the text encoded); source str (the image path relative to
    the data folder, "dataset_name[index]", or for a stream "<tar>/<key>" or "dataset_name[r<rank>:<i>]");
    flipped bool; mask (h, w) uint8 latent-size loss weights (masks.py), null for a row without a mask, and
    only in a cache made from a folder with masks (older caches and mask-less ones lack the column and still
    load: the format version is unchanged, the settings record the masks under "masks").
Nested lists of fixed rank keep every column a plain arrow type (parquet, polars and the Hub viewer read
it). datasets' torch formatter turns a 1024², 3-chunk row into float32 tensors in ~15 ms; `rows_as_tensors`
reads the same rows straight from arrow as fp16 in ~1 ms (the fast path for training).
A --data_config cache holds one such cache per source under sources/<name>/ and the merged view on top (see
source_cache.py). Several ranks (and several nodes) must see the same output_dir (shared filesystem); the merged dataset
reads its data from shards/, so move or copy the directory whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.latent_stats import WelfordState, merge_all
from sdxl_ztsnr.tags import save_tag_frequencies
from sdxl_ztsnr.text_encoding import config_hash

FORMAT_VERSION = 1
METADATA_FILE = "cache_metadata.json"
SKIPPED_FILE = "skipped.jsonl"
TAG_FREQUENCIES_FILE = "tag_frequencies.json"
PAD_CHUNK_FILE = "pad_chunk.safetensors"
SHARDS_DIR = "shards"
PLAN_FILE = "plan.json"
SHARD_SUMMARY_FILE = "shard.json"
# Files a cache consists of; --overwrite removes these and nothing else from output_dir.
CACHE_FILES = (
    METADATA_FILE,
    SKIPPED_FILE,
    TAG_FREQUENCIES_FILE,
    PAD_CHUNK_FILE,
    "state.json",
    "dataset_info.json",
)
SIZE_COLUMNS = ("original_size", "crop_top_left", "target_size", "bucket")


def skip_kind(reason: str) -> str:
    """Short category of a skip reason, for the summary (paths in the reason are ignored)."""
    text = re.sub(r"\S*[/\\]\S*", "<path>", reason).lower()
    for needle, kind in (
        ("mask", "bad mask"),  # first: a bad mask file's reason also says why its decode failed
        ("0 bytes", "empty file"),
        ("decompression bomb", "decompression bomb"),
        ("missing caption", "missing caption"),
        ("empty caption", "empty caption"),
        ("utf-8", "caption not UTF-8"),
        ("min_image_side", "too small"),
        ("non-finite", "non-finite latents"),
        ("truncated", "corrupt image"),
        ("cannot decode", "corrupt image"),
        ("not an image", "not an image"),
        ("image header", "not an image"),
    ):
        if needle in text:
            return kind
    return "other"


def model_identity(vae: torch.nn.Module, text_encoders: Sequence[torch.nn.Module] | None) -> dict:
    """What the cache depends on in the models: config hashes and weight fingerprints (cache settings keys)."""
    identity = {
        "vae_config_hash": config_hash(vae.config),
        "vae_fingerprint": getattr(vae, "weights_fingerprint", None),
        "text_encoder_config_hashes": None,
        "text_encoder_fingerprints": None,
    }
    if text_encoders:
        identity["text_encoder_config_hashes"] = [config_hash(e.config.to_dict()) for e in text_encoders]
        identity["text_encoder_fingerprints"] = [
            getattr(e, "weights_fingerprint", None) for e in text_encoders
        ]
    return identity


def cache_features(
    latent_channels: int, embed_dim: int | None, pooled_dim: int | None, masks: bool = False
) -> datasets.Features:
    """Column types; embed_dim/pooled_dim None leaves out the text embeddings (--text_online), masks False
    the mask column."""
    f16 = datasets.Value("float16")
    columns = {
        # (C, h, w): only C is fixed, h and w vary by bucket
        "latents": datasets.List(datasets.List(datasets.List(f16)), length=latent_channels),
    }
    if embed_dim is not None:
        columns["prompt_embeds"] = datasets.List(datasets.List(f16, length=embed_dim))  # (77·k, C)
    if pooled_dim is not None:
        columns["pooled_prompt_embeds"] = datasets.List(f16, length=pooled_dim)
    for name in SIZE_COLUMNS:
        columns[name] = datasets.List(datasets.Value("int32"), length=2)  # [height, width] / [top, left]
    columns["tags"] = datasets.List(datasets.Value("string"))
    columns["prompt"] = datasets.Value("string")
    columns["source"] = datasets.Value("string")
    columns["flipped"] = datasets.Value("bool")
    if masks:
        columns["mask"] = datasets.List(datasets.List(datasets.Value("uint8")))  # (h, w), null: no mask
    return datasets.Features(columns)


def _nested_list_array(arrays: Sequence[np.ndarray], arrow_type: pa.DataType) -> pa.Array:
    """Arrow nested (fixed-size) list array of `arrow_type` from numpy arrays of its depth, built from
    offsets innermost level first: one copy of the values, no Python loop over elements."""
    shapes = [a.shape for a in arrays]
    level_types = []  # outermost list type first
    leaf = arrow_type
    while pa.types.is_list(leaf) or pa.types.is_fixed_size_list(leaf):
        level_types.append(leaf)
        leaf = leaf.value_type
    if any(len(shape) != len(level_types) for shape in shapes):
        raise ValueError(
            f"arrays of rank {sorted({len(s) for s in shapes})} for a {len(level_types)}-level list"
        )
    values = np.concatenate([np.asarray(a).reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    child = pa.array(values.astype(leaf.to_pandas_dtype(), copy=False), type=leaf)
    for level in reversed(range(len(level_types))):
        list_type = level_types[level]
        if pa.types.is_fixed_size_list(list_type):
            if any(shape[level] != list_type.list_size for shape in shapes):
                raise ValueError(
                    f"dimension {level} must be {list_type.list_size}, got shapes {sorted(set(shapes))}"
                )
            child = pa.FixedSizeListArray.from_arrays(child, type=list_type)
        else:
            # Each array holds prod(shape[:level]) lists of length shape[level] at this level.
            lengths = np.concatenate([np.full(int(np.prod(s[:level])), s[level], np.int64) for s in shapes])
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            child = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), child, type=list_type)
    return child


def rows_to_dataset(rows: Sequence[dict], features: datasets.Features) -> datasets.Dataset:
    """An in-memory Dataset from row dicts (numpy arrays for tensor columns)."""
    schema = features.arrow_schema
    arrays = []
    for field in schema:
        values = [row[field.name] for row in rows]
        if field.name in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            arrays.append(_nested_list_array([np.asarray(v) for v in values], field.type))
        elif field.name == "mask":  # nullable: the rows with a mask, then nulls taken in between
            present = [np.asarray(v) for v in values if v is not None]
            where, position = [], 0
            for value in values:
                where.append(None if value is None else position)
                position += value is not None
            if not present:
                arrays.append(pa.nulls(len(values), field.type))
            else:
                arrays.append(_nested_list_array(present, field.type).take(pa.array(where, pa.int64())))
        else:
            arrays.append(pa.array(values, type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _list_to_numpy(column: pa.Array) -> list[np.ndarray]:
    """Rows of a nested (fixed-size) list column as numpy arrays of their rectangular shape."""
    lengths, level = [], column
    while pa.types.is_list(level.type) or pa.types.is_fixed_size_list(level.type):
        lengths.append(pc.list_value_length(level).to_numpy(zero_copy_only=False))
        level = level.flatten()
    values = level.to_numpy(zero_copy_only=False)
    starts = [np.concatenate([[0], np.cumsum(n)]) for n in lengths]
    out = []
    for row in range(len(column)):
        shape, index = [], row
        for n, start in zip(lengths, starts, strict=True):
            shape.append(int(n[index]))
            index = int(start[index])  # first child of this row at the next level
        out.append(values[index : index + int(np.prod(shape))].reshape(shape))
    return out


def rows_as_tensors(dataset: datasets.Dataset, indices: Sequence[int]) -> list[dict]:
    """Rows as dicts of torch tensors (fp16 embeddings/latents, int64 sizes) read from arrow directly."""
    table = dataset.with_format("arrow")[list(indices)]
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
            if name == "tags":
                columns[name] = column.to_pylist()
            elif column.null_count:  # the mask column: None where a row has none
                valid = column.is_valid().to_numpy(zero_copy_only=False)
                arrays = iter(_list_to_numpy(column.filter(pa.array(valid))))
                columns[name] = [torch.from_numpy(next(arrays).copy()) if v else None for v in valid]
            else:
                columns[name] = [torch.from_numpy(a.copy()) for a in _list_to_numpy(column)]
                if name in SIZE_COLUMNS:
                    columns[name] = [t.long() for t in columns[name]]
        else:
            columns[name] = column.to_pylist()
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to path.tmp, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def shard_dir(output_dir: Path, index: int) -> Path:
    return Path(output_dir) / SHARDS_DIR / f"shard-{index:05d}"


def write_shard(
    output_dir: Path,
    index: int,
    rows: Sequence[dict],
    features: datasets.Features,
    summary: dict,
    before_rename=None,
) -> Path:
    """Save a shard as shard-NNNNN.tmp (dataset + shard.json), then rename it to shard-NNNNN: a shard dir
    without the .tmp suffix is always complete. `before_rename()` is a test hook."""
    final = shard_dir(output_dir, index)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if rows:
        rows_to_dataset(rows, features).save_to_disk(str(tmp))
    (tmp / SHARD_SUMMARY_FILE).write_text(json.dumps(summary, ensure_ascii=False) + "\n", encoding="utf-8")
    if before_rename is not None:
        before_rename()
    os.replace(tmp, final)
    return final


def completed_shards(output_dir: Path) -> set[int]:
    """Indices of the finished shards (a shard dir with its shard.json; existence checks only)."""
    root = Path(output_dir) / SHARDS_DIR
    if not root.is_dir():
        return set()
    return {
        int(path.name.split("-")[1])
        for path in root.glob("shard-*")
        if path.suffix == "" and (path / SHARD_SUMMARY_FILE).is_file()
    }


def remove_partial_shards(output_dir: Path, indices: Sequence[int]) -> None:
    """Delete leftover shard-NNNNN.tmp dirs of the given shards (a run killed mid-write)."""
    for index in indices:
        tmp = shard_dir(output_dir, index).with_name(f"shard-{index:05d}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_cache(output_dir: Path) -> None:
    """Delete a cache's files (CACHE_FILES and shards/) from output_dir, leaving anything else there."""
    output_dir = Path(output_dir)
    for name in CACHE_FILES:
        (output_dir / name).unlink(missing_ok=True)
    if (output_dir / SHARDS_DIR).exists():
        shutil.rmtree(output_dir / SHARDS_DIR)


def settings_differences(found: dict, expected: dict) -> list[str]:
    """Human-readable 'key: cache has X, expected Y' for each key of `expected` whose value differs."""
    normal = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples vs lists, int vs str keys)
    diffs = []
    for key, want in expected.items():
        have = found.get(key, "<missing>")
        if normal(have) != normal(want):
            diffs.append(f"{key}: cache has {_short(have)}, expected {_short(want)}")
    return diffs


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_pad_chunk(output_dir: Path, pad_chunk: torch.Tensor) -> None:
    """Write the (77, C) empty-chunk embedding (fp16) as pad_chunk.safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(output_dir) / PAD_CHUNK_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({"pad_chunk": pad_chunk.detach().to("cpu", torch.float16).contiguous()}, str(tmp))
    os.replace(tmp, path)


def load_pad_chunk(cache_dir: str | os.PathLike) -> torch.Tensor | None:
    """The (77, C) fp16 empty-chunk embedding of a cache, or None for a --text_online cache."""
    from safetensors.torch import load_file

    path = Path(cache_dir) / PAD_CHUNK_FILE
    return load_file(str(path))["pad_chunk"] if path.is_file() else None


def merge_shards(output_dir: Path, summaries: dict[int, dict], fingerprint: str) -> int:
    """Write state.json/dataset_info.json so load_from_disk(output_dir) reads every shard's arrow files in
    shard order, in place; returns the row count. The files are swapped in atomically, each."""
    output_dir = Path(output_dir)
    data_files, info, state, rows = [], None, None, 0
    for index in sorted(summaries):
        if summaries[index]["rows"] == 0:
            continue
        directory = shard_dir(output_dir, index)
        shard_state = read_json(directory / "state.json")
        shard_info = read_json(directory / "dataset_info.json")
        if info is None:
            info, state = shard_info, shard_state
        elif shard_info.get("features") != info.get("features"):
            raise ValueError(f"{directory}: columns differ from the other shards; rerun with --overwrite")
        prefix = directory.relative_to(output_dir).as_posix()
        data_files += [{"filename": f"{prefix}/{f['filename']}"} for f in shard_state["_data_files"]]
        rows += summaries[index]["rows"]
    if state is None:
        return 0
    state = {**state, "_data_files": data_files, "_fingerprint": fingerprint, "_split": None}
    write_json_atomic(output_dir / "dataset_info.json", info)
    write_json_atomic(output_dir / "state.json", state)
    return rows


def load_cache(cache_dir: str | os.PathLike, expected: dict | None = None) -> tuple[datasets.Dataset, dict]:
    """(Dataset, metadata) of a finished cache (or of a folder laid out by stage_for_hub); raises ValueError
    naming each setting in `expected` (keys of metadata["settings"]) that the cache was made with differently."""
    cache_dir = Path(cache_dir)
    metadata_path = cache_dir / METADATA_FILE
    if not metadata_path.is_file():
        hint = (
            "it is unfinished: run precompute_latents.py again with the same arguments to finish it"
            if (cache_dir / SHARDS_DIR).is_dir()
            else "make one with precompute_latents.py --output_dir " + str(cache_dir)
        )
        what = "is not a finished latent cache" if cache_dir.is_dir() else "does not exist"
        raise UserError(f"{cache_dir} {what} (no {METADATA_FILE}); {hint}")
    metadata = read_json(metadata_path)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{metadata_path}: cache format version {metadata.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; rebuild it with precompute_latents.py --overwrite"
        )
    diffs = settings_differences(metadata["settings"], expected or {})
    if diffs:
        raise UserError(
            f"{cache_dir} was made with different settings than this run needs:\n  "
            + "\n  ".join(diffs)
            + "\nrebuild it (precompute_latents.py --overwrite) with this model and these settings"
        )
    dataset = _open_rows(cache_dir)
    if len(dataset) != metadata["counts"]["rows"]:
        raise UserError(
            f"{cache_dir}: {len(dataset)} rows on disk, metadata says {metadata['counts']['rows']}; "
            "the cache is damaged, rebuild it with --overwrite"
        )
    return dataset, metadata


HUB_FILES = ("data/*.parquet", METADATA_FILE, TAG_FREQUENCIES_FILE, PAD_CHUNK_FILE, "README.md")


def _open_rows(cache_dir: Path) -> datasets.Dataset:
    """Memory-mapped rows of a cache directory, or of a Hub layout (data/*.parquet: converted to arrow once,
    in the datasets cache, then memory-mapped like a local cache; RAM stays flat at any size)."""
    if (cache_dir / "state.json").is_file() or not (cache_dir / "data").is_dir():
        return datasets.load_from_disk(str(cache_dir))
    files = sorted(str(p) for p in (cache_dir / "data").glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train", keep_in_memory=False)


def download_cache(repo_id: str, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Local folder of a cache pushed to the Hub (precompute_latents.py --push_to_hub): snapshot_download of
    its data files and side files. Raises a UserError with the fix when it cannot be fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UserError(
            f"--precomputed_dir {repo_id}: no such directory, and not a Hub dataset id (user/name) either"
        )
    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", revision=revision, token=token, allow_patterns=list(HUB_FILES)
        )
    except (OSError, HfHubHTTPError) as error:  # offline, no such repo, no access
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"--precomputed_dir {repo_id}: no local directory of that name, and the Hub dataset could not be "
            f"fetched ({reason}); check the id (a cache pushed by precompute_latents.py --push_to_hub), log in "
            "(hf auth login) for a private one, and unset HF_HUB_OFFLINE to download"
        ) from None
    return Path(folder)


def open_cache(
    name_or_path: str | os.PathLike,
    expected: dict | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[datasets.Dataset, dict, Path]:
    """(Dataset, metadata, folder holding tag_frequencies.json and pad_chunk.safetensors) of a finished cache:
    a local cache directory, a folder laid out by stage_for_hub, or the id of a Hub dataset repo holding one.
    Rows are memory-mapped, never loaded into RAM. Several processes may call it at once: the download and
    the parquet-to-arrow conversion are guarded by file locks (put HF_HOME on a disk every rank sees)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = download_cache(str(name_or_path), revision, token)
    dataset, metadata = load_cache(folder, expected)
    return dataset, metadata, folder


def _stream_shards_missing(output_dir: Path, world_size: int, found: dict[int, dict]) -> list[int]:
    """Streamed precompute: rank r writes shards r, r + world_size, ... in order and marks its last one. Adds
    the finished shards to `found`; returns the next shard each unfinished rank owes."""
    missing = []
    for rank in range(world_size):
        index = rank
        while index in found and not found[index].get("last"):
            index += world_size
        while index not in found:
            path = shard_dir(output_dir, index) / SHARD_SUMMARY_FILE
            if not path.is_file():
                missing.append(index)
                break
            found[index] = read_json(path)
            if found[index].get("last"):
                break
            index += world_size
    return missing


def wait_for_shards(
    output_dir: Path,
    num_shards: int | None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    stream_world_size: int | None = None,
) -> dict:
    """{index: summary} once every shard is complete (other ranks write them). Polls the filesystem instead
    of a collective, so ranks finishing hours apart never hit a process-group timeout. A streamed precompute
    (stream_world_size set) has no shard count up front: it ends when every rank has written its last shard."""
    start, announced, found = time.monotonic(), False, {}

    def still_missing() -> list[int]:
        if stream_world_size:
            return _stream_shards_missing(output_dir, stream_world_size, found)
        return [i for i in range(num_shards) if not (shard_dir(output_dir, i) / SHARD_SUMMARY_FILE).is_file()]

    missing = still_missing()
    while missing:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(
                f"{len(missing)} shard(s) still missing in {Path(output_dir) / SHARDS_DIR} after {timeout_s:.0f} s "
                f"(first: {missing[:5]}); run the same command again to finish them"
            )
        if not announced:
            print(f"waiting for {len(missing)} shard(s) from other ranks (first: {missing[:5]})", flush=True)
            announced = True
        time.sleep(poll_s)
        missing = still_missing()
    if stream_world_size:
        return found
    return {i: read_json(shard_dir(output_dir, i) / SHARD_SUMMARY_FILE) for i in range(num_shards)}


def _refusal(output_dir: Path, diffs: list[str]) -> UserError:
    return UserError(
        f"{output_dir} holds a cache made with different settings:\n  "
        + "\n  ".join(diffs)
        + "\nrun with the same arguments to resume it, pick another --output_dir, or pass --overwrite to rebuild it"
    )


def check_or_start(output_dir: Path, settings: dict) -> dict | None:
    """The metadata of a finished cache made with `settings`; None for a new or unfinished one (recording
    `settings` as shards/plan.json if new). Raises, listing the differences, for other settings."""
    output_dir = Path(output_dir)
    metadata_path = output_dir / METADATA_FILE
    plan_path = output_dir / SHARDS_DIR / PLAN_FILE
    if metadata_path.is_file():
        metadata = read_json(metadata_path)
        diffs = settings_differences(metadata.get("settings", {}), settings)
        if diffs:
            raise _refusal(output_dir, diffs)
        return metadata
    if plan_path.is_file():
        diffs = settings_differences(read_json(plan_path), settings)
        if diffs:
            raise _refusal(output_dir, diffs)
    else:
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(plan_path, settings)
    return None


class NoUsableInputsError(UserError, RuntimeError):
    """Every input was skipped (the message says why and where each reason is listed)."""


def finalize_cache(
    output_dir: Path,
    settings: dict,
    num_shards: int | None,
    pad_chunk: torch.Tensor | None,
    info: dict,
    hook=None,
    timeout_s: float | None = None,
    stream_world_size: int | None = None,
) -> dict:
    """Rank 0: wait for every shard, merge them, write skipped.jsonl, tag_frequencies.json, the pad chunk
    and, last, cache_metadata.json (returned). Safe to rerun after a kill at any point. A streamed
    precompute passes num_shards None and its number of processes (see wait_for_shards)."""
    output_dir = Path(output_dir)
    summaries = wait_for_shards(
        output_dir, num_shards, timeout_s=timeout_s, stream_world_size=stream_world_size
    )
    if hook:
        hook("merge", -1)
    ordered = [summaries[i] for i in sorted(summaries)]
    skipped = [entry for s in ordered for entry in s["skipped"]]
    tmp = output_dir / (SKIPPED_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in skipped), encoding="utf-8")
    os.replace(tmp, output_dir / SKIPPED_FILE)
    rows = merge_shards(output_dir, summaries, settings["inputs_fingerprint"])
    by_kind = dict(Counter(entry["kind"] for entry in skipped).most_common())
    if rows == 0:
        kinds = ", ".join(f"{k}: {n}" for k, n in by_kind.items())
        raise NoUsableInputsError(
            f"every one of the {len(skipped)} inputs was skipped ({kinds}); "
            f"the reason for each file is in {output_dir / SKIPPED_FILE}"
        )
    frequencies, buckets = Counter(), Counter()
    for s in ordered:
        frequencies.update(s["tag_counts"])
        buckets.update(s["buckets"])
    tmp = output_dir / (TAG_FREQUENCIES_FILE + ".tmp")
    save_tag_frequencies(tmp, dict(frequencies))
    os.replace(tmp, output_dir / TAG_FREQUENCIES_FILE)
    stats = merge_all([WelfordState.from_dict(s["welford"]) for s in ordered if s["welford"]["count"]])
    if pad_chunk is not None:
        save_pad_chunk(output_dir, pad_chunk)
    loaded = len(datasets.load_from_disk(str(output_dir)))
    if loaded != rows:
        raise RuntimeError(
            f"{output_dir}: merged cache has {loaded} rows, shards say {rows}; rerun with --overwrite"
        )
    if hook:
        hook("merge_data_written", -1)
    metadata = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        **info,
        "counts": {
            "inputs": sum(s["inputs"] for s in ordered),
            "rows": rows,
            "skipped": len(skipped),
            "skipped_by_kind": by_kind,
            "upscaled": sum(s["upscaled"] for s in ordered),
            "truncated_prompts": sum(s["truncated_prompts"] for s in ordered),
            "masked": sum(s.get("masked", 0) for s in ordered),  # rows with a loss mask
            "buckets": dict(buckets.most_common()),
            "shards": len(summaries),
        },
        # per channel, of the stored (scaled, fp16) latents; std with Bessel's correction like torch.std
        "latents_mean": stats.mean.tolist(),
        "latents_std": stats.std().tolist(),
        "latent_stats": stats.to_dict(),
        "pad_chunk": PAD_CHUNK_FILE if pad_chunk is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(output_dir / METADATA_FILE, metadata)
    return metadata


def stage_for_hub(
    cache_dir: str | os.PathLike, staging_dir: str | os.PathLike, max_file_bytes: int = 500 << 20
) -> list[str]:
    """Lay a finished cache out as a Hub dataset repo in staging_dir: data/train-*.parquet (what
    `load_dataset(repo_id)` reads), cache_metadata.json, tag_frequencies.json, pad_chunk.safetensors and a
    README.md card. skipped.jsonl stays local: it names files on this machine. Returns the repo paths."""
    cache_dir, staging_dir = Path(cache_dir), Path(staging_dir)
    dataset, metadata = load_cache(cache_dir)
    (staging_dir / "data").mkdir(parents=True, exist_ok=True)
    num_files = max(1, -(-dataset.data.nbytes // max_file_bytes))
    for i in range(num_files):
        part = dataset.shard(num_files, i, contiguous=True)
        part.to_parquet(str(staging_dir / "data" / f"train-{i:05d}-of-{num_files:05d}.parquet"))
    for name in (METADATA_FILE, TAG_FREQUENCIES_FILE, PAD_CHUNK_FILE):
        if (cache_dir / name).is_file():
            shutil.copyfile(cache_dir / name, staging_dir / name)
    settings, counts = metadata["settings"], metadata["counts"]
    card = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*",
        "tags:",
        "- sdxl",
        "- latents",
        "---",
        "",
        "# SDXL latent cache",
        "",
        f"{counts['rows']} rows of SDXL VAE latents"
        + (
            " (text embeddings computed during training)"
            if settings["text_online"]
            else " and text embeddings"
        )
        + f", aspect-ratio bucketed at {settings['resolution']}² with {len(settings['buckets'])} buckets.",
        f"Model: `{metadata.get('model', {}).get('pretrained_model_name_or_path', 'unknown')}`; "
        f"format version {metadata['format_version']}; settings and latent statistics in `{METADATA_FILE}`.",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("<this repo>", split="train")',
        "```",
        "",
    ]
    (staging_dir / "README.md").write_text("\n".join(card), encoding="utf-8")
    return sorted(p.relative_to(staging_dir).as_posix() for p in staging_dir.rglob("*") if p.is_file())
