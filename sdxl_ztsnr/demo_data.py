"""Synthetic tag-captioned image folder for tests, demos and smoke runs of the training scripts.

Writes `NNN_kind.png|jpg` + `NNN_kind.txt` pairs in the input folder format (comma-separated tags):
solid black / white / grey / colours (the cases zero terminal SNR is about: a plain SDXL model cannot
reach them), stripes, checkerboards, noise, gradients and circles, at several aspect ratios, with one
dominant tag, a few rare ones and style/setting/quality tags for tag-based loss weighting.

    python -m sdxl_ztsnr.demo_data OUT_DIR [--n 64] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) in pixels: square, landscape 3:2 and 2:1, portrait 2:3 and 1:2, small square.
# Seven entries against an eleven-kind cycle, so every kind meets several shapes.
SIZES = ((128, 128), (192, 128), (128, 192), (256, 128), (128, 256), (96, 96), (160, 224))

# The order of kinds; image i has kind KINDS[i % len(KINDS)], so every 11 images hold one of each.
KINDS = (
    "solid_black",
    "solid_white",
    "solid_grey",
    "solid_colour",
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "noise",
    "gradient",
    "circle",
    "solid_colour",
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
}
STYLE_TAGS = ("anime style", "watercolor", "flat color", "lineart")
SETTING_TAGS = ("outdoor", "indoor")
QUALITY_TAGS = ("masterpiece", "best quality")
DOMINANT_TAG = "high quality"  # on every image except each eighth, which says "low quality"
# Tags on one or two images only (by index), to give tag-frequency weighting something to find.
RARE_TAGS = {3: ("sparkles",), 6: ("watermark",), 10: ("watermark", "signature")}

BLACK, WHITE, GREY = (0, 0, 0), (255, 255, 255), (128, 128, 128)


def _kind_pixels(
    kind: str, width: int, height: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """Render one image of `kind`: (H, W, 3) uint8 pixels and the tags that describe them."""
    names = sorted(COLOURS)
    colour_a, colour_b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    rgb_a, rgb_b = np.array(COLOURS[colour_a], np.uint8), np.array(COLOURS[colour_b], np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    if kind == "solid_black":
        return np.full((height, width, 3), BLACK, np.uint8), ["solid black", "simple background"]
    if kind == "solid_white":
        return np.full((height, width, 3), WHITE, np.uint8), ["solid white", "simple background"]
    if kind == "solid_grey":
        return np.full((height, width, 3), GREY, np.uint8), ["solid grey", "simple background"]
    if kind == "solid_colour":
        return np.full((height, width, 3), rgb_a, np.uint8), [f"solid {colour_a}", "simple background"]
    if kind in ("horizontal_stripes", "vertical_stripes", "checkerboard"):
        period = int(rng.choice([8, 16, 32]))  # pixels per stripe / square
        rows, cols = (y // period) % 2, (x // period) % 2
        mask = {"horizontal_stripes": rows, "vertical_stripes": cols, "checkerboard": rows ^ cols}[kind]
        pixels = np.where(mask[..., None] == 1, rgb_a, rgb_b).astype(np.uint8)
        return pixels, [kind.replace("_", " "), colour_a, colour_b, "pattern"]
    if kind == "noise":
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        return pixels, ["noise", "colorful", "texture"]
    if kind == "gradient":
        vertical = bool(rng.integers(2))
        ramp = (y / max(height - 1, 1)) if vertical else (x / max(width - 1, 1))  # 0..1 along the gradient
        pixels = (rgb_a * (1 - ramp[..., None]) + rgb_b * ramp[..., None]).round().astype(np.uint8)
        direction = "vertical gradient" if vertical else "horizontal gradient"
        return pixels, ["gradient", direction, colour_a, colour_b]
    if kind == "circle":
        image = Image.new("RGB", (width, height), tuple(int(c) for c in rgb_b))
        radius = min(width, height) // 3
        cx, cy = width // 2, height // 2
        ImageDraw.Draw(image).ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius), fill=COLOURS[colour_a]
        )
        return np.asarray(image), ["circle", f"{colour_a} circle", f"{colour_b} background"]
    raise ValueError(f"unknown demo image kind {kind!r}; expected one of {sorted(set(KINDS))}")


def _file_format(kind: str, index: int) -> str:
    """Exact-colour images are PNG (lossless, so tests can check pixel values); the rest alternate PNG/JPEG."""
    if kind in ("solid_black", "solid_white", "solid_grey", "checkerboard"):
        return "png"
    return "jpg" if index % 2 else "png"


def demo_caption(kind_tags: list[str], index: int, rng: np.random.Generator) -> str:
    """Comma-separated tags: style, setting, what the image shows, rare tags, quality tags last."""
    tags = [str(rng.choice(STYLE_TAGS)), str(rng.choice(SETTING_TAGS)), *kind_tags]
    tags += RARE_TAGS.get(index, ())
    low_quality = index % 8 == 7
    extra_quality = str(rng.choice(QUALITY_TAGS)) if rng.random() < 0.25 else None
    if extra_quality and not low_quality:
        tags.append(extra_quality)
    tags.append("low quality" if low_quality else DOMINANT_TAG)
    return ", ".join(tags)


def write_demo_dataset(out_dir: str | Path, n: int = 64, seed: int = 0) -> list[Path]:
    """Write `n` synthetic images with tag captions to `out_dir`; returns the image paths in order."""
    if n < 1:
        raise ValueError(f"n={n}: the demo dataset needs at least one image (--n 1 or more)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(
            f"{out_dir}: exists and is not a directory; pass a directory for the dataset"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(n):
        kind = KINDS[index % len(KINDS)]
        width, height = SIZES[index % len(SIZES)]
        pixels, kind_tags = _kind_pixels(kind, width, height, rng)
        extension = _file_format(kind, index)
        path = out_dir / f"{index:03d}_{kind}.{extension}"
        image = Image.fromarray(pixels)
        if extension == "jpg":
            image.save(path, quality=95)
        else:
            image.save(path)
        path.with_suffix(".txt").write_text(demo_caption(kind_tags, index, rng) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_ztsnr.demo_data",
        description="Write a synthetic folder of images + tag captions (name.png/.jpg + name.txt).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the images and captions to")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = write_demo_dataset(args.out_dir, n=args.n, seed=args.seed)
    print(f"wrote {len(paths)} images with captions to {args.out_dir}")


if __name__ == "__main__":
    main()
