"""Aspect-ratio buckets: NovelAI's bucketing algorithm scaled to SDXL (arXiv:2409.15997, NAI aspect ratio
bucketing write-up), the nearest-bucket rule and the resize-to-cover crop that records SDXL's
micro-conditioning crop offset."""

from __future__ import annotations

import math
import random
from typing import Literal

from PIL import Image

Bucket = tuple[int, int]  # (height, width) in pixels, height first as SDXL's size conditioning


def make_buckets(
    resolution: int = 1024, step: int = 64, min_side: int | None = None, max_side: int | None = None
) -> list[Bucket]:
    """NAI bucketing: walk one side from min_side to max_side in `step`s, give the other the largest multiple
    of `step` keeping area <= resolution², add the swapped pair; returns sorted unique (height, width)."""
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution ({resolution}) and step ({step}) must be positive")
    if resolution % step:
        raise ValueError(
            f"step {step} does not divide resolution {resolution}; pick a step that does (e.g. 64 for 1024, "
            "32 for 128) so the square bucket exists"
        )
    # Defaults: half and double the resolution, snapped inwards to the step grid.
    if min_side is None:
        min_side = step * math.ceil(resolution / 2 / step)
    if max_side is None:
        max_side = step * (resolution * 2 // step)
    for name, side in (("min_side", min_side), ("max_side", max_side)):
        if side <= 0 or side % step:
            raise ValueError(f"{name}={side} must be a positive multiple of step={step}")
    if min_side > max_side:
        raise ValueError(f"min_side={min_side} is larger than max_side={max_side}")
    if not min_side <= resolution <= max_side:
        raise ValueError(
            f"no square bucket: resolution {resolution} is outside [min_side={min_side}, max_side={max_side}]"
        )
    max_area = resolution * resolution
    buckets: set[Bucket] = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height < min_side:
            continue  # width too large for any height within bounds
        buckets.add((height, width))
        buckets.add((width, height))
    if not buckets:
        raise ValueError(
            f"no bucket possible for resolution={resolution}, step={step}, sides in [{min_side}, {max_side}]"
        )
    return sorted(buckets)


def bucket_for(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio |log(h/w) - log(bh/bw)|; ties go to the larger area."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if not buckets:
        raise ValueError("empty bucket list; build one with make_buckets()")
    log_aspect = math.log(height / width)

    def key(bucket: Bucket) -> tuple[float, int]:
        # Rounding makes mirrored distances (e.g. an image exactly between two buckets) compare equal.
        distance = round(abs(log_aspect - math.log(bucket[0] / bucket[1])), 12)
        return distance, -bucket[0] * bucket[1]

    return min(buckets, key=key)


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """(width, height) a width × height image is resized to so it covers the bucket (height, width), aspect kept."""
    bucket_h, bucket_w = bucket
    scale = max(bucket_h / height, bucket_w / width)
    # The covering side is exact; max() guards the other against rounding below the bucket.
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def resize_to_bucket(
    image: Image.Image,
    bucket: Bucket,
    crop: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover the bucket (Lanczos), then crop to it; returns (image, (top, left)).

    (top, left) is the crop offset in the resized image, SDXL's `crops_coords_top_left` (Podell et al. 2023,
    arXiv:2307.01952, section 2.2). crop="random" draws the offset from `rng` (required, for determinism).
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs rng=random.Random(seed) so the crop is reproducible")
    bucket_h, bucket_w = bucket
    if bucket_h <= 0 or bucket_w <= 0:
        raise ValueError(f"bucket sides must be positive, got {bucket}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image has an empty size {image.size}")
    new_w, new_h = cover_size(width, height, bucket)
    if (new_w, new_h) != (width, height):
        # reducing_gap=3 first box-reduces large downscales; PIL documents it as indistinguishable from
        # plain Lanczos at that gap, and it is much faster for 4K+ sources.
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    spare_h, spare_w = new_h - bucket_h, new_w - bucket_w
    if crop == "center":
        top, left = spare_h // 2, spare_w // 2
    else:
        assert rng is not None
        top, left = rng.randint(0, spare_h), rng.randint(0, spare_w)
    if spare_h or spare_w:
        image = image.crop((left, top, left + bucket_w, top + bucket_h))
    return image, (top, left)
