"""VAE training data: full-resolution images, random crops keyed by (seed, micro-batch, position), fixed held-out crops.

Images come from a folder (recursive, no captions needed) or a Hugging Face dataset, loaded by the same code as
precompute (`sdxl_ztsnr.images.load_image`): every image is decoded once at the start, across all ranks, and the
bad ones are skipped and listed in OUTPUT_DIR/skipped.jsonl in precompute's format. A few whole images are held
out (by seed) for evaluation at fixed centre crops; the others give one random crop per sample and step.

A sample's crop and its latent noise come from seeds made of the run's seed, the global micro-batch number and
the sample's position in the global batch (`sdxl_ztsnr.keyed_random`), and the order of images is the trainer's
(`BucketBatchSampler` with one bucket): N processes × batch B train what 1 process × batch N·B trains, and a
resumed run draws what the unbroken one drew.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl_ztsnr.cache import SKIPPED_FILE, skip_kind
from sdxl_ztsnr.images import DEFAULT_MAX_PIXELS, BadInputError, image_from_cell, load_image
from sdxl_ztsnr.keyed_random import sample_seed
from sdxl_ztsnr.train_data import BucketBatchSampler, DataPosition, batch_loader


class FolderImages:
    """Images under ``root`` (recursive; a caption beside them is not needed); source = path under root."""

    def __init__(self, root: str | os.PathLike):
        from sdxl_ztsnr.inputs import FolderInputs

        self.inputs = FolderInputs(root)  # its listing and its "no images found" error

    def __len__(self) -> int:
        return len(self.inputs)

    def source(self, index: int) -> str:
        return self.inputs.source(index)

    def load(self, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """The RGB image; raises BadInputError naming the file."""
        return load_image(self.inputs.paths[index], max_pixels=max_pixels)


class DatasetImages:
    """The image column of a Hugging Face dataset (Hub name, load_dataset path, or a save_to_disk directory)."""

    def __init__(self, name: str, image_column: str = "image", split: str = "train"):
        from sdxl_ztsnr.inputs import DatasetInputs

        # precompute's loading, split and column checks; captions are never read here, so the caption
        # check is pointed at the image column (a dataset of images alone is fine).
        self.inputs = DatasetInputs(name, image_column, caption_column=image_column, split=split)
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.inputs)

    def source(self, index: int) -> str:
        return self.inputs.source(index)

    def load(self, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        cell = self.inputs.dataset[index][self.image_column]
        return image_from_cell(cell, self.source(index), max_pixels)


class SourceImages:
    """The images of a data config's sources, one after another (captions and regularisation mean nothing to a
    VAE: every source's images are images); ``source_of`` (images,) is each image's source index."""

    def __init__(self, config):
        from sdxl_ztsnr.console import UserError

        self.config, self.parts = config, []
        for source in config:
            where = f"{config.path}: source {source.name!r}"
            if source.kind == "stream":
                raise UserError(
                    f"{where}: a streamed source cannot be read by train_vae.py (it decodes every "
                    "image up front); use a folder or an HF dataset"
                )
            try:
                part = (
                    FolderImages(source.train_data_dir)
                    if source.kind == "folder"
                    else DatasetImages(source.dataset_name, source.image_column, source.dataset_split)
                )
            except UserError as error:
                raise UserError(f"{where}: {error}") from None
            self.parts.append(part)
        sizes = [len(part) for part in self.parts]
        self.source_of = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _part(self, index: int) -> tuple[int, int]:
        source = int(self.source_of[index])
        return source, index - int(self.offsets[source])

    def source(self, index: int) -> str:
        source, local = self._part(index)
        return f"{self.config.sources[source].name}/{self.parts[source].source(local)}"

    def load(self, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        source, local = self._part(index)
        return self.parts[source].load(local, max_pixels)

    def epoch_counts(self, indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """(source index of each of ``indices``, each source's samples per epoch: repeats or weight shares)."""
        from sdxl_ztsnr.train_data import source_epoch_counts

        sources = self.source_of[np.asarray(indices, dtype=np.int64)]
        rows = np.bincount(sources, minlength=len(self.parts)).tolist()
        configs = self.config.sources
        weights = [c.weight for c in configs] if any(c.weight is not None for c in configs) else None
        return sources, source_epoch_counts(rows, [c.repeats for c in configs], weights)


ImageSource = FolderImages | DatasetImages | SourceImages


# -- the scan: decode every image once, skip and report the bad ones -------------------------------------------


class _ScanReader(torch.utils.data.Dataset):
    """Decodes one image per item in DataLoader workers: (index, (height, width)) or (index, (path, reason))."""

    def __init__(self, images: ImageSource, indices: Sequence[int], max_pixels: int):
        self.images, self.indices, self.max_pixels = images, list(indices), max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[int, bool, tuple]:
        index = self.indices[item]
        try:
            image = self.images.load(index, self.max_pixels)
            return index, True, (image.height, image.width)
        except BadInputError as error:
            return index, False, (error.path, error.reason)
        except Exception as error:  # a decoder bug must not end the run; record it like any bad input
            return (
                index,
                False,
                (self.images.source(index), f"unexpected error: {type(error).__name__}: {error}"),
            )


@dataclass
class ImageScan:
    """The usable images (indices into the source, with their (height, width)) and the skipped ones."""

    usable: list[int]
    sizes: list[tuple[int, int]]
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason", "kind"}, as precompute writes them


def scan_images(
    images: ImageSource,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageScan:
    """Decode this rank's share (indices rank, rank + world_size, ...) of the images; sorted by index."""
    reader = _ScanReader(images, range(rank, len(images), world_size), max_pixels)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=num_workers)
    scan = ImageScan([], [])
    for index, ok, value in loader:
        if ok:
            scan.usable.append(index)
            scan.sizes.append(tuple(value))
        else:
            path, reason = value
            scan.skipped.append({"path": path, "reason": reason, "kind": skip_kind(reason)})
    return scan


def merge_scans(scans: Sequence[ImageScan]) -> ImageScan:
    """The scans of all ranks as one, usable images sorted by index (the same list on every rank)."""
    pairs = sorted((i, s) for scan in scans for i, s in zip(scan.usable, scan.sizes, strict=True))
    skipped = sorted((e for scan in scans for e in scan.skipped), key=lambda e: e["path"])
    return ImageScan([i for i, _ in pairs], [s for _, s in pairs], skipped)


def scan_images_on_all_ranks(
    accelerator, images: ImageSource, num_workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageScan:
    """``scan_images`` split across the ranks of ``accelerator``, gathered: every rank gets the whole scan."""
    from accelerate.utils import gather_object

    local = scan_images(images, accelerator.process_index, accelerator.num_processes, num_workers, max_pixels)
    scans = gather_object([local]) if accelerator.num_processes > 1 else [local]
    return merge_scans(scans)


def write_skipped(output_dir: str | Path, skipped: Sequence[dict]) -> Path:
    """OUTPUT_DIR/skipped.jsonl, one JSON object per skipped input (precompute's file and format), atomically."""
    path = Path(output_dir) / SKIPPED_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in skipped), encoding="utf-8")
    os.replace(tmp, path)
    return path


