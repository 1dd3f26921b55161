"""The trainer's flags read into the library's settings values: the optimizer, what trains (the UNet or a LoRA
on it, its EMA, the text encoders) and the VAE stage.

With sdxl_ztsnr.unet_options (where these flags are defined) this is the only module that reads the
trainer's namespace; everything it calls takes values.
"""

from __future__ import annotations

import argparse
import logging

import torch

from sdxl_ztsnr.base_model import BaseModel
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.lora import DEFAULT_TARGET_MODULES
from sdxl_ztsnr.optimizers import (
    build_training_optimizer,
    check_fused_backward,
    fused_backward_clipping_note,
    parse_optimizer_args,
)
from sdxl_ztsnr.text_encoder_training import (
    TextEncoderSettings,
    TrainedTextEncoders,
    text_encoder_learning_rates,
)
from sdxl_ztsnr.trained_weights import EmaSettings, LoraSettings, TrainedWeights, check_lora_base
from sdxl_ztsnr.vae_finetune import VaeStage

logger = logging.getLogger("train_sdxl_ztsnr")


def make_optimizer(args: argparse.Namespace, weights: TrainedWeights, text: TrainedTextEncoders, accelerator):
    """The optimizer the flags ask for: plain, per-parameter for bf16 weights, or fused into backward; one
    parameter group for the UNet, one per trained text encoder (its own learning rate)."""
    scale = 1.0
    if args.scale_lr:
        scale = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    lr = args.learning_rate * scale
    if args.fused_backward_pass:
        check_fused_backward(
            args.gradient_accumulation_steps, accelerator.num_processes, args.mixed_precision
        )
        note = fused_backward_clipping_note(args.max_grad_norm)
        if note:
            logger.info(note)
    return build_training_optimizer(
        [{"params": weights.parameters, "lr": lr}, *text.param_groups(scale)],
        args.optimizer,
        lr,
        (args.adam_beta1, args.adam_beta2),
        args.adam_weight_decay,
        args.adam_epsilon,
        accelerator.device.type,
        fused_backward=args.fused_backward_pass,
        bf16_update=args.bf16_update if args.weights_dtype == "bf16" else None,
        max_grad_norm=max(args.max_grad_norm, 0.0),
        seed=args.seed,
        optimizer_args=parse_optimizer_args(args.optimizer_args),
    )


def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype the UNet's matrix work runs in: the autocast dtype, else the weights'."""
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    return mixed or (torch.bfloat16 if args.weights_dtype == "bf16" else torch.float32)


def trained_weights(args: argparse.Namespace, base: BaseModel, unet, distributed_type) -> TrainedWeights:
    """The whole UNet or a LoRA on it, new or continued (refused on an ε-prediction base), and its EMA."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP and (args.lora_rank or args.lora_weights or args.use_ema):
        raise UserError(
            "--lora_rank and --use_ema are not supported under FSDP (sharded weights); use DDP or DeepSpeed "
            "ZeRO-2 (examples/accelerate/) for them"
        )
    lora = ema = None
    if args.lora_rank or args.lora_weights:
        check_lora_base(base.path, args.allow_epsilon_base, base.revision)
        # The default targets given beside --lora_weights mean "the file's"; other targets must match the file.
        given = list(args.lora_target_modules) != list(DEFAULT_TARGET_MODULES)
        targets = tuple(args.lora_target_modules) if given or not args.lora_weights else None
        lora = LoraSettings(
            args.lora_rank, args.lora_alpha, args.lora_dropout, targets, args.lora_type, args.lora_weights
        )
    if args.use_ema:
        ema = EmaSettings(
            args.ema_decay,
            args.ema_update_every,
            args.ema_device,
            args.ema_warmup,
            args.ema_inv_gamma,
            args.ema_power,
        )
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    return TrainedWeights.create(unet, lora, ema, frozen_dtype)


def trained_text_encoders(args: argparse.Namespace, base: BaseModel, distributed_type) -> TrainedTextEncoders:
    """--train_text_encoder: both encoders (a LoRA on each with --lora_rank), each at its own learning rate."""
    from accelerate.utils import DistributedType

    if not args.train_text_encoder:
        return TrainedTextEncoders.frozen()
    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(
            "--train_text_encoder is not supported under FSDP or DeepSpeed (they prepare one model); use DDP"
        )
    if args.use_ema:
        logger.info("--use_ema: the EMA follows the UNet; the text encoders are exported as trained")
    settings = TextEncoderSettings(
        text_encoder_learning_rates(args.learning_rate, args.text_encoder_lr, args.text_encoder_2_lr),
        args.lora_rank,
        args.lora_alpha,
        args.lora_dropout,
        args.gradient_checkpointing,
    )
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    return TrainedTextEncoders.load(base.path, settings, frozen_dtype)


def vae_stage(args: argparse.Namespace) -> VaeStage | None:
    """--finetune_vae: the VAE decoder stage that follows the UNet's, on the same images."""
    if not args.finetune_vae:
        return None
    return VaeStage(
        args.train_data_dir,
        args.train_batch_size,
        args.mixed_precision,
        args.seed,
        args.report_to,
        args.dataloader_num_workers,
        args.vae_perceptual_weight,
        args.vae_learning_rate,
        args.vae_max_train_steps,
        args.enable_compile,
        args.overwrite_output_dir,
        args._lpips_random_backbone,
    )
