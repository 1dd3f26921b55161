"""Upscale an image with an SDXL model: pre-upscale, then tiled img2img (Ultimate SD Upscale style).

    python upscale.py --model OUT_DIR --image in.png --scale 2 --out out.png --prompt "1girl, solo"
    python upscale.py --model model.safetensors --config BASE_DIR --image in.png --scale 2 --out out.png \\
        --seams_fix band_pass --tile_batch 4

A v-prediction ZTSNR model redraws from its trailing ladder, a plain ε SDXL with its own scheduler settings.
An alpha channel is upscaled on its own and kept (RGBA out).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from sdxl_ztsnr import options
from sdxl_ztsnr.color_fix import COLOR_FIX_MODES
from sdxl_ztsnr.console import make_output_dir
from sdxl_ztsnr.run_config import parse_with_config_file
from sdxl_ztsnr.sample import torch_dtype
from sdxl_ztsnr.sampling import (
    A1111_SAMPLER_NAMES,
    SAMPLERS,
    UserError,
    a1111_parameters,
    load_pipeline,
    save_png,
)
from sdxl_ztsnr.schedule import NAI_SIGMA_MAX
from sdxl_ztsnr.tiling import REDRAW_MODES, SEAMS_FIX_MODES
from sdxl_ztsnr.upscaling import SeamsFixOptions, TileOptions, load_upscaler, split_alpha, upscale
from sdxl_ztsnr.validation import image_grid

OUTPUT_FORMATS = {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.new_parser(__doc__.split("\n")[0], raw_help=False)
    options.add_sampling_options(
        parser,
        steps=20,
        steps_help="ladder length; the last round(steps·denoise) run",
        prompt={"default": ""},
        samplers=SAMPLERS,
        sigma_max=NAI_SIGMA_MAX,
        model_help="a diffusers pipeline directory or a single .safetensors",
        config_help="for a single file: a diffusers SDXL directory of configs",
    )
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help=".png, .webp or .jpg")
    parser.add_argument(
        "--scale", type=float, default=2.0, help="output size / input size (1 redraws in place)"
    )
    parser.add_argument(
        "--upscaler_model", default=None, help="ESRGAN-style model file for spandrel, if installed"
    )
    parser.add_argument("--denoise", type=float, default=0.35, help="img2img strength of the tile redraw")
    tiles = parser.add_argument_group("tiles")
    tiles.add_argument("--tile_size", type=int, default=1024)
    tiles.add_argument("--padding", type=int, default=32, help="context around each tile, px")
    tiles.add_argument("--mask_blur", type=int, default=8, help="feather of the tile masks, px")
    tiles.add_argument("--redraw", choices=REDRAW_MODES, default="linear")
    tiles.add_argument("--tile_batch", type=int, default=1, help="tiles per UNet call (same result as 1)")
    tiles.add_argument(
        "--vae_tile_size", type=int, default=1024, help="tile the VAE above this side; 0: never"
    )
    seams = parser.add_argument_group("seams fix")
    seams.add_argument("--seams_fix", choices=SEAMS_FIX_MODES, default="none")
    seams.add_argument("--seams_fix_denoise", type=float, default=0.35)
    seams.add_argument("--seams_fix_width", type=int, default=64)
    seams.add_argument("--seams_fix_padding", type=int, default=16)
    seams.add_argument("--seams_fix_mask_blur", type=int, default=8)
    parser.add_argument("--side_by_side", type=Path, default=None, help="also write Lanczos | result here")
    parser.add_argument("--color_fix", choices=COLOR_FIX_MODES, default="wavelet")
    options.add_device_options(parser, cuda=torch.cuda.is_available())
    return parse_with_config_file(parser, argv)


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image, or exit with one line naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise UserError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"--image {path}: not a readable image ({error})") from None


def main(args: argparse.Namespace) -> Path:
    if args.out.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {args.out}: use a .png, .webp or .jpg name")
    image = read_image(args.image)
    if OUTPUT_FORMATS[args.out.suffix.lower()] == "JPEG" and split_alpha(image)[1] is not None:
        raise UserError(f"--out {args.out}: JPEG cannot keep the alpha channel; use .png or .webp")
    make_output_dir(args.out.parent, "--out")  # before minutes of sampling
    upscaler = load_upscaler(args.upscaler_model) if args.upscaler_model else None
    pipeline = load_pipeline(args.model, args.config, args.device, torch_dtype(args.dtype, args.device))
    # -1 is A1111's "random", as the sampler command reads it; the seed drawn is written to the image.
    seed = random.randrange(2**32) if args.seed == -1 else args.seed
    result = upscale(
        pipeline,
        image,
        scale=args.scale,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        denoise_strength=args.denoise,
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        sampler=args.sampler,
        seed=seed,
        tiles=TileOptions(args.tile_size, args.padding, args.mask_blur, args.redraw),
        seams=SeamsFixOptions(
            args.seams_fix,
            args.seams_fix_denoise,
            args.seams_fix_width,
            args.seams_fix_padding,
            args.seams_fix_mask_blur,
        ),  # fmt: skip
        tile_batch=args.tile_batch,
        color_fix_mode=args.color_fix,
        upscaler=upscaler,
        vae_tile_size=args.vae_tile_size or None,
        sigma_max=args.sigma_max,
        emphasis=not args.no_emphasis,
        progress=True,
    )
    settings = {
        "Steps": args.steps,
        "Sampler": A1111_SAMPLER_NAMES[args.sampler],
        "CFG scale": args.guidance_scale,
        "Seed": seed,
        "Size": f"{result.width}x{result.height}",
        "Model": Path(args.model).stem,
        "Denoising strength": args.denoise,
        "CFG Rescale phi": args.guidance_rescale or None,
        "Upscale": f"{args.scale}x {args.upscaler_model and Path(args.upscaler_model).stem or 'Lanczos'}",
        "Tiles": f"{args.tile_size} padding {args.padding} blur {args.mask_blur} {args.redraw}",
        "Seams fix": None
        if args.seams_fix == "none"
        else f"{args.seams_fix} denoise {args.seams_fix_denoise}",
        "Color fix": args.color_fix,
    }
    fmt = OUTPUT_FORMATS[args.out.suffix.lower()]
    if fmt == "PNG":
        save_png(result, args.out, a1111_parameters(args.prompt, args.negative_prompt, settings))
    else:
        result.save(args.out, format=fmt, quality=95)
    if args.side_by_side is not None:
        plain = image.convert(result.mode).resize(result.size, Image.LANCZOS)
        image_grid([plain, result], columns=2).save(args.side_by_side)
    print(f"wrote {args.out} ({result.width}x{result.height}, {result.mode})")
    return args.out


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
