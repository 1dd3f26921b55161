"""Streaming precompute inputs: a `datasets` IterableDataset (a Hub dataset, local files, or WebDataset tar shards
as img2dataset writes them) read once, front to back, split across every rank of every node.

Splitting (`datasets.distributed.split_dataset_by_node`): with at least as many data files as processes, rank r
reads files r, r + N, ... ("shards" strategy: each file is read by one rank only; ranks differ by at most one
file of work); with fewer files every rank reads every file and keeps one example in N ("examples" strategy:
balanced, but each rank reads all the bytes). At 12M images write ≥ 8 tar files per process.

Precompute shards: rank r cuts its part of the stream into shards of `shard_size` examples, in order, and its
k-th shard is global shard k·N + r; the last one is marked "last" in its shard.json. Each shard.json also holds
the stream's `state_dict()` after the shard's last example. A restarted rank loads the state of its last
finished shard: datasets then opens the data file that shard ended in directly and reads past at most that one
file's earlier examples (images are not decoded while skipping). `IterableDataset.skip(n)` would instead read
every earlier example of the rank again — at 12M images, hours of I/O per restart. The split depends on the
number of processes, so a streamed cache resumes only with the same number.

A data file that cannot be read to the end (a truncated tar, a caption that is not UTF-8 inside a tar: datasets'
loader raises while reading the file) is reported in skipped.jsonl and the rest of that file is skipped; a bad
image is skipped alone, like any bad input. Other errors (network) stop the run: rerunning resumes it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import tarfile
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sdxl_ztsnr import cache
from sdxl_ztsnr.console import UserError, loading_dataset
from sdxl_ztsnr.images import image_from_cell
from sdxl_ztsnr.inputs import _caption_text, prepare_input

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # WebDataset keys read as the image, first present wins
CAPTION_JSON_KEYS = ("caption", "text")  # img2dataset's .json holds the caption when no .txt was written
# Errors of one data file's contents (datasets' WebDataset loader raises these while reading a tar): that file's
# remaining examples are skipped. ValueError covers UnicodeDecodeError, JSONDecodeError and cast errors.
FILE_ERRORS = (tarfile.TarError, EOFError, zlib.error, ValueError)


def expand_braces(pattern: str) -> list[str]:
    """'s/{00000..00002}.tar' -> s/00000.tar, s/00001.tar, s/00002.tar; '{a,b}' alternatives (as bash and
    webdataset expand shard lists; datasets' data_files understands globs only). Zero padding is kept."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [path for option in options for path in expand_braces(head + option + tail)]


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class StreamingInputs:
    """A streamed dataset: `load_dataset(name, data_files=..., split=..., streaming=True)`.

    WebDataset tars (`name="webdataset"`, `data_files="shards/{00000..00099}.tar"`): the image is the first
    present of the jpg/jpeg/png/webp keys and the caption the txt key (or the json key's "caption") unless
    --image_column/--caption_column name others. A row's source is "<tar path>/<key>" (the tar path relative
    to the data files' folder); without keys it is "NAME[r<rank>:<i>]", the i-th example of rank's part.
    """

    kind = "stream"

    def __init__(
        self,
        name: str,
        data_files: str | list[str] | None = None,
        image_column: str = "image",
        caption_column: str = "text",
        split: str = "train",
    ):
        import datasets

        patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
        self.name, self.split, self.patterns = name, split, patterns
        self.files = [path for pattern in patterns for path in expand_braces(pattern)] or None
        try:
            with loading_dataset(name):  # offline or unreachable: one line that says so
                dataset = datasets.load_dataset(name, data_files=self.files, split=split, streaming=True)
        except UserError as error:
            if not isinstance(error.__cause__, FileNotFoundError) or not patterns:
                raise
            raise UserError(
                f"--dataset_name {name} --streaming"
                + (f" --data_files {' '.join(patterns)}" if patterns else "")
                + f": {error.__cause__}; check the name and the files (a local save_to_disk directory: drop --streaming)"
            ) from None
        columns = dataset.column_names or list(next(iter(dataset)))
        self.image_columns = _pick(columns, image_column, "image", IMAGE_EXTENSIONS, "--image_column", name)
        self.caption_column = _pick(
            columns, caption_column, "text", ("txt", "json"), "--caption_column", name
        )[0]
        for column in self.image_columns:
            if isinstance(dataset.features and dataset.features.get(column), datasets.Image):
                # Raw bytes: our decoder turns a bad image into a skipped row instead of an exception.
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        keep = [
            *self.image_columns,
            self.caption_column,
            *(c for c in ("__key__", "__url__") if c in columns),
        ]
        self.dataset = dataset.select_columns(list(dict.fromkeys(keep)))
        self.num_files = dataset.num_shards
        local = [os.path.abspath(f) for f in self.files or [] if "://" not in f]
        self.root = os.path.commonpath([os.path.dirname(f) for f in local]) if local else None

    def strategy(self, world_size: int) -> str:
        """How split_dataset_by_node divides the stream: whole files per rank when there are enough files."""
        return "shards" if self.num_files >= world_size else "examples"

    def for_rank(self, rank: int, world_size: int, state: dict | None = None):
        """This rank's part of the stream (an IterableDataset), positioned at `state` (a state_dict) if given."""
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(self.dataset, rank, world_size, strategy=self.strategy(world_size))
        if state is not None:
            part.load_state_dict(state)
        return part

    def file_name(self, rank: int, world_size: int, file_index: int) -> str:
        """The data file a reader position (index into this rank's files) points at, for messages."""
        index = file_index * world_size + rank if self.strategy(world_size) == "shards" else file_index
        return (
            self.files[index] if self.files and index < len(self.files) else f"{self.name} data file #{index}"
        )

    def source(self, example: dict, rank: int, position: int) -> str:
        if example.get("__key__") is None:
            return f"{self.name}[r{rank}:{position}]"
        url = str(example.get("__url__") or "")
        if self.root and url.startswith(self.root + os.sep):
            url = url[len(self.root) + 1 :]
        url = re.sub(r"^hf://datasets/[^/]+/[^/@]+(@[^/]+)?/", "", url)  # repo-relative on the Hub
        return f"{url}/{example['__key__']}"

    def cells(self, example: dict) -> tuple[object, object]:
        """(image cell, caption cell) of an example: the first image column present, the caption text."""
        image = next((example[c] for c in self.image_columns if example.get(c) is not None), None)
        caption = example.get(self.caption_column)
        if isinstance(caption, dict):  # a WebDataset .json: img2dataset's metadata with the caption in it
            caption = next((caption[k] for k in CAPTION_JSON_KEYS if caption.get(k) is not None), None)
        return image, caption

    def describe(self) -> dict:
        return {
            "dataset_name": self.name,
            "data_files": self.patterns or None,
            "dataset_split": self.split,
            "streaming": True,
            "image_column": self.image_columns,
            "caption_column": self.caption_column,
        }

    def settings(self, world_size: int) -> dict:
        """Cache settings keys for this source: what the rows depend on, and the split (number of processes)."""
        files = self.files and [
            os.path.relpath(os.path.abspath(f), self.root) if self.root and "://" not in f else f
            for f in self.files
        ]  # relative to their folder: the data may move, the cache stays valid
        stream = {
            "stream_dataset_name": self.name,
            "stream_split": self.split,
            "stream_num_data_files": self.num_files,
            "stream_data_files_fingerprint": _fingerprint(files),
            "stream_world_size": world_size,
            "stream_split_strategy": self.strategy(world_size),
        }
        return {
            "input_kind": self.kind,
            "image_column": self.image_columns,
            "caption_column": self.caption_column,
            "num_inputs": None,  # unknown until read; the metadata's counts give it
            "inputs_fingerprint": _fingerprint(stream),
            **stream,
        }


def _pick(columns: list[str], wanted: str, default: str, fallbacks, flag: str, name: str) -> list[str]:
    """`wanted` if it is a column; for the default name, the WebDataset keys present instead; else raise."""
    if wanted in columns:
        return [wanted]
    present = [c for c in fallbacks if c in columns] if wanted == default else []
    if not present:
        raise UserError(f"{flag} {wanted!r} is not a column of the stream {name}; columns: {columns}")
    return present


def _reader_position(state: dict) -> dict | None:
    """The one {"shard_idx", "shard_example_idx"} dict (the file reader) inside a nested state_dict, or None."""
    found = []

    def visit(node) -> None:
        if isinstance(node, dict):
            if "shard_idx" in node and "shard_example_idx" in node:
                found.append(node)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(state)
    return found[0] if len(found) == 1 else None


class RankStream:
    """This rank's examples, resumable from a state_dict; an unreadable data file is reported and skipped."""

    def __init__(self, inputs: StreamingInputs, rank: int, world_size: int, state: dict | None = None):
        self.inputs, self.rank, self.world_size = inputs, rank, world_size
        self.errors: list[dict] = []  # skipped.jsonl entries for data files cut short, since the last take
        self._open(state)

    def _open(self, state: dict | None) -> None:
        self.dataset = self.inputs.for_rank(self.rank, self.world_size, state)
        self.iterator = iter(self.dataset)

    def next(self) -> dict | None:
        """The next example, None at the end of the stream."""
        while True:
            try:
                return next(self.iterator, None)
            except FILE_ERRORS as error:
                state = self.dataset.state_dict()  # live: the reader stopped inside the failing file
                reader = _reader_position(state)
                if reader is None:
                    raise
                # In the "examples" split every rank reads (and skips) the same file: rank 0 reports it.
                if self.rank == 0 or self.inputs.strategy(self.world_size) == "shards":
                    path = self.inputs.file_name(self.rank, self.world_size, reader["shard_idx"])
                    reason = (
                        f"unreadable data file after {reader['shard_example_idx']} examples "
                        f"({type(error).__name__}: {error}); the rest of this file is skipped"
                    )
                    self.errors.append({"path": path, "reason": reason, "kind": "unreadable data file"})
                reader["shard_idx"] += 1
                reader["shard_example_idx"] = 0
                self._open(state)

    def state(self) -> dict:
        return self.dataset.state_dict()

    def take_errors(self) -> list[dict]:
        errors, self.errors = self.errors, []
        return errors


class _OneExample:
    """The FolderInputs/DatasetInputs interface over one streamed example, for prepare_input."""

    def __init__(self, image, caption, source: str):
        self.image, self.caption, self._source = image, caption, source

    def source(self, index: int) -> str:
        return self._source

    def load(self, index: int, max_pixels: int, allow_empty: bool):
        caption = _caption_text(self.caption, self._source, allow_empty)
        return image_from_cell(self.image, self._source, max_pixels), caption, self._source


def _prepare_example(image, caption, source: str, position: int, options: dict) -> dict:
    """prepare_input for one streamed example (in a worker process): pixels as numpy, plain pickling."""
    item = prepare_input(_OneExample(image, caption, source), 0, **options)
    item["index"] = position
    for sample in item["samples"]:
        sample["pixels"] = sample["pixels"].numpy()
    return item


def _as_tensors(item: dict) -> dict:
    for sample in item["samples"]:
        if isinstance(sample["pixels"], np.ndarray):
            sample["pixels"] = torch.from_numpy(sample["pixels"])
    return item


def rank_progress(output_dir: Path, rank: int, world_size: int) -> tuple[int, dict | None]:
    """(finished shards of this rank, the last one's summary): a rank writes its shards in order, so the
    finished ones are k·world_size + rank for k = 0 .. count−1."""
    finished = cache.completed_shards(output_dir)
    count = 0
    while count * world_size + rank in finished:
        count += 1
    if count == 0:
        return 0, None
    last = count - 1
    return count, cache.read_json(
        cache.shard_dir(output_dir, last * world_size + rank) / cache.SHARD_SUMMARY_FILE
    )


def stream_items(
    inputs: StreamingInputs,
    output_dir: Path,
    rank: int,
    world_size: int,
    shard_size: int,
    options: dict,
    num_workers: int,
    shard_extras: dict[int, dict],
) -> tuple[Iterator[dict], int]:
    """(prepared items of this rank's unfinished shards, in order; how many of its shards were already done).

    Items are prepare_input's dicts with "shard" (global index) and "index" (position in this rank's stream).
    Before a shard's last item is yielded, shard_extras[shard] holds what its shard.json records beside the
    rows: "stream_state", "last", "examples", "skipped" (unreadable files). A shard that reads no example
    (the stream ended on a shard boundary) is announced by one {"shard": s, "marker": True} item.
    """
    done, summary = rank_progress(output_dir, rank, world_size)
    state = summary["stream_state"] if summary else None
    for leftover in Path(output_dir, cache.SHARDS_DIR).glob("shard-*.tmp"):  # killed mid-write
        index = int(leftover.name.split("-")[1].split(".")[0])
        if index % world_size == rank:
            cache.remove_partial_shards(output_dir, [index])

    def generate() -> Iterator[dict]:
        if summary is not None and summary.get("last"):
            return
        stream = RankStream(inputs, rank, world_size, state)
        pool = None
        if num_workers > 0:
            # forkserver: clean workers (no copy of the CUDA context or of the main process's threads), forked
            # from a server that imported this module once
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])
            else:
                context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(num_workers, mp_context=context)
        in_flight: deque[Future | dict] = deque()  # results in stream order
        try:
            position = done * shard_size
            for k in itertools.count(done):
                shard = k * world_size + rank
                count = 0
                while count < shard_size:
                    example = stream.next()
                    if example is None:
                        break
                    args = (*inputs.cells(example), inputs.source(example, rank, position), position, options)
                    job = pool.submit(_prepare_example, *args) if pool else _prepare_example(*args)
                    in_flight.append((shard, job))
                    position += 1
                    count += 1
                    while len(in_flight) > 4 * max(num_workers, 1):
                        yield _result(*in_flight.popleft())
                last = count < shard_size
                shard_extras[shard] = {
                    "stream_state": stream.state(),
                    "last": last,
                    "examples": count,
                    "skipped": stream.take_errors(),
                }
                if count == 0:
                    in_flight.append((shard, {"marker": True}))
                if last:
                    break
            while in_flight:
                yield _result(*in_flight.popleft())
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    return generate(), done


def _result(shard: int, job: Future | dict) -> dict:
    item = job.result() if isinstance(job, Future) else job
    return {"shard": shard, **_as_tensors(item)} if "marker" not in item else {"shard": shard, **item}
