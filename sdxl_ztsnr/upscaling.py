"""Tiled SDXL img2img upscaling (Ultimate SD Upscale style) on the one sampling path of `sdxl_ztsnr.sampling`.

Pre-upscale (Lanczos, or an upscaler model through spandrel), then redraw the canvas tile by tile at a low
denoising strength, optionally redraw the seams, and fix the colours against the pre-upscaled image.
Each tile is processed at its native size (tile + padding, rounded to what the VAE and UNet need) with SDXL
micro-conditioning chosen as in training for a crop: original_size = the whole canvas, crops_coords_top_left
= the tile window's offset, target_size = the window. Tiles of one pass read the canvas as it was when the
pass began and have their own seeds, so batching them (``tile_batch``) does not change the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl_ztsnr.color_fix import ColorFix, color_fix
from sdxl_ztsnr.sampling import (
    Conditioning,
    Sampler,
    UserError,
    decode_latents,
    denoise,
    encode_images,
    make_scheduler,
    micro_conditioning,
    pipeline_conditioning,
    seeded_noise,
    training_alpha_bar,
)
from sdxl_ztsnr.schedule import NAI_SIGMA_MAX
from sdxl_ztsnr.tiling import (
    Redraw,
    SeamsFix,
    TileJob,
    check_mask_fits,
    round_up,
    seam_passes,
    tile_passes,
    vae_tiling,
)

# Host memory per output pixel: canvas, pre-upscaled reference and Σ mask·redraw (3 fp32 channels each),
# Σ mask (1), colour-fix temporaries (2 × 3) and the 8-bit images in and out (≈ 8 bytes).
HOST_BYTES_PER_PIXEL = (3 + 3 + 3 + 1 + 6) * 4 + 8
# Device activations, rough upper bounds for SDPA attention (not measured on SDXL here): UNet ≈ this many
# copies of its first feature map (C₀ channels at 1/8 of the pixels) per image of the CFG batch; VAE decode
# ≈ this many copies of its full-resolution map (C₀ channels at every pixel).
UNET_ACTIVATION_COPIES = 100
VAE_ACTIVATION_COPIES = 12


@dataclass
class TileOptions:
    """Main redraw: tile side, padding around it, mask feather (px), pass order."""

    tile_size: int = 1024
    padding: int = 32
    mask_blur: int = 8
    redraw: Redraw = "linear"


@dataclass
class SeamsFixOptions:
    """Seams fix: mode, its own denoising strength, band width, padding and mask feather (px)."""

    mode: SeamsFix = "none"
    denoise: float = 0.35
    width: int = 64
    padding: int = 16
    mask_blur: int = 8


@dataclass
class MemoryEstimate:
    host_bytes: int
    device_bytes: int


def pixel_multiple(pipeline) -> int:
    """Window sides must be multiples of this: the VAE's 8 times the UNet's downsampling."""
    return pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)


def output_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(width, height) of the upscaled image; refuses scale < 1."""
    if not scale >= 1.0:
        raise UserError(f"--scale must be at least 1 (1 redraws at the same size), got {scale}")
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def estimate_memory(
    pipeline, size: tuple[int, int], window: int, tile_batch: int, vae_tile_size: int | None
) -> MemoryEstimate:
    """Host bytes for an output of ``size`` (w, h) and device bytes of activations (weights not counted)."""
    width, height = size
    bytes_per = torch.finfo(pipeline.unet.dtype).bits // 8
    unet_c0 = pipeline.unet.config.block_out_channels[0]
    latent_pixels = (window // pipeline.vae_scale_factor) ** 2
    unet = UNET_ACTIVATION_COPIES * 2 * tile_batch * latent_pixels * unet_c0 * bytes_per
    vae_side = min(window, vae_tile_size) if vae_tile_size else window
    vae = VAE_ACTIVATION_COPIES * vae_side**2 * pipeline.vae.config.block_out_channels[0] * 4
    return MemoryEstimate(HOST_BYTES_PER_PIXEL * width * height, max(unet, vae))


def available_memory(device: torch.device) -> tuple[int, int | None]:
    """(available host bytes, free device bytes or None for the CPU)."""
    import psutil

    host = psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return host, free
    return host, None


def check_memory(estimate: MemoryEstimate, device: torch.device, size: tuple[int, int]) -> None:
    """Refuse a run whose estimate exceeds what is available, naming the flags that shrink it."""
    host, free = available_memory(device)
    needed_host = estimate.host_bytes + (estimate.device_bytes if free is None else 0)
    gib = 2**30
    if needed_host > host:
        raise UserError(
            f"the {size[0]}x{size[1]} output needs about {needed_host / gib:.1f} GiB of memory, "
            f"{host / gib:.1f} GiB are available; lower --scale (or --tile_batch / --tile_size)"
        )
    if free is not None and estimate.device_bytes > free:
        raise UserError(
            f"one tile batch needs about {estimate.device_bytes / gib:.1f} GiB on {device}, "
            f"{free / gib:.1f} GiB are free; lower --tile_batch, --tile_size or --vae_tile_size"
        )


# ---------------------------------------------------------------------------------------------------------------
# Pre-upscale


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, alpha channel or None); palette and LA images with transparency keep it."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    return image.convert("RGB"), None


