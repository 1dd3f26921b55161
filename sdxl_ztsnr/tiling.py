"""Tile layout for Ultimate-SD-style upscaling: tiles, feathered masks, seams-fix passes, a seam metric.

Every redraw is a `TileJob`: a window of the canvas (cut out, redrawn by img2img, put back) and a mask over
that window saying how much of the redrawn pixels to keep. Masks are products of 1-D profiles built so that
neighbouring masks sum to 1 (a partition of unity): a pass accumulates Σ mask·redrawn and Σ mask, and the
canvas becomes its weighted mean where the masks cover it fully and a blend where they cover it partly (seam
bands). The result of a pass does not depend on the order of its jobs or on how they are batched.

All coordinates are canvas pixels; boxes are (top, left, height, width).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch

Redraw = Literal["linear", "chess"]
SeamsFix = Literal["none", "band_pass", "half_tile", "half_tile_intersections"]
REDRAW_MODES: tuple[str, ...] = ("linear", "chess")
SEAMS_FIX_MODES: tuple[str, ...] = ("none", "band_pass", "half_tile", "half_tile_intersections")
Box = tuple[int, int, int, int]


def _smooth(u: torch.Tensor) -> torch.Tensor:
    """Cosine ease 0 → 1 on [0, 1], clamped outside; s(u) + s(1 − u) = 1."""
    return 0.5 - 0.5 * torch.cos(math.pi * u.clamp(0.0, 1.0))


@dataclass(frozen=True)
class Ramp:
    """1 on [start, end) with cosine shoulders ``feather`` px wide centred on both ends (0.5 at the end
    itself); an end marked open (a canvas edge) has no shoulder. Neighbours sharing an end sum to 1."""

    start: float
    end: float
    feather: float
    open_start: bool = False
    open_end: bool = False

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        centre = coords + 0.5  # pixel centres
        if self.feather <= 0:
            rising = (centre >= self.start).float()
            falling = (centre < self.end).float()
        else:
            rising = _smooth((centre - self.start) / self.feather + 0.5)
            falling = _smooth((self.end - centre) / self.feather + 0.5)
        ones = torch.ones_like(centre)
        return (ones if self.open_start else rising) * (ones if self.open_end else falling)


@dataclass(frozen=True)
class Bump:
    """Cosine bump: 1 at ``centre``, 0 from ``half_width`` away on (USDU's gradient seam masks)."""

    centre: float
    half_width: float

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        return _smooth(1.0 - (coords + 0.5 - self.centre).abs() / self.half_width)


@dataclass(frozen=True)
class TileJob:
    """One window to redraw and its mask: profile_y(y)·profile_x(x), or a radial bump around (cy, cx)."""

    window: Box
    profile_y: Ramp | Bump
    profile_x: Ramp | Bump
    radial: bool = False

    def mask(self) -> torch.Tensor:
        """(h, w) fp32 weights in [0, 1] over the window."""
        top, left, height, width = self.window
        ys = torch.arange(top, top + height, dtype=torch.float32)
        xs = torch.arange(left, left + width, dtype=torch.float32)
        if self.radial:
            dy = ys[:, None] + 0.5 - self.profile_y.centre
            dx = xs[None, :] + 0.5 - self.profile_x.centre
            return _smooth(1.0 - (dy**2 + dx**2).sqrt() / self.profile_y.half_width)
        return self.profile_y(ys)[:, None] * self.profile_x(xs)[None, :]


def tile_edges(size: int, tile: int) -> list[int]:
    """Edges [0, …, size] of ceil(size/tile) near-equal tiles (sizes differ by at most 1 px)."""
    count = max(1, math.ceil(size / tile))
    return [round(i * size / count) for i in range(count + 1)]


def round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def window_size(extent: float, padding: int, canvas: int, multiple: int) -> int:
    """Window side for a region ``extent`` px long plus ``padding`` on both sides: a multiple of ``multiple``
    (what the VAE and the UNet's downsampling need), at most the canvas side (itself such a multiple)."""
    return min(round_up(extent + 2 * padding, multiple), canvas)


def place(centre: float, size: int, canvas: int) -> int:
    """Start of a ``size`` window centred on ``centre`` and shifted to lie inside [0, canvas)."""
    return int(min(max(round(centre - size / 2), 0), canvas - size))


def _jobs_over(
    regions: list[tuple[float, float, float, float, Ramp | Bump, Ramp | Bump, bool]],
    canvas: tuple[int, int],
    padding: int,
    multiple: int,
) -> list[TileJob]:
    """Jobs for (y0, y1, x0, x1, profile_y, profile_x, radial) regions; all windows of a pass share one size."""
    if not regions:
        return []
    height = max(window_size(y1 - y0, padding, canvas[0], multiple) for y0, y1, *_ in regions)
    width = max(window_size(r[3] - r[2], padding, canvas[1], multiple) for r in regions)
    jobs = []
    for y0, y1, x0, x1, profile_y, profile_x, radial in regions:
        top, left = place((y0 + y1) / 2, height, canvas[0]), place((x0 + x1) / 2, width, canvas[1])
        jobs.append(TileJob((top, left, height, width), profile_y, profile_x, radial))
    return jobs


def tile_passes(
    canvas: tuple[int, int],
    tile_size: int,
    padding: int,
    mask_blur: int,
    redraw: Redraw = "linear",
    multiple: int = 8,
) -> list[list[TileJob]]:
    """The main redraw: one pass over every tile ("linear"), or two ("chess": the tiles of one colour, then
    the others, which then see their redrawn neighbours in their padding). Tiles are clamped to the canvas."""
    if redraw not in REDRAW_MODES:
        raise ValueError(f"redraw must be one of {', '.join(REDRAW_MODES)}, got {redraw!r}")
    ys, xs = tile_edges(canvas[0], tile_size), tile_edges(canvas[1], tile_size)
    passes: list[list] = [[], []]
    for i, (y0, y1) in enumerate(pairwise(ys)):
        for j, (x0, x1) in enumerate(pairwise(xs)):
            profile_y = Ramp(y0, y1, mask_blur, y0 == 0, y1 == canvas[0])
            profile_x = Ramp(x0, x1, mask_blur, x0 == 0, x1 == canvas[1])
            colour = (i + j) % 2 if redraw == "chess" else 0
            passes[colour].append((y0, y1, x0, x1, profile_y, profile_x, False))
    return [_jobs_over(regions, canvas, padding, multiple) for regions in passes if regions]


def seam_passes(
    canvas: tuple[int, int],
    tile_size: int,
    mode: SeamsFix,
    width: int,
    padding: int,
    mask_blur: int,
    multiple: int = 8,
) -> list[list[TileJob]]:
    """Passes that redraw the seams between the tiles of `tile_passes` (USDU's seams fix):

    - band_pass: a band ``width`` px wide over every seam (vertical seams, then horizontal), its mask a bump
      across the seam, cut along the seam into tile-long pieces with ``mask_blur`` shoulders;
    - half_tile: tiles shifted by half a tile so that each straddles a seam, masked by a bump across it
      (horizontal seams, then vertical);
    - half_tile_intersections: half_tile, then tiles centred on every seam crossing with a radial bump.
    """
    if mode not in SEAMS_FIX_MODES:
        raise ValueError(f"seams_fix must be one of {', '.join(SEAMS_FIX_MODES)}, got {mode!r}")
    ys, xs = tile_edges(canvas[0], tile_size), tile_edges(canvas[1], tile_size)
    inner_y, inner_x = ys[1:-1], xs[1:-1]
    rows, cols = list(pairwise(ys)), list(pairwise(xs))
    regions: list[list] = []
    if mode == "band_pass":
        half = width / 2
        regions.append(  # vertical seams at x = c, cut into pieces along the rows
            [
                (
                    y0,
                    y1,
                    c - half,
                    c + half,
                    Ramp(y0, y1, mask_blur, y0 == 0, y1 == canvas[0]),
                    Bump(c, half),
                    False,
                )
                for c in inner_x
                for y0, y1 in rows
            ]
        )
        regions.append(
            [
                (
                    c - half,
                    c + half,
                    x0,
                    x1,
                    Bump(c, half),
                    Ramp(x0, x1, mask_blur, x0 == 0, x1 == canvas[1]),
                    False,
                )
                for c in inner_y
                for x0, x1 in cols
            ]
        )
    elif mode in ("half_tile", "half_tile_intersections"):
        tile_h, tile_w = ys[1] - ys[0], xs[1] - xs[0]
        regions.append(
            [
                (c - tile_h / 2, c + tile_h / 2, x0, x1, Bump(c, tile_h / 2),
                 Ramp(x0, x1, mask_blur, x0 == 0, x1 == canvas[1]), False)
                for c in inner_y
                for x0, x1 in cols
            ]
        )  # fmt: skip
        regions.append(
            [
                (y0, y1, c - tile_w / 2, c + tile_w / 2, Ramp(y0, y1, mask_blur, y0 == 0, y1 == canvas[0]),
                 Bump(c, tile_w / 2), False)
                for c in inner_x
                for y0, y1 in rows
            ]
        )  # fmt: skip
        if mode == "half_tile_intersections":
            radius = min(tile_h, tile_w) / 2
            regions.append(
                [
                    (
                        cy - radius,
                        cy + radius,
                        cx - radius,
                        cx + radius,
                        Bump(cy, radius),
                        Bump(cx, radius),
                        True,
                    )
                    for cy in inner_y
                    for cx in inner_x
                ]
            )
    return [jobs for r in regions if (jobs := _jobs_over(r, canvas, padding, multiple))]


def check_mask_fits(job: TileJob, mask: torch.Tensor, canvas: tuple[int, int]) -> None:
    """Raise when ``mask`` does not fall to ~0 at an edge of the job's window inside the canvas: its redraw
    would end in a visible step (the padding is smaller than half the mask blur or band)."""
    top, left, height, width = job.window
    edges = [
        mask[0] if top > 0 else None,
        mask[-1] if top + height < canvas[0] else None,
        mask[:, 0] if left > 0 else None,
        mask[:, -1] if left + width < canvas[1] else None,
    ]
    if max((float(e.max()) for e in edges if e is not None), default=0.0) > 0.02:
        raise ValueError(
            f"a tile mask reaches the edge of its window {job.window}: the padding must be at least half "
            "the mask blur plus a few pixels"
        )


def seam_energy(
    image: torch.Tensor, row_edges: Sequence[int], col_edges: Sequence[int]
) -> tuple[float, float]:
    """(mean |Δ| between neighbouring pixels across tile borders, mean |Δ| between all other neighbours) of a
    (C, H, W) image; the ratio measures how visible the seams are (1 ≈ invisible)."""
    image = image.float()
    dx = (image[:, :, 1:] - image[:, :, :-1]).abs().mean(0)  # (H, W−1): pair (x, x+1)
    dy = (image[:, 1:, :] - image[:, :-1, :]).abs().mean(0)  # (H−1, W)
    border_x = torch.zeros(dx.shape[1], dtype=torch.bool)
    border_x[[c - 1 for c in col_edges if 0 < c < image.shape[2]]] = True
    border_y = torch.zeros(dy.shape[0], dtype=torch.bool)
    border_y[[r - 1 for r in row_edges if 0 < r < image.shape[1]]] = True
    border = torch.cat([dx[:, border_x].reshape(-1), dy[border_y].reshape(-1)])
    inside = torch.cat([dx[:, ~border_x].reshape(-1), dy[~border_y].reshape(-1)])
    return float(border.mean()), float(inside.mean())


@contextmanager
def vae_tiling(vae, tile_px: int | None) -> Iterator[None]:
    """Within the block the VAE encodes/decodes inputs larger than ``tile_px`` in overlapping tiles
    (diffusers' AutoencoderKL tiling); None or 0 leaves it untiled."""
    if not tile_px:
        yield
        return
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, tile_px, tile_px // down
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved
