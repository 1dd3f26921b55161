"""Where precompute's images and captions come from, and how one input becomes bucketed, cropped pixels.

A source has ``__len__``, ``source(i)`` (a name for logs and skipped.jsonl), ``load(i, max_pixels,
allow_empty)`` -> (image, caption, path) and ``describe()`` (what the cache metadata records). Folder and HF
dataset sources live here; the streamed kind is in streaming_inputs.py. `prepare_input` never raises for a bad
input: it returns the item with its reason, so a 10-hour precompute skips and lists it.
"""

from __future__ import annotations

import hashlib
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
from sdxl_ztsnr.masks import crop_mask, latent_mask, load_image_and_mask, masks_in_dir, split_mask_files
from sdxl_ztsnr.tags import parse_tags


class FolderInputs:
    """Images under `root` (recursive) with a `<stem>.txt` caption beside each; source = path under root.

    Masks for the masked loss (see masks.py): from `mask_dir` (same relative name), a `<stem>.mask.png` beside
    the image, or with `alpha_mask` the image's alpha channel; mask files are never samples themselves.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike, mask_dir: str | None = None, alpha_mask: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(
                f"--train_data_dir {self.root}: no such folder; pass the folder of images and their .txt captions"
            )
        files = find_images(self.root)
        self.mask_dir, self.alpha_mask = (Path(mask_dir) if mask_dir else None), alpha_mask
        if self.mask_dir is not None:
            if not self.mask_dir.is_dir():
                raise UserError(f"--mask_dir {self.mask_dir}: no such folder; pass the folder of mask images")
            inside, root = self.mask_dir.resolve(), self.root.resolve()
            if inside.is_relative_to(root):  # a mask_dir under root: its masks are not samples
                prefix = self.root / inside.relative_to(root)
                files = [p for p in files if not p.is_relative_to(prefix)]
        self.paths, beside = split_mask_files(files)
        if not self.paths:
            raise UserError(
                f"--train_data_dir {self.root}: no .png/.jpg/.jpeg/.webp images found (recursive)"
            )
        in_dir = masks_in_dir(self.mask_dir, self.root, self.paths) if self.mask_dir is not None else {}
        found = {**beside, **in_dir}  # mask_dir, when given, wins over a mask beside the image
        self.masks: dict[int, Path] = {i: found[p] for i, p in enumerate(self.paths) if p in found}

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def load(self, index: int, max_pixels: int, allow_empty: bool) -> tuple[Image.Image, str, str]:
        """(RGB image, caption, path for messages); raises BadInputError. The caption is read first: cheap."""
        path = self.paths[index]
        caption = read_caption(path, allow_empty=allow_empty)
        return load_image(path, max_pixels=max_pixels), caption, str(path)

    def load_masked(
        self, index: int, max_pixels: int, allow_empty: bool
    ) -> tuple[Image.Image, Image.Image | None, str, str]:
        """(RGB image, "L" mask of its size or None, caption, path); raises BadInputError (a bad mask too)."""
        path = self.paths[index]
        caption = read_caption(path, allow_empty=allow_empty)
        image, mask = load_image_and_mask(path, self.masks.get(index), self.alpha_mask, max_pixels)
        return image, mask, caption, str(path)

    def mask_settings(self) -> dict:
        """What the cache's masks depend on ({} without any: the settings of a cache made before masks)."""
        if not (self.masks or self.alpha_mask):
            return {}
        names = [f"{self.source(i)}\0{self.masks[i].name}" for i in sorted(self.masks)]
        digest = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]
        return {
            "masks": {
                "mask_files": len(self.masks),
                "mask_fingerprint": digest,
                "alpha_mask": self.alpha_mask,
            }
        }

    def describe(self) -> dict:
        masks = {"mask_dir": str(self.mask_dir)} if self.mask_dir is not None else {}
        return {
            "train_data_dir": str(self.root),
            **masks,
            **({"alpha_mask": True} if self.alpha_mask else {}),
        }


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
    mask_scale: int = 8,
) -> dict:
    """Load, bucket and crop one input: {"index", "source", "skipped": (path, reason) | None, "prompt",
    "tags", "upscaled", "samples": [{"pixels" (H, W, 3) uint8, "original_size", "crop_top_left",
    "bucket", "flipped", "mask" (H/mask_scale, W/mask_scale) uint8 or None}]}. Never raises for bad input.
    A source with masks has ``load_masked`` (FolderInputs); the mask follows the image's flip and crop."""
    source = inputs.source(index)
    item = {"index": index, "source": source, "skipped": None, "samples": [], "prompt": "", "tags": []}
    try:
        load_masked = getattr(inputs, "load_masked", None)
        if load_masked is not None:
            image, mask, caption, path = load_masked(index, max_image_pixels, allow_empty_captions)
        else:
            (image, caption, path), mask = inputs.load(index, max_image_pixels, allow_empty_captions), None
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
            latent_weights = None
            if mask is not None:  # (H/8, W/8) uint8: the loss weights at latent size
                latent_weights = latent_mask(crop_mask(mask, bucket, crop_top_left, flipped), mask_scale)
                if not latent_weights.any():
                    raise BadInputError(
                        path, "the mask is all black inside the bucket's crop: nothing to train"
                    )
                latent_weights = torch.from_numpy(latent_weights)
            item["samples"].append(
                {
                    "pixels": pixels,
                    "original_size": (height, width),
                    "crop_top_left": crop_top_left,
                    "bucket": tuple(bucket),
                    "flipped": flipped,
                    "mask": latent_weights,
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
