"""Training batches from the latent cache: one bucket per batch, deterministic, disjoint across ranks."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sdxl_ztsnr.cache import rows_as_tensors
from sdxl_ztsnr.keyed_random import keyed_uniform, sample_seeds
from sdxl_ztsnr.masks import batch_loss_mask
from sdxl_ztsnr.schedule import resolution_shift
from sdxl_ztsnr.tags import parse_tags, shuffle_and_drop_tags
from sdxl_ztsnr.text_encoding import pad_prompt_embeds
from sdxl_ztsnr.training import to_device_async


class BucketBatchSampler:
    """Yields this process's share of GLOBAL batches; every global batch holds rows of one aspect-ratio bucket.

    A global batch is ``batch_size × world_size`` rows; process ``rank`` takes rows [rank·B, (rank+1)·B) of
    each. Per epoch (seeded by ``seed`` and the epoch number, so a resumed run sees the same order) rows are
    shuffled within each bucket and cut into global batches; a bucket's last partial batch is filled with rows
    drawn again from the same bucket (nothing is dropped, every batch has the same size); the global batches of
    all buckets are shuffled together. The order depends on the global batch size only: N processes × batch B
    see exactly the batches that 1 process × batch N·B sees, and a checkpoint's position (epoch, batch) means
    the same thing for both.

    Several sources (``row_sources``: each row's source index, ``epoch_counts``: samples per epoch of each
    source, see ``source_epoch_counts``): a source's count is dealt to its buckets in proportion to its rows
    there (largest remainder, fixed for the run, so every epoch has the same batches per bucket); per epoch a
    (source, bucket) group of n rows with count k contributes every row k // n times and k % n of its rows once
    more (a fresh draw each epoch). Repeats are then exact, and weights hold to a row per bucket.
    """

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        row_sources: Sequence[int] | np.ndarray | None = None,
        epoch_counts: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        buckets = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)  # (rows, [height, width])
        if not len(buckets):
            raise ValueError("the training set is empty: no rows to sample batches from")
        # Row indices per bucket as numpy arrays: 8 bytes a row, not a Python int and a list slot (12M-row scale).
        kinds, inverse = np.unique(buckets, axis=0, return_inverse=True)
        order = np.argsort(inverse.reshape(-1), kind="stable")
        splits = np.cumsum(np.bincount(inverse.reshape(-1)))[:-1]
        self.rows_by_bucket: dict[tuple[int, int], np.ndarray] = {
            (int(h), int(w)): rows for (h, w), rows in zip(kinds, np.split(order, splits), strict=True)
        }
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch_size = batch_size * world_size
        self.epoch = 0
        self.start_batch = 0
        # (bucket) -> [(rows of one source there, samples per epoch)]; None: every row once (one source)
        self.groups: dict[tuple[int, int], list[tuple[np.ndarray, int]]] | None = None
        if row_sources is not None:
            self.groups = _source_groups(self.rows_by_bucket, np.asarray(row_sources), list(epoch_counts))
        samples = {
            bucket: len(rows) if self.groups is None else sum(k for _, k in self.groups[bucket])
            for bucket, rows in self.rows_by_bucket.items()
        }
        if not sum(samples.values()):
            raise ValueError("the training set is empty: no rows to sample batches from")
        self.samples_per_epoch = sum(samples.values())
        self.batches_per_epoch = sum(-(-n // self.global_batch_size) for n in samples.values())
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def positions(self) -> list[int]:
        """This process's positions in every global batch (keys of the per-sample random draws)."""
        return list(range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips global batches already trained (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _epoch_array(self, epoch: int) -> np.ndarray:
        """(batches, global batch) row indices of ``epoch``, in order; one array, not a list per batch."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng(int.from_bytes(f"{self.seed}-{epoch}".encode(), "little"))
        size = self.global_batch_size
        parts = []
        for bucket in sorted(self.rows_by_bucket):
            if self.groups is None:
                rows = rng.permutation(self.rows_by_bucket[bucket])
            else:
                rows = rng.permutation(_epoch_rows(self.groups[bucket], rng))
                if not len(rows):
                    continue
            refill = (-len(rows)) % size  # the last partial batch takes rows of the same bucket again
            parts.append(np.concatenate([rows, rows[np.arange(refill) % len(rows)]]).reshape(-1, size))
        batches = np.concatenate(parts)[rng.permutation(self.batches_per_epoch)]
        self._cached = (epoch, batches)
        return batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of ``epoch`` (row indices into ``buckets``), in order."""
        return self._epoch_array(epoch).tolist()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's slice of each global batch of ``epoch``, in order."""
        first = self.rank * self.batch_size
        return self._epoch_array(epoch)[:, first : first + self.batch_size].tolist()

    def __iter__(self):
        first = self.rank * self.batch_size
        for batch in self._epoch_array(self.epoch)[self.start_batch :, first : first + self.batch_size]:
            yield batch.tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def source_epoch_counts(
    rows_per_source: Sequence[int], repeats: Sequence[int], weights: Sequence[float] | None = None
) -> list[int]:
    """Samples per epoch of each source: rows × repeats (kohya's num_repeats); with ``weights``, shares of the
    total row count (the epoch is as long as one pass over every row), by largest remainder."""
    rows = np.asarray(rows_per_source, dtype=np.int64)
    if weights is None:
        return [int(n) * int(r) for n, r in zip(rows, repeats, strict=True)]
    w = np.asarray(weights, dtype=np.float64)
    return _largest_remainder(w / w.sum() * rows.sum(), int(rows.sum()))


def _largest_remainder(quotas: np.ndarray, total: int) -> list[int]:
    """Integers summing to ``total`` as close to ``quotas`` as possible (Hamilton's method; ties: first)."""
    counts = np.floor(quotas).astype(np.int64)
    left = total - int(counts.sum())
    if left > 0:
        order = np.argsort(-(quotas - counts), kind="stable")
        counts[order[:left]] += 1
    return counts.tolist()


def _source_groups(
    rows_by_bucket: dict[tuple[int, int], np.ndarray], row_sources: np.ndarray, epoch_counts: list[int]
) -> dict[tuple[int, int], list[tuple[np.ndarray, int]]]:
    """Each source's epoch count dealt to its buckets in proportion to its rows there."""
    buckets = sorted(rows_by_bucket)
    groups: dict[tuple[int, int], list[tuple[np.ndarray, int]]] = {b: [] for b in buckets}
    for source, count in enumerate(epoch_counts):
        parts = [(b, rows_by_bucket[b][row_sources[rows_by_bucket[b]] == source]) for b in buckets]
        parts = [(b, rows) for b, rows in parts if len(rows)]
        if not parts:
            continue
        sizes = np.asarray([len(rows) for _, rows in parts], dtype=np.float64)
        for (bucket, rows), k in zip(
            parts, _largest_remainder(sizes / sizes.sum() * count, count), strict=True
        ):
            groups[bucket].append((rows, k))
    return groups


def _epoch_rows(groups: list[tuple[np.ndarray, int]], rng: np.random.Generator) -> np.ndarray:
    """One epoch's rows of a bucket: each group's rows k // n times, and k % n of them drawn once more."""
    parts = []
    for rows, k in groups:
        full, extra = divmod(k, len(rows))
        parts += [rows] * full + [rng.permutation(rows)[:extra]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: the next global batch to read is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0


def time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor
) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, §2.2): (B, 6) = (orig h, w, crop top, left, target h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


def normalize_latents(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel (x − μ)/σ of scaled latents (NAI V3 appendix); ``mean``/``std`` are (C,)."""
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    return (latents - mean.to(latents).view(shape)) / std.to(latents).view(shape)


def vae_config_latent_stats(
    mean_scaled: Sequence[float], std_scaled: Sequence[float], scaling_factor: float
) -> tuple[list[float], list[float]]:
    """``latents_mean``/``latents_std`` for the VAE config from statistics of *scaled* latents.

    diffusers' SDXL pipeline decodes ``z = n·latents_std/scaling_factor + latents_mean``; for the
    model's latents n = (z·sf − μ_s)/σ_s that means latents_mean = μ_s/sf and latents_std = σ_s.
    """
    return [float(m) / scaling_factor for m in mean_scaled], [float(s) for s in std_scaled]


_ALIGN = 16  # bytes: every packed tensor starts at a multiple, so a view of any dtype lines up


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
    """Copy ``tensors`` into one uint8 buffer: (buffer, layout of (name, dtype, shape, byte offset)).

    A DataLoader worker hands every tensor to the training process through its own shared-memory segment and
    file descriptor (about a millisecond of the training thread each); one buffer is one segment, one pinned
    copy and one host-to-device transfer.
    """
    layout, offset = [], 0
    for name, tensor in tensors.items():
        layout.append((name, tensor.dtype, tuple(tensor.shape), offset))
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8)
    for (_, dtype, shape, start), tensor in zip(layout, tensors.values(), strict=True):
        _view(buffer, dtype, shape, start).copy_(tensor)
    return buffer, tuple(layout)


def unpack_tensors(buffer: torch.Tensor, layout: tuple) -> dict[str, torch.Tensor]:
    """The tensors of ``pack_tensors`` as views into ``buffer`` (on whatever device the buffer is)."""
    return {name: _view(buffer, dtype, shape, start) for name, dtype, shape, start in layout}


def _view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple, start: int) -> torch.Tensor:
    count = 1
    for size in shape:
        count *= size
    return buffer[start : start + count * dtype.itemsize].view(dtype).view(shape)


class _BatchReader(torch.utils.data.Dataset):
    """Reads and collates one batch of cache rows per item (in DataLoader workers, off the training thread).

    An item is ``{"packed": uint8 buffer, "layout": ..., "tags": lists or None}`` (see ``pack_tensors``); the
    tags travel only when captions are rebuilt from them (``with_tags``).
    """

    def __init__(
        self,
        dataset,
        row_ids: Sequence[int],
        pad_chunk: torch.Tensor | None,
        sample_weights,
        with_tags: bool = True,
    ):
        self.dataset, self.row_ids, self.pad_chunk, self.sample_weights = (
            dataset,
            row_ids,
            pad_chunk,
            sample_weights,
        )
        self.with_tags = with_tags

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, positions: list[int]) -> dict:
        rows_ids = [int(self.row_ids[p]) for p in positions]
        rows = rows_as_tensors(self.dataset, rows_ids)
        tensors = {
            "latents": torch.stack([r["latents"] for r in rows]).float(),  # (B, 4, h, w)
            "time_ids": time_ids(
                torch.stack([r["original_size"] for r in rows]),
                torch.stack([r["crop_top_left"] for r in rows]),
                torch.stack([r["target_size"] for r in rows]),
            ),
            "target_size": torch.stack([r["target_size"] for r in rows]),
            "sample_weights": self.sample_weights[torch.tensor(rows_ids)],
        }
        if any(r.get("mask") is not None for r in rows):  # only batches holding a masked row carry one
            tensors["loss_mask"] = batch_loss_mask([r["mask"] for r in rows], tensors["latents"].shape[2:])
        if "prompt_embeds" in rows[0]:
            tensors["prompt_embeds"] = pad_prompt_embeds([r["prompt_embeds"] for r in rows], self.pad_chunk)
            tensors["pooled_prompt_embeds"] = torch.stack([r["pooled_prompt_embeds"] for r in rows])
        packed, layout = pack_tensors(tensors)
        return {
            "packed": packed,
            "layout": layout,
            "tags": [r["tags"] for r in rows] if self.with_tags else None,
            # several caption lines (data config): the line is picked per step from the prompt
            "prompts": [r["prompt"] for r in rows] if self.with_tags else None,
            "row_ids": rows_ids,
        }


def batch_loader(reader, sampler, num_workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """A DataLoader whose ``sampler`` yields whole batches for ``reader`` to read and collate (``batch_size=None``):
    workers persist across epochs, batches are pinned for a CUDA device."""
    return torch.utils.data.DataLoader(
        reader,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


@dataclass(frozen=True)
class SourceCaptions:
    """How one source's captions change each step (a data config's keep_tokens, shuffle_tags, tag_dropout,
    caption_dropout, with the command line's values where the source gives none)."""

    keep_tokens: int = 0
    shuffle: bool = True
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0


@dataclass
class TrainingRows:
    """The cache split into training and held-out rows, with what a batch needs beside the rows.

    ``encode`` (prompts -> (embeds, pooled)) is set for --text_online: captions are rebuilt from the
    tags each step (``keep_tokens``, ``tag_dropout``) and encoded by the frozen text encoders. With
    ``encode_in_step`` as well (--train_text_encoder) a training batch carries its captions instead, and the
    step encodes them with gradients (``encode_text``); held-out batches are still encoded with ``encode``.
    """

    dataset: object  # datasets.Dataset of the cache
    metadata: dict
    train_ids: np.ndarray  # (rows,) int64, from split_rows
    validation_ids: np.ndarray
    sample_weights: torch.Tensor  # (rows,) fp32 tag-based loss weights, mean 1 over the training rows
    pad_chunk: torch.Tensor | None = None
    latents_mean: torch.Tensor | None = None  # (C,) set when latents are normalised
    latents_std: torch.Tensor | None = None
    caption_dropout: float = 0.0
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    num_workers: int = 0
    encode_in_step: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None
    buckets: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))  # (rows, 2) [h, w]
    # Several sources (a data config's cache): each row's source index, the sources' names, captions and
    # samples per epoch (source_epoch_counts); None for a single source.
    row_source: np.ndarray | None = None  # (rows,) int32
    source_names: list[str] = field(default_factory=list)
    source_captions: list[SourceCaptions] | None = None
    epoch_counts: list[int] | None = None
    _loader: torch.utils.data.DataLoader | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        column = self.dataset.with_format("arrow")["bucket"]
        self.buckets = pc.list_flatten(column).to_numpy().reshape(-1, 2)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        self.validation_ids = np.asarray(self.validation_ids, dtype=np.int64)

    def sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
        """The training rows' batch sampler, with each source's samples per epoch where there are several."""
        sources = (
            None if self.row_source is None or self.epoch_counts is None else self.row_source[self.train_ids]
        )
        return BucketBatchSampler(
            self.train_buckets, batch_size, seed, rank, world_size, sources, self.epoch_counts
        )

    def source_row_counts(self, ids: np.ndarray | None = None) -> list[int]:
        """Rows of each source among ``ids`` (default: the training rows)."""
        ids = self.train_ids if ids is None else ids
        return np.bincount(self.row_source[ids], minlength=len(self.source_names)).tolist()

    @property
    def train_buckets(self) -> np.ndarray:
        """(training rows, 2) [height, width] of each training row's bucket."""
        return self.buckets[self.train_ids]

    @property
    def validation_size(self) -> tuple[int, int]:
        """The most common training bucket (height, width): the size validation images are sampled at."""
        kinds, counts = np.unique(self.train_buckets, axis=0, return_counts=True)
        height, width = kinds[np.argmax(counts)]
        return int(height), int(width)

    def _finish(self, batch: dict, device: torch.device, keys: tuple[int, int, list[int]] | None) -> dict:
        """Text (cached or encoded now), caption dropout, latent normalisation; moves tensors to ``device``.

        ``keys`` = (seed, global micro-batch, positions in the global batch) for a training batch: every random
        choice for a sample (tag shuffle and dropout, caption dropout, timestep and noise) is keyed by them.
        None for held-out batches: captions unchanged, no dropout, no seeds.
        """
        encoded = prompts = None
        if self.encode is not None:
            if keys is not None:
                seeds = sample_seeds(*keys, "tags")
                prompts = [
                    self._caption(tags, prompt, row, random.Random(seed))
                    for tags, prompt, row, seed in zip(
                        batch["tags"], batch["prompts"], batch["row_ids"], seeds, strict=True
                    )
                ]
            else:  # held out: the caption as stored (the first line of several)
                prompts = [
                    prompt.split("\n", 1)[0] if "\n" in prompt else ", ".join(tags)
                    for tags, prompt in zip(batch["tags"], batch["prompts"], strict=True)
                ]
            if keys is None or self.encode_in_step is None:  # else encoded in the step: encode_text
                encoded, prompts = self.encode(prompts), None
        # One transfer for the whole batch (pinned by the DataLoader on CUDA), then views.
        packed = batch["packed"]
        on_device = packed.to(device, non_blocking=True)
        out = unpack_tensors(on_device, batch["layout"])
        if on_device is not packed:  # target_size stays on the CPU: timestep_shift reads it without a sync
            out["target_size"] = unpack_tensors(packed, batch["layout"])["target_size"]
        keep = None
        if keys is not None:
            out["noise_seeds"] = sample_seeds(*keys, "noise")
        dropout = torch.tensor(float(self.caption_dropout))
        if self.source_captions is not None:  # per source: a (B,) threshold
            dropout = torch.tensor(
                [self.source_captions[self.row_source[r]].caption_dropout for r in batch["row_ids"]]
            )
        if keys is not None and (dropout > 0).any():
            keep = (keyed_uniform(sample_seeds(*keys, "caption")) >= dropout).float()
            keep = to_device_async(keep, device)
        if prompts is not None:  # the text encoders train: the step encodes the captions (encode_text)
            out.pop("prompt_embeds", None), out.pop("pooled_prompt_embeds", None)  # a cache's, unused
            out["prompts"], out["caption_keep"] = prompts, keep
        else:
            out.update(_text_embeds(encoded, out, keep))
        if self.latents_mean is not None:
            mean, std = to_device_async(self.latents_mean, device), to_device_async(self.latents_std, device)
            out["latents"] = normalize_latents(out["latents"], mean, std)
        return out

    def _caption(self, tags: list[str], prompt: str, row: int, rng: random.Random) -> str:
        """A training caption: one line of several (keyed draw), then its source's (or the run's) tag shuffle,
        kept tags and tag dropout."""
        if "\n" in prompt:
            tags = parse_tags(rng.choice(prompt.split("\n")))
        if self.source_captions is None:
            return ", ".join(shuffle_and_drop_tags(tags, self.keep_tokens, self.tag_dropout, rng))
        rule = self.source_captions[self.row_source[row]]
        if rule.shuffle:
            return ", ".join(shuffle_and_drop_tags(tags, rule.keep_tokens, rule.tag_dropout, rng))
        kept = [t for i, t in enumerate(tags) if i < rule.keep_tokens or rng.random() >= rule.tag_dropout]
        return ", ".join(kept)

    def encode_text(self, batch: dict) -> dict:
        """A training batch with its text embeddings: the captions of an ``encode_in_step`` batch encoded now,
        inside the step (gradients reach the text encoders), caption dropout applied; others as they are."""
        if "prompts" not in batch:
            return batch
        out = dict(batch)
        prompts, keep = out.pop("prompts"), out.pop("caption_keep")
        out.update(_text_embeds(self.encode_in_step(prompts), out, keep))
        return out

    def stream(
        self,
        sampler: BucketBatchSampler,
        device: torch.device,
        seed: int,
        start: DataPosition = DataPosition(),
        first_micro_batch: int = 0,
    ) -> Iterator[tuple[DataPosition, dict]]:
        """Training batches without end, epoch after epoch: (position after this batch, batch).

        Read by DataLoader workers, finished on the main process. Gradient accumulation cycles run across epoch
        ends, so ``max_train_steps`` is always reached exactly. Batch number k of the stream is global
        micro-batch ``first_micro_batch + k``, the key of its samples' random draws. One DataLoader serves every
        epoch (the sampler reads its epoch when iterated): its workers start once, not once per epoch.
        """
        if (
            self._loader is None
            or self._loader.sampler is not sampler
            or self._loader.pin_memory != (device.type == "cuda")
        ):
            reader = _BatchReader(
                self.dataset, self.train_ids, self.pad_chunk, self.sample_weights, self.encode is not None
            )
            self._loader = batch_loader(reader, sampler, self.num_workers, device)
        epoch, offset, micro_batch = start.epoch, start.batch, first_micro_batch
        positions = sampler.positions
        while True:
            sampler.set_epoch(epoch, offset)
            for index, batch in enumerate(self._loader, start=offset):
                finished = self._finish(batch, device, (seed, micro_batch, positions))
                micro_batch += 1
                yield DataPosition(epoch, index + 1), finished
            epoch, offset = epoch + 1, 0

    def validation_batches(self, device: torch.device, batch_size: int = 8) -> list[dict]:
        """Held-out rows grouped by bucket into batches (no dropout, captions unchanged)."""
        reader = _BatchReader(self.dataset, self.validation_ids, self.pad_chunk, self.sample_weights)
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for position, row in enumerate(self.validation_ids):
            by_bucket[tuple(self.buckets[row].tolist())].append(position)
        batches = []
        for bucket in sorted(by_bucket):
            positions = by_bucket[bucket]
            for start in range(0, len(positions), batch_size):
                batches.append(self._finish(reader[positions[start : start + batch_size]], device, None))
        return batches

    def timestep_shift(self, batch: dict) -> float:
        """NAI's resolution shift s = √(H·W)/1024 for a batch (all rows share one bucket)."""
        height, width = batch["target_size"][0].tolist()
        return resolution_shift(height, width)


def _text_embeds(
    encoded: tuple[torch.Tensor, torch.Tensor] | None, batch: dict, keep: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """prompt_embeds and pooled_prompt_embeds in fp32: ``encoded`` now, else the batch's cached ones; zero
    where ``keep`` (B,) is 0 (caption dropout)."""
    if encoded is None:
        encoded = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    embeds, pooled = encoded[0].float(), encoded[1].float()
    if keep is not None:
        # Dropped captions get all-zero embeddings, as SDXL's own unconditional input
        # (force_zeros_for_empty_prompt): the pipeline's empty negative prompt then matches training.
        embeds, pooled = embeds * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def split_rows(
    sources: Sequence[str] | pa.Array | pa.ChunkedArray, validation_rows: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training row ids, held-out row ids) as int64 arrays, held out by SOURCE IMAGE: all rows of an image (its
    crops, its mirrored copy) are on the same side, so the validation loss is never measured on a trained image.

    Whole images are drawn (by seed) until ``validation_rows`` rows are held out; at most a tenth of the rows.
    Works on the arrow column as it is (dictionary-encoded: 4 bytes a row, no Python string per row).
    """
    column = sources if isinstance(sources, (pa.Array, pa.ChunkedArray)) else pa.array(sources, pa.string())
    num_rows = len(column)
    limit = min(validation_rows, num_rows // 10)
    if limit == 0:
        return np.arange(num_rows, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if isinstance(column, pa.ChunkedArray):
        # One array first: dictionary-encoding a chunked array gives every chunk the dictionary of all values
        # seen so far (quadratic memory over a cache's hundreds of shards).
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    dictionary = encoded.dictionary
    image_of_row = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    # An image has at least one row, so `limit` images are enough candidates; draw them without a full shuffle.
    candidates = random.Random(seed).sample(range(len(dictionary)), min(len(dictionary), limit))
    rows_of = np.bincount(image_of_row, minlength=len(dictionary))
    chosen, held = [], 0
    for image in candidates:
        if held + rows_of[image] <= limit:
            chosen.append(image)
            held += int(rows_of[image])
    is_held = np.isin(image_of_row, np.asarray(chosen, dtype=np.int64))
    del column, encoded, dictionary
    pa.default_memory_pool().release_unused()  # arrow's allocator keeps freed pages otherwise
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def _distinct_row_tags(dataset, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(row position in ``ids``, tag code) pairs, each tag once per row, and the codes' tags, from arrow."""
    column = dataset.with_format("arrow")[ids.tolist()]["tags"]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(pc.list_flatten(column))
    rows = pc.list_parent_indices(column).to_numpy().astype(np.int64)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    width = max(len(encoded.dictionary), 1)
    pairs = np.unique(rows * width + codes)  # a tag repeated within one caption counts once
    return pairs // width, pairs % width, encoded.dictionary.to_pylist()


def training_tag_frequencies(dataset, train_ids: np.ndarray, chunk_rows: int = 8192) -> dict[str, int]:
    """Samples each tag appears in over the training rows (``tags.tag_frequencies``, read from arrow)."""
    counts: dict[str, int] = defaultdict(int)
    for start in range(0, len(train_ids), chunk_rows):
        _, codes, names = _distinct_row_tags(dataset, train_ids[start : start + chunk_rows])
        for code, count in enumerate(np.bincount(codes, minlength=len(names)).tolist()):
            if count:
                counts[names[code]] += count
    return dict(sorted(counts.items()))


def training_tag_weights(
    dataset, train_ids: np.ndarray, factor: Callable[[str], float], chunk_rows: int = 8192
) -> np.ndarray:
    """Raw NAI tag weights of the training rows (mean of ``factor`` over each row's distinct tags; 1 without
    tags), float64 in ``train_ids`` order — ``tags.tag_loss_weights`` before scaling, computed from the arrow
    column a chunk at a time with numpy: no Python string per tag, so RAM stays flat at millions of rows."""
    raw = np.ones(len(train_ids), dtype=np.float64)
    for start in range(0, len(train_ids), chunk_rows):
        ids = train_ids[start : start + chunk_rows]
        rows, codes, names = _distinct_row_tags(dataset, ids)
        factors = np.array([factor(name) for name in names], dtype=np.float64)
        sums = np.bincount(rows, weights=factors[codes], minlength=len(ids))
        counts = np.bincount(rows, minlength=len(ids))
        raw[start : start + len(ids)] = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
    pa.default_memory_pool().release_unused()  # arrow's allocator keeps freed pages otherwise
    return raw