def split_held_out(count: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """(training positions, held-out positions) among ``count`` usable images: whole images, drawn by seed.

    At most a fifth of the images are held out, at least one; at least one is left to train on.
    """
    if count < 2:
        raise ValueError(
            f"VAE training needs at least 2 usable images (1 held out for evaluation, 1 to train on); got {count}"
        )
    take = max(1, min(held_out, count // 5))
    held = sorted(random.Random(f"{seed}:held-out").sample(range(count), take))
    held_set = set(held)
    return [i for i in range(count) if i not in held_set], held


# -- crops ---------------------------------------------------------------------------------------------------


def cover_resize(image: Image.Image, crop_size: int) -> Image.Image:
    """Upscale (bicubic) so the shorter side is ``crop_size`` when it is shorter; larger images stay as they are."""
    short = min(image.width, image.height)
    if short >= crop_size:
        return image
    scale = crop_size / short
    size = (max(crop_size, round(image.width * scale)), max(crop_size, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def random_crop_box(height: int, width: int, crop_size: int, seed: int) -> tuple[int, int]:
    """(top, left) of a uniformly random ``crop_size`` square in a (height, width) image, from ``seed``."""
    rng = random.Random(seed)
    return rng.randrange(height - crop_size + 1), rng.randrange(width - crop_size + 1)


def crop_pixels(image: Image.Image, crop_size: int, box: tuple[int, int] | None) -> torch.Tensor:
    """(3, S, S) uint8 crop at ``box`` (top, left), or the centre crop for None, of the cover-resized image."""
    image = cover_resize(image, crop_size)
    if box is None:
        box = ((image.height - crop_size) // 2, (image.width - crop_size) // 2)
    top, left = box
    cropped = image.crop((left, top, left + crop_size, top + crop_size))
    return torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> fp32 [-1, 1], the VAE's input range."""
    return pixels.float() / 127.5 - 1.0


def held_out_crops(
    images: ImageSource, indices: Sequence[int], crop_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """(K, 3, S, S) uint8 centre crops of the held-out images: the same pixels at every evaluation."""
    return torch.stack([crop_pixels(images.load(i, max_pixels), crop_size, None) for i in indices])


class CropBatchSampler:
    """This process's share of each global batch of training images, with every sample's crop and noise seeds.

    Yields [(image position, crop seed, noise seed), ...]; the image order is ``BucketBatchSampler``'s with
    one bucket (shuffled per epoch by seed; the last partial batch refilled), the seeds are
    ``sample_seed(seed, micro_batch, position in the global batch, stream)``.
    """

    def __init__(
        self,
        images: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        row_sources: Sequence[int] | None = None,
        epoch_counts: Sequence[int] | None = None,
    ):
        self.batches = BucketBatchSampler(
            [(0, 0)] * images, batch_size, seed, rank, world_size, row_sources, epoch_counts
        )
        self.seed = seed
        self.first_micro_batch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batches.global_batch_size

    def set_position(self, epoch: int, start_batch: int, first_micro_batch: int) -> None:
        """Iterate ``epoch`` from global batch ``start_batch``; its first batch is global micro-batch N."""
        self.batches.set_epoch(epoch, start_batch)
        self.first_micro_batch = first_micro_batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        positions = self.batches.positions
        for k, rows in enumerate(self.batches):
            micro_batch = self.first_micro_batch + k
            yield [
                (
                    row,
                    sample_seed(self.seed, micro_batch, p, "crop"),
                    sample_seed(self.seed, micro_batch, p, "noise"),
                )
                for row, p in zip(rows, positions, strict=True)
            ]

    def __len__(self) -> int:
        """Global batches per epoch (all of them, whatever the start)."""
        return self.batches.batches_per_epoch


class _CropReader(torch.utils.data.Dataset):
    """Loads and crops one batch per item in DataLoader workers: uint8 pixels (B, 3, S, S), noise (B, C, s, s)."""

    def __init__(
        self,
        images: ImageSource,
        indices: Sequence[int],
        sizes: Sequence[tuple[int, int]],
        crop_size: int,
        latent_shape: tuple[int, int, int],
        max_pixels: int,
    ):
        self.images, self.indices, self.sizes = images, list(indices), list(sizes)
        self.crop_size, self.latent_shape, self.max_pixels = crop_size, tuple(latent_shape), max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, spec: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
        pixels, noise = [], []
        generator = torch.Generator()
        for row, crop_seed, noise_seed in spec:
            image = cover_resize(self.images.load(self.indices[row], self.max_pixels), self.crop_size)
            box = random_crop_box(image.height, image.width, self.crop_size, crop_seed)
            pixels.append(crop_pixels(image, self.crop_size, box))
            noise.append(torch.randn(self.latent_shape, generator=generator.manual_seed(noise_seed)))
        return {"pixels": torch.stack(pixels), "noise": torch.stack(noise)}


@dataclass
class CropData:
    """The training images of a VAE run and what reading random crops from them needs."""

    images: ImageSource
    indices: list[int]  # source indices of the training images
    sizes: list[tuple[int, int]]  # their (height, width)
    crop_size: int
    latent_shape: tuple[int, int, int]  # (C, S/f, S/f) of the latent noise, f = the VAE's downsampling
    num_workers: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    _loader: torch.utils.data.DataLoader | None = field(default=None, init=False, repr=False)

    def stream(
        self,
        sampler: CropBatchSampler,
        device: torch.device,
        start: DataPosition | None = None,
        first_micro_batch: int = 0,
    ) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
        """Batches without end, epoch after epoch: (position after this batch, {"pixels" fp32 [-1, 1], "noise"}).

        One DataLoader serves every epoch (its workers start once); batch k of the stream is global micro-batch
        ``first_micro_batch + k``, the key of its samples' crops and noise.
        """
        if self._loader is None or self._loader.sampler is not sampler:
            reader = _CropReader(
                self.images, self.indices, self.sizes, self.crop_size, self.latent_shape, self.max_pixels
            )
            self._loader = batch_loader(reader, sampler, self.num_workers, device)
        start = start or DataPosition()
        epoch, offset, micro_batch = start.epoch, start.batch, first_micro_batch
        while True:
            sampler.set_position(epoch, offset, micro_batch)
            for index, batch in enumerate(self._loader, start=offset):
                micro_batch += 1
                yield (
                    DataPosition(epoch, index + 1),
                    {
                        "pixels": to_model_range(batch["pixels"].to(device, non_blocking=True)),
                        "noise": batch["noise"].to(device, non_blocking=True),
                    },
                )
            epoch, offset = epoch + 1, 0
