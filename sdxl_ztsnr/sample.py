"""Sample a trained model with the settings it needs: ZTSNR from σ_max with trailing spacing, CFG rescale.

    python -m sdxl_ztsnr.sample --model OUT_DIR --prompt "1girl, solid black background" --out samples
    python -m sdxl_ztsnr.sample --model model.safetensors --config BASE_DIR --prompt ... --out samples

Each image is a PNG carrying its generation parameters in A1111's ``parameters`` text chunk; image i (over
all prompts, --num_images per prompt) uses seed --seed + i. A plain ε SDXL samples with its own scheduler
settings.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from sdxl_ztsnr import options
from sdxl_ztsnr.run_config import parse_with_config_file
from sdxl_ztsnr.sampling import (
    A1111_SAMPLER_NAMES,
    SAMPLERS,
    UserError,
    a1111_parameters,
    generate,
    load_pipeline,
    model_hash,
    save_png,
    training_alpha_bar,
)
from sdxl_ztsnr.schedule import NAI_SIGMA_MAX
from sdxl_ztsnr.validation import image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.new_parser(__doc__.split("\n")[0], raw_help=False, prog="python -m sdxl_ztsnr.sample")
    options.add_sampling_options(
        parser,
        steps=28,
        steps_help=None,
        prompt={
            "required": True,
            "action": "append",
            "help": "A1111 emphasis: (tag:1.2), (tag), [tag]; repeatable",
        },
        samplers=SAMPLERS,
        sigma_max=NAI_SIGMA_MAX,
        model_help="a diffusers pipeline directory or a single .safetensors",
        config_help="for a single file: a diffusers SDXL directory holding the configs",
        rescale_help="CFG rescale φ (Lin et al. 2023)",
        sigma_help="first σ of a ZTSNR model",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory for the PNGs (created)")
    parser.add_argument("--num_images", type=int, default=1, help="per prompt")
    parser.add_argument("--batch_size", type=int, default=1, help="images per UNet call")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument(
        "--attention_scaling",
        action="store_true",
        help="scale self-attention logits by √(log n / log n_train) (Jin et al. 2023) above --base_resolution",
    )
    parser.add_argument("--base_resolution", type=int, default=1024, help="side the model was trained at")
    parser.add_argument(
        "--grid", type=Path, default=None, help="also write all images as one grid PNG (a row per prompt)"
    )
    options.add_device_options(parser, cuda=torch.cuda.is_available())
    return parse_with_config_file(parser, argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot work, with one line naming the flag."""
    for flag in ("num_images", "batch_size", "steps", "width", "height", "base_resolution"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UserError(f"--guidance_rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def png_settings(args: argparse.Namespace, scheduler_config) -> dict:
    """The A1111 "Key: value" settings of this run (the seed is added per image)."""
    model = Path(args.model)
    ztsnr = training_alpha_bar(scheduler_config, args.sigma_max) is not None
    return {
        "Steps": args.steps,
        "Sampler": A1111_SAMPLER_NAMES[args.sampler],
        "CFG scale": args.guidance_scale,
        "Size": f"{args.width}x{args.height}",
        "Model hash": model_hash(model) if model.is_file() else None,
        "Model": model.stem if model.is_file() else model.resolve().name,
        "CFG Rescale phi": args.guidance_rescale or None,
        "Noise Schedule": "Zero Terminal SNR" if ztsnr else None,
        "Sigma max": args.sigma_max if ztsnr else None,
        "Prediction": scheduler_config["prediction_type"],
        "Attention scaling": f"base {args.base_resolution}" if args.attention_scaling else None,
    }


def main(args: argparse.Namespace) -> list[Path]:
    from tqdm.auto import tqdm

    check_args(args)
    pipeline = load_pipeline(args.model, args.config, args.device, torch_dtype(args.dtype, args.device))
    pipeline.set_progress_bar_config(disable=True)
    prompts = [prompt for prompt in args.prompt for _ in range(args.num_images)]
    first = random.randrange(2**32) if args.seed == -1 else args.seed
    seeds = [first + i for i in range(len(prompts))]
    with tqdm(total=len(prompts) * args.steps, desc="sampling", unit="image-step") as bar:
        images = generate(
            pipeline,
            prompts,
            [args.negative_prompt] * len(prompts),
            seeds,
            height=args.height,
            width=args.width,
            num_steps=args.steps,
            guidance_scale=args.guidance_scale,
            guidance_rescale=args.guidance_rescale,
            sampler=args.sampler,
            sigma_max=args.sigma_max,
            emphasis=not args.no_emphasis,
            batch_size=args.batch_size,
            base_resolution=args.base_resolution if args.attention_scaling else None,
            on_step=bar.update,
        )
    settings = list(png_settings(args, pipeline.scheduler.config).items())
    args.out.mkdir(parents=True, exist_ok=True)
    start = len(list(args.out.glob("*.png")))
    paths = []
    for offset, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
        # A1111's order: Steps, Sampler, CFG scale, Seed, Size, Model hash, Model, then the rest.
        ordered = dict(settings[:3]) | {"Seed": seed} | dict(settings[3:])
        text = a1111_parameters(prompt, args.negative_prompt, ordered)
        paths.append(save_png(image, args.out / f"{start + offset:05d}-{seed}.png", text))
    if args.grid is not None:
        image_grid(images, columns=args.num_images).save(args.grid)
    print(f"wrote {len(paths)} image(s) to {args.out}" + (f" and a grid to {args.grid}" if args.grid else ""))
    return paths


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