def load_upscaler(path: str | os.PathLike):
    """An upscaler model (ESRGAN and kin) through spandrel, weights read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--upscaler_model {path}: no such file")
    try:
        import spandrel
    except ImportError as error:
        raise UserError(
            f"--upscaler_model {path}: the spandrel package is needed (pip install spandrel)"
        ) from error
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return spandrel.ModelLoader().load_from_state_dict(state_dict).eval()
    except Exception as error:  # spandrel raises its own types for unknown architectures
        raise UserError(f"--upscaler_model {path}: not a model spandrel knows ({error})") from error


@torch.no_grad()
def pre_upscale(image: Image.Image, size: tuple[int, int], upscaler=None, device="cpu") -> Image.Image:
    """``image`` resized to ``size`` (w, h): Lanczos, or the upscaler model then Lanczos to the exact size."""
    if upscaler is not None:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        upscaler.to(device)
        out = upscaler(pixels.to(device)).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray((out * 255).round().astype(np.uint8))
    return image if image.size == size else image.resize(size, Image.LANCZOS)


# ---------------------------------------------------------------------------------------------------------------
# Passes


def job_seed(seed: int, pass_index: int, job_index: int) -> int:
    """A well-mixed 32-bit seed per (seed, pass, tile)."""
    return int(np.random.SeedSequence([seed, pass_index, job_index]).generate_state(1)[0])


@torch.no_grad()
def redraw_pass(
    pipeline,
    canvas: torch.Tensor,
    jobs: list[TileJob],
    conditioning: Conditioning,
    make: Callable[[], object],
    strength: float,
    guidance_scale: float,
    guidance_rescale: float,
    seeds: list[int],
    original_size: tuple[int, int],
    tile_batch: int,
    vae_tile_size: int | None,
    on_tile: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Redraw every job's window of ``canvas`` (3, H, W) in [0, 1] and blend them back by their masks.

    Windows are cut from the canvas as it is on entry; Σ mask·redraw / Σ mask replaces the canvas where the
    masks cover it fully and is blended in where they cover it partly. ``make`` builds a fresh scheduler.
    """
    total = torch.zeros_like(canvas)
    weight = torch.zeros_like(canvas[:1])
    for start in range(0, len(jobs), tile_batch):
        batch = jobs[start : start + tile_batch]
        windows = torch.stack(
            [canvas[:, t : t + h, lf : lf + w] for t, lf, h, w in (j.window for j in batch)]
        )
        with vae_tiling(pipeline.vae, vae_tile_size):
            latents = encode_images(pipeline.vae, windows * 2 - 1)
        time_ids = torch.stack(
            [micro_conditioning(original_size, (j.window[0], j.window[1]), j.window[2:]) for j in batch]
        )
        latents = denoise(
            pipeline.unet,
            make(),
            conditioning.select([0] * len(batch)),
            time_ids,
            seeded_noise(latents.shape[1:], seeds[start : start + len(batch)]),
            init_latents=latents,
            strength=strength,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
        )
        with vae_tiling(pipeline.vae, vae_tile_size):
            redrawn = decode_latents(pipeline.vae, latents).cpu()
        for job, pixels in zip(batch, redrawn, strict=True):
            top, left, height, width = job.window
            mask = job.mask()
            check_mask_fits(job, mask, tuple(canvas.shape[1:]))
            total[:, top : top + height, left : left + width] += mask * pixels
            weight[:, top : top + height, left : left + width] += mask
        if on_tile is not None:
            on_tile(len(batch))
    covered = weight.clamp(max=1.0)
    return canvas * (1 - covered) + total / weight.clamp_min(1e-8) * covered


