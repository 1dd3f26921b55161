#!/usr/bin/env python
"""Fine-tune the SDXL VAE decoder (NovelAI Diffusion V3 §4: fewer JPEG-like artifacts; Stability's sd-vae-ft-mse).

    accelerate launch train_vae.py --pretrained_model_name_or_path MODEL --train_data_dir IMAGES \\
        --output_dir OUT --crop_size 256 --train_batch_size 4 --mixed_precision bf16

Random crops from full-resolution images; MSE (or L1) + LPIPS, optionally a PatchGAN hinge loss with the adaptive
weight of taming-transformers. Only the decoder trains by default, so latent caches and UNets stay valid.
Writes OUT as an AutoencoderKL directory (pass it as --pretrained_vae_model_name_or_path), a single-file VAE in
the original layout, held-out PSNR/SSIM/LPIPS of the starting and the fine-tuned VAE, and a model card.
"""

from __future__ import annotations

import argparse

from sdxl_ztsnr import options, vae_options
from sdxl_ztsnr.run_config import parse_with_config_file
from sdxl_ztsnr.vae_finetune import VaeRun, finetune_vae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.new_parser(__doc__.split("\n\n")[0])
    vae_options.add_vae_finetune_options(parser)
    return parse_with_config_file(
        parser, argv, lambda args: vae_options.check_vae_finetune_args(parser, args)
    )


def main(args: argparse.Namespace) -> dict:
    return finetune_vae(VaeRun.from_options(args))


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
