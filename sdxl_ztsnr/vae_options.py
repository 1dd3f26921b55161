"""The VAE fine-tune's options (train_vae.py, and what the trainer's --finetune_vae stage parses), built from the
shared groups of options.py plus its own data and loss flags.
"""

from __future__ import annotations

import argparse

from sdxl_ztsnr.options import (
    add_ema_options,
    add_image_source_options,
    add_logging_options,
    add_memory_options,
    add_model_options,
    add_optimizer_options,
    add_output_options,
    add_run_options,
    resolve_aliases,
)


def add_vae_finetune_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of a VAE fine-tune: model, images, loss, optimisation and EMA, memory, run, logging."""
    add_model_options(
        parser,
        model_help="SDXL pipeline; VAE from vae/",
        vae_help="an AutoencoderKL directory or repo",
        required=False,
    )
    data = add_image_source_options(
        parser,
        "data (the same image loading and skipped.jsonl as precompute)",
        folder_help="folder of images (recursive)",
        dataset_help="HF dataset: Hub name, load_dataset path or save_to_disk dir",
        captions=False,
    )
    data.add_argument(
        "--crop_size", type=int, default=256, help="random square crops (smaller images are upscaled)"
    )
    data.add_argument(
        "--validation_images", type=int, default=8, help="held-out images (≤ a fifth), centre crops"
    )
    data.add_argument("--dataloader_num_workers", type=int, default=2)

    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", choices=["mse", "l1"], default="mse")
    loss.add_argument(
        "--perceptual_weight", type=float, default=0.1, help="LPIPS weight (0.1: sd-vae-ft-mse)"
    )
    loss.add_argument("--lpips_net", choices=["vgg", "alex"], default="vgg")
    loss.add_argument(
        "--latents",
        choices=["sample", "mean"],
        default="sample",
        help="decode z = μ + σ·ε (sample, as latent-diffusion trains) or z = μ (mean: what caches hold)",
    )
    loss.add_argument(
        "--train_encoder",
        action="store_true",
        help="ALSO train encoder + quant_conv (+ KL): invalidates caches/UNets",
    )
    loss.add_argument(
        "--kl_weight", type=float, default=1e-6, help="with --train_encoder (latent-diffusion's 1e-6)"
    )
    loss.add_argument(
        "--gan_start_step", type=int, default=None, help="PatchGAN hinge loss from this step on"
    )
    loss.add_argument("--gan_weight", type=float, default=0.5, help="times the adaptive weight λ")
    loss.add_argument("--disc_learning_rate", type=float, default=None, help="default: --learning_rate")
    loss.add_argument("--disc_channels", type=int, default=64)
    loss.add_argument("--disc_layers", type=int, default=3)

    optim = add_optimizer_options(
        parser,
        "constant",
        "diffusers schedule: constant, cosine, ...",
        weight_decay=0.0,
        learning_rate_aliases=("--vae_learning_rate",),
    )
    add_ema_options(optim, "publish an EMA of the trained weights", full=False)
    add_memory_options(parser, ["no", "bf16", "fp16"], unet=False)
    add_run_options(parser, "sdxl-vae-finetune", 'a checkpoint directory or "latest"', None)
    add_logging_options(parser, "sdxl-vae")
    parser.add_argument(
        "--validation_steps", type=int, default=500, help="held-out metrics + grid (0: at the end)"
    )
    add_output_options(parser, None, None)
    parser.add_argument(
        "--_lpips_random_backbone", action="store_true", help=argparse.SUPPRESS
    )  # tests, offline
    return parser


def check_vae_finetune_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The VAE fine-tune's flags that only make sense together, and the seed's aliases resolved."""

    if (args.pretrained_model_name_or_path is None) and (args.pretrained_vae_model_name_or_path is None):
        parser.error("give --pretrained_model_name_or_path (its vae/) or --pretrained_vae_model_name_or_path")
    if sum(map(bool, (args.train_data_dir, args.dataset_name, args.data_config))) != 1:
        parser.error("give exactly one of --train_data_dir (--data_dir), --dataset_name or --data_config")
    if args.data_config:
        from sdxl_ztsnr.data_config import load_data_config

        load_data_config(args.data_config)  # a bad file stops here, before models and images load
    resolve_aliases(args)
    if args.mixed_precision == "fp16":
        parser.error("--mixed_precision fp16: SDXL's VAE overflows in fp16; use bf16 or no")
    if args.crop_size < 32:
        parser.error("--crop_size must be at least 32 px")
    if args.perceptual_weight < 0 or args.kl_weight < 0 or args.gan_weight < 0:
        parser.error("--perceptual_weight, --kl_weight and --gan_weight must be >= 0")
