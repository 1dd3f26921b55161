"""Masked loss (kohya's --masked_loss, OneTrainer's masked training): where an image's mask comes from, how it
follows its image through flip, resize and crop, its latent-size form in the cache, and the mask-weighted MSE.

A mask is a weight map: white (255) trains, black (0) is ignored, gray in between weighs in between (127 ≈ 0.5),
as kohya reads it (the R channel of an RGB mask). For a folder source the first of these that exists is used:

1. ``mask_dir/<path under the folder>.{png,jpg,jpeg,webp}`` (kohya's ``conditioning_data_dir``: same name);
2. ``<name>.mask.{png,...}`` beside ``<name>.png`` (a mask file is never a training image itself);
3. with ``alpha_mask`` the image's own alpha channel (kohya's ``--alpha_mask``); a fully opaque one is no mask.

The cache stores the mask area-averaged to latent size, (h/8, w/8) uint8. The loss weighs each latent pixel's
squared error by the mask scaled to mean 1 over the sample, so the loss scale, MinSNR and tag weights keep their
meaning; a row without a mask weighs 1 everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl_ztsnr.buckets import Bucket, cover_size
from sdxl_ztsnr.images import BadInputError, find_images, load_image, load_image_and_alpha

MASK_SUFFIX = ".mask"  # name.mask.png beside name.png


def _without_suffix(path: Path) -> Path:
    return path.with_suffix("")


def split_mask_files(paths: Sequence[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """(training images, {image: its ``name.mask.ext``}) of a folder's image files: ``x.mask.png`` beside an
    image ``x.*`` is that image's mask, not a sample. One without such an image stays a sample (a real picture
    may be called so); any case of ``.mask`` counts."""
    # Memory in proportion to the mask files, not to the folder (which may hold millions of images).
    candidates: dict[Path, list[Path]] = {}  # owner's path without extension -> its mask files, sorted
    for path in paths:
        base = _without_suffix(path)
        if base.name.lower().endswith(MASK_SUFFIX):
            candidates.setdefault(base.with_name(base.name[: -len(MASK_SUFFIX)]), []).append(path)
    if not candidates:
        return list(paths), {}
    masks = {path: candidates[base][0] for path in paths if (base := _without_suffix(path)) in candidates}
    used = {
        mask for path in masks for mask in candidates[_without_suffix(path)]
    }  # x.mask.jpg beside x.mask.png too
    return [path for path in paths if path not in used], masks


def masks_in_dir(mask_dir: Path, root: Path, images: Sequence[Path]) -> dict[Path, Path]:
    """{image: mask_dir/<its path under root, any image extension>} for the images that have one there."""
    by_name: dict[str, Path] = {}
    for mask in find_images(mask_dir):  # sorted: of x.jpg and x.png the first wins, every run the same
        by_name.setdefault(_without_suffix(mask.relative_to(mask_dir)).as_posix(), mask)
    found = {}
    for image in images:
        mask = by_name.get(_without_suffix(image.relative_to(root)).as_posix())
        if mask is not None:
            found[image] = mask
    return found


def fit_mask(mask: Image.Image, size: tuple[int, int], image_path: str | os.PathLike) -> Image.Image:
    """``mask`` at the image's (width, height): resized when its aspect ratio is the image's to within a
    pixel (a half-size mask), else BadInputError naming the image (a mask for another crop or orientation)."""
    if mask.size == tuple(size):
        return mask
    (mask_w, mask_h), (width, height) = mask.size, size
    # Scaled to the image's width, the mask's height is within one pixel of the image's (and vice versa).
    if abs(mask_h * width - height * mask_w) <= max(mask_w, mask_h, width, height):
        return mask.resize((width, height), Image.Resampling.BILINEAR)
    raise BadInputError(
        image_path,
        f"mask is {mask_w}x{mask_h} but the image is {width}x{height} (another aspect ratio); "
        "make the mask the image's size",
    )


def load_image_and_mask(
    path: str | os.PathLike,
    mask_path: str | os.PathLike | None,
    alpha_mask: bool,
    max_pixels: int,
) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, "L" mask of its size or None); raises BadInputError naming the image for a bad image or
    mask (unreadable, another aspect ratio, all black)."""
    if mask_path is None:
        if not alpha_mask:
            return load_image(path, max_pixels), None
        image, alpha = load_image_and_alpha(path, max_pixels)
        if alpha is not None and alpha.getextrema()[0] == 255:
            alpha = None  # fully opaque: weighs 1 everywhere, store nothing
        mask, where = alpha, "its alpha channel (--alpha_mask)"
    else:
        image = load_image(path, max_pixels)
        try:
            mask = load_image(mask_path, max_pixels).getchannel("R")  # kohya: the R channel
        except BadInputError as error:
            raise BadInputError(path, f"mask {mask_path}: {error.reason}") from None
        mask, where = fit_mask(mask, image.size, path), f"mask {mask_path}"
    if mask is not None and mask.getextrema()[1] == 0:
        raise BadInputError(path, f"{where} is all black: nothing of the image would be trained")
    return image, mask


def crop_mask(
    mask: Image.Image,
    bucket: Bucket,
    crop_top_left: tuple[int, int],
    flipped: bool,
) -> np.ndarray:
    """(H, W) uint8 of ``mask`` (the image's size) flipped, resized and cropped exactly as ``resize_to_bucket``
    did the image (same cover size, same (top, left)); bilinear, so weights never overshoot [0, 255]."""
    if flipped:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    new_size = cover_size(mask.width, mask.height, bucket)
    if new_size != mask.size:
        mask = mask.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    (top, left), (bucket_h, bucket_w) = crop_top_left, bucket
    return np.asarray(mask.crop((left, top, left + bucket_w, top + bucket_h)), dtype=np.uint8)


def latent_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """(H/scale, W/scale) uint8 area average of an (H, W) uint8 mask (the VAE's 8× downsampling): a latent
    pixel whose pixels are all black stays exactly 0."""
    height, width = mask.shape
    if height % scale or width % scale:
        raise ValueError(f"mask {height}x{width} is not a multiple of the latent scale {scale}")
    blocks = mask.reshape(height // scale, scale, width // scale, scale).astype(np.float32)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def batch_loss_mask(masks: Sequence[torch.Tensor | None], size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) uint8 loss mask of a batch's rows; a row without a mask (None) is 255 everywhere."""
    out = torch.full((len(masks), 1, *size), 255, dtype=torch.uint8)
    for i, mask in enumerate(masks):
        if mask is not None:
            out[i, 0] = mask
    return out


def normalized_mask_weights(loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) fp32 weights ∝ ``loss_mask`` with mean 1 over each sample's pixels (any mask scale)."""
    weights = loss_mask.float()
    mean = weights.mean(dim=(1, 2, 3), keepdim=True)
    return weights / mean.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero mask weighs 0, not NaN


def masked_per_sample_mse(
    prediction: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mask-weighted MSE in fp32, (B, C, h, w) and (B, 1, h, w) -> (B,): Σ m·(x̂ − x)² / (C·Σ m) per sample, the
    plain MSE when the mask is constant; pixels where m = 0 get exactly zero gradient."""
    error = (prediction.float() - target.float()).pow(2)
    weights = normalized_mask_weights(loss_mask.to(error.device))
    return (error * weights).flatten(1).mean(dim=1)