def upscale(
    pipeline,
    image: Image.Image,
    scale: float = 2.0,
    prompt: str = "",
    negative_prompt: str = "",
    denoise_strength: float = 0.35,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.7,
    sampler: Sampler = "euler",
    seed: int = 0,
    tiles: TileOptions | None = None,
    seams: SeamsFixOptions | None = None,
    tile_batch: int = 1,
    color_fix_mode: ColorFix = "wavelet",
    upscaler=None,
    vae_tile_size: int | None = 1024,
    sigma_max: float = NAI_SIGMA_MAX,
    emphasis: bool = True,
    progress: bool = False,
) -> Image.Image:
    """Upscale ``image`` by ``scale`` with tiled img2img; RGBA in gives RGBA out (alpha resized separately)."""
    from tqdm.auto import tqdm

    tiles, seams = tiles or TileOptions(), seams or SeamsFixOptions()
    check_options(tiles, seams, tile_batch, denoise_strength, num_steps)
    rgb, alpha = split_alpha(image)
    size = output_size(rgb.size, scale)
    multiple = pixel_multiple(pipeline)
    # The working canvas is padded (edge pixels repeated) to a multiple of what the models need.
    canvas_hw = (-(-size[1] // multiple) * multiple, -(-size[0] // multiple) * multiple)
    tile_size = min(tiles.tile_size, max(canvas_hw))
    # Estimate before laying out: a refused output may have millions of tiles.
    window = min(round_up(tile_size + 2 * max(tiles.padding, seams.padding), multiple), max(canvas_hw))
    estimate = estimate_memory(pipeline, size, window, tile_batch, vae_tile_size)
    check_memory(estimate, pipeline.unet.device, size)
    main = tile_passes(canvas_hw, tile_size, tiles.padding, tiles.mask_blur, tiles.redraw, multiple)
    fixes = seam_passes(
        canvas_hw, tile_size, seams.mode, seams.width, seams.padding, seams.mask_blur, multiple
    )
    passes = main + fixes
    strengths = [denoise_strength] * len(main) + [seams.denoise] * len(fixes)
    window = max(max(j.window[2], j.window[3]) for jobs in passes for j in jobs)
    if progress:
        print(
            f"upscaling to {size[0]}x{size[1]}: {sum(map(len, passes))} tiles of up to {window}px in "
            f"{len(passes)} pass(es); estimated memory {estimate.host_bytes / 2**30:.2f} GiB host, "
            f"{estimate.device_bytes / 2**30:.2f} GiB activations"
        )

    reference = pre_upscale(rgb, size, upscaler, pipeline.unet.device)
    reference_t = torch.from_numpy(np.asarray(reference, dtype=np.float32) / 255).permute(2, 0, 1)
    pad = (0, canvas_hw[1] - size[0], 0, canvas_hw[0] - size[1])
    canvas = torch.nn.functional.pad(reference_t[None], pad, mode="replicate")[0]
    conditioning = pipeline_conditioning(pipeline, [prompt], [negative_prompt], emphasis)
    config = dict(pipeline.scheduler.config)
    alpha_bar = training_alpha_bar(config, sigma_max)
    bar = tqdm(total=sum(map(len, passes)), desc="tiles", unit="tile", disable=not progress)
    for index, (jobs, strength) in enumerate(zip(passes, strengths, strict=True)):
        canvas = redraw_pass(
            pipeline,
            canvas,
            jobs,
            conditioning,
            lambda: make_scheduler(sampler, config, num_steps, alpha_bar),
            strength,
            guidance_scale,
            guidance_rescale,
            [job_seed(seed, index, k) for k in range(len(jobs))],
            (size[1], size[0]),
            tile_batch,
            vae_tile_size,
            on_tile=bar.update,
        )
    bar.close()
    result = color_fix(canvas[:, : size[1], : size[0]], reference_t, color_fix_mode)
    out = Image.fromarray((result.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if alpha is not None:
        out.putalpha(alpha.resize(size, Image.LANCZOS))
    return out


def check_options(
    tiles: TileOptions, seams: SeamsFixOptions, tile_batch: int, denoise_strength: float, steps: int
) -> None:
    """Refuse option values that cannot work, with one line naming the flag."""
    positive = {"--tile_size": tiles.tile_size, "--tile_batch": tile_batch, "--steps": steps}
    if seams.mode == "band_pass":
        positive["--seams_fix_width"] = seams.width
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    for flag, value in {"--denoise": denoise_strength, "--seams_fix_denoise": seams.denoise}.items():
        if not 0.0 < value <= 1.0:
            raise UserError(f"{flag} must be in (0, 1], got {value}")
    pairs = [("--mask_blur", tiles.mask_blur, "--padding", tiles.padding)]
    if seams.mode != "none":
        pairs.append(("--seams_fix_mask_blur", seams.mask_blur, "--seams_fix_padding", seams.padding))
    for blur_flag, blur, padding_flag, padding in pairs:
        # The feathered mask reaches blur/2 past the tile; the window must hold it (plus a pixel).
        if padding < 0 or blur < 0 or (blur > 0 and blur > 2 * (padding - 1)):
            raise UserError(
                f"{blur_flag} ({blur}) must be 0, or at most 2 × ({padding_flag} − 1) = {2 * (padding - 1)}"
            )
