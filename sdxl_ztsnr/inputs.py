"""Where precompute's images and captions come from, and how one input becomes bucketed, cropped pixels.

A source has ``__len__``, ``source(i)`` (a name for logs and skipped.jsonl), ``load(i, max_pixels,
allow_empty)`` -> (image, caption, path) and ``describe()`` (what the cache metadata records). Folder and HF
dataset sources live here; the streamed kind is in streaming_inputs.py. `prepare_input` never raises for a bad
input: it returns the item with its reason, so a 10-hour precompute skips and lists it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from sdxl_ztsnr.buckets import bucket_for, resize_to_bucket
from sdxl_ztsnr.console import UserError, loading_dataset
from sdxl_ztsnr.images import (
    DEFAULT_MAX_PIXELS,
    BadInputError,
    find_images,
    image_from_cell,
    load_image,
    read_caption,
)
from sdxl_ztsnr.tags import parse_tags


class FolderInputs:
    """Images under `root` (recursive) with a `<stem>.txt` caption beside each; source = path under root."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(
                f"--train_data_dir {self.root}: no such folder; pass the folder of images and their .txt captions"
            )
        self.paths = find_images(self.root)
        if not self.paths:
            raise UserError(
                f"--train_data_dir {self.root}: no .png/.jpg/.jpeg/.webp images found (recursive)"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def load(self, index: int, max_pixels: int, allow_empty: bool) -> tuple[Image.Image, str, str]:
        """(RGB image, caption, path for messages); raises BadInputError. The caption is read first: cheap."""
        path = self.paths[index]
        caption = read_caption(path, allow_empty=allow_empty)
        return load_image(path, max_pixels=max_pixels), caption, str(path)

    def describe(self) -> dict:
        return {"train_data_dir": str(self.root)}


class DatasetInputs:
    """Rows of a Hugging Face dataset (Hub name, load_dataset path, or a save_to_disk directory)."""

    kind = "dataset"

    def __init__(
        self, name: str, image_column: str = "image", caption_column: str = "text", split: str = "train"
    ):
        import datasets

        self.name, self.image_column, self.caption_column = name, image_column, caption_column
        path = Path(name)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise UserError(f"--dataset_name {name}: no split {split!r}; it has {list(dataset)}")
                dataset = dataset[split]
        else:
            with loading_dataset(name):
                dataset = datasets.load_dataset(name, split=split)
        for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
            if column not in dataset.column_names:
                raise UserError(
                    f"{flag} {column!r} is not a column of {name}; columns: {dataset.column_names}"
                )
        if isinstance(dataset.features[image_column], datasets.Image):
            # Decode ourselves, so a bad image becomes a skipped row instead of an exception inside datasets.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        if len(dataset) == 0:
            raise UserError(f"--dataset_name {name}: the dataset (split {split!r}) has no rows")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def source(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def load(self, index: int, max_pixels: int, allow_empty: bool) -> tuple[Image.Image, str, str]:
        source = self.source(index)
        row = self.dataset[index]
        caption = _caption_text(row[self.caption_column], source, allow_empty)
        return image_from_cell(row[self.image_column], source, max_pixels), caption, source

    def describe(self) -> dict:
        return {
            "dataset_name": self.name,
            "image_column": self.image_column,
            "caption_column": self.caption_column,
        }


def _caption_text(value, source: str, allow_empty: bool) -> str:
    """A dataset caption cell (str, bytes or list of str) as clean text; raises BadInputError."""
    if value is None:
        raise BadInputError(source, "missing caption (null)")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadInputError(source, "caption is not valid UTF-8; re-encode the column as UTF-8") from None
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    text = str(value).replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text and not allow_empty:
        raise BadInputError(source, "empty caption; write its tags or pass --allow_empty_captions")
    return text


def prepare_input(
    inputs: FolderInputs | DatasetInputs,
    index: int,
    buckets: Sequence[tuple[int, int]],
    crop: Literal["center", "random"] = "center",
    flip: bool = False,
    seed: int = 0,
    min_image_side: int = 0,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    allow_empty_captions: bool = False,
) -> dict:
    """Load, bucket and crop one input: {"index", "source", "skipped": (path, reason) | None, "prompt",
    "tags", "upscaled", "samples": [{"pixels" (H, W, 3) uint8, "original_size", "crop_top_left",
    "bucket", "flipped"}]}. Never raises for bad input."""
    source = inputs.source(index)
    item = {"index": index, "source": source, "skipped": None, "samples": [], "prompt": "", "tags": []}
    try:
        image, caption, path = inputs.load(index, max_image_pixels, allow_empty_captions)
        # A data-config source keeps each line of a caption as its own caption (one is picked per step).
        lines = (
            [parse_tags(line) for line in caption.split("\n")]
            if getattr(inputs, "caption_lines", False)
            else []
        )
        lines = [line for line in lines if line]
        tags = list(dict.fromkeys(tag for line in lines for tag in line)) if lines else parse_tags(caption)
        if not tags and not allow_empty_captions:
            raise BadInputError(
                path, "empty caption after parsing tags; pass --allow_empty_captions to keep it"
            )
        height, width = image.height, image.width
        if min(height, width) < min_image_side:
            raise BadInputError(
                path, f"image is {width}x{height}, a side under --min_image_side {min_image_side}"
            )
        bucket = bucket_for(height, width, buckets)
        for flipped in (False, True) if flip else (False,):
            # Flip before cropping, so crop_top_left is measured in the image the VAE sees.
            source_image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else image
            rng = random.Random(f"{seed}:{source}") if crop == "random" else None  # same crop on every run
            cropped, crop_top_left = resize_to_bucket(source_image, bucket, crop=crop, rng=rng)
            pixels = torch.from_numpy(np.array(cropped, dtype=np.uint8))  # (H, W, 3), RGB from load_image
            item["samples"].append(
                {
                    "pixels": pixels,
                    "original_size": (height, width),
                    "crop_top_left": crop_top_left,
                    "bucket": tuple(bucket),
                    "flipped": flipped,
                }
            )
        prompt = "\n".join(", ".join(line) for line in lines) if len(lines) > 1 else ", ".join(tags)
        item.update(prompt=prompt, tags=tags, upscaled=max(bucket[0] / height, bucket[1] / width) > 1)
    except BadInputError as e:
        item.update(skipped=(e.path, e.reason), samples=[])
    except Exception as e:  # a decoder bug must not end an overnight run; record it like any bad input
        item.update(skipped=(source, f"unexpected error: {type(e).__name__}: {e}"), samples=[])
    return item


class _PrepareDataset(torch.utils.data.Dataset):
    """Runs prepare_input in DataLoader workers, so image decoding overlaps VAE encoding."""

    def __init__(self, items: list[tuple[int, int]], inputs, options: dict):
        self.items, self.inputs, self.options = items, inputs, options

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        shard, index = self.items[i]
        return {"shard": shard, **prepare_input(self.inputs, index, **self.options)}
