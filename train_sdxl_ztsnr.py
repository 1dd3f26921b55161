#!/usr/bin/env python
"""Fine-tune the SDXL UNet with v-prediction and zero terminal SNR (NovelAI Diffusion V3, arXiv:2409.15997).

    accelerate launch train_sdxl_ztsnr.py --pretrained_model_name_or_path MODEL \\
        --precomputed_dir CACHE --output_dir OUT --train_batch_size 4 --mixed_precision bf16

Reads the latent cache written by precompute_latents.py (or precomputes a raw --train_data_dir into
OUT/cache first), trains with ZTSNR noising, the v target and guarded MinSNR × tag-based loss weights,
and writes a diffusers pipeline that samples with ZTSNR settings out of the box, plus a single-file
checkpoint for ComfyUI/A1111/Forge.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from pathlib import Path

import torch

from sdxl_ztsnr import checkpointing, export, launch, lifecycle
from sdxl_ztsnr.attention import ATTENTION_BACKENDS, attention_context, configure_attention
from sdxl_ztsnr.console import UserError, loading_model, make_output_dir
from sdxl_ztsnr.lora import DEFAULT_TARGET_MODULES
from sdxl_ztsnr.model_card import model_card
from sdxl_ztsnr.optimizers import (
    build_training_optimizer,
    check_fused_backward,
    clear_nonfinite_mark,
    clip_and_check_gradients,
    fused_backward_clipping_note,
)
from sdxl_ztsnr.schedule import (
    LOSS_WEIGHTINGS,
    NAI_SIGMA_MAX,
    alphas_cumprod,
    scheduler_config,
)
from sdxl_ztsnr.tags import DEFAULT_CLASS_WEIGHTS
from sdxl_ztsnr.train_data import (
    BucketBatchSampler,
    DataPosition,
    TrainingRows,
    split_rows,
    training_tag_frequencies,
    training_tag_weights,
    vae_config_latent_stats,
)
from sdxl_ztsnr.trained_weights import EmaSettings, LoraSettings, TrainedWeights, check_lora_base
from sdxl_ztsnr.training import training_loss
from sdxl_ztsnr.validation import fixed_validation_loss, image_grid, log_images, sample_images

logger = logging.getLogger("train_sdxl_ztsnr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        "--model_path",
        required=True,
        help="diffusers SDXL pipeline: a local directory or a Hub repo id",
    )
    model.add_argument(
        "--pretrained_vae_model_name_or_path", default=None, help="a VAE to use instead of the pipeline's"
    )
    model.add_argument("--revision", default=None)
    model.add_argument("--variant", default=None, help='weights variant to load, e.g. "fp16"')

    data = parser.add_argument_group("data")
    data.add_argument(
        "--precomputed_dir",
        "--tag_embedding_cache",
        default=None,
        help="latent cache written by precompute_latents.py",
    )
    data.add_argument(
        "--train_data_dir",
        "--data_dir",
        default=None,
        help="raw folder of images + .txt tags; precomputed into OUTPUT_DIR/cache first",
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="maximum bucket area is resolution² (raw data: default 1024; with a cache: checked against it)",
    )
    data.add_argument(
        "--bucket_step", type=int, default=64, help="bucket sides are multiples of this (raw data)"
    )
    data.add_argument("--max_token_chunks", type=int, default=3, help="75-token chunks per prompt (raw data)")
    data.add_argument(
        "--precompute_shard_size",
        type=int,
        default=512,
        help="raw data: images per precompute shard, the unit dealt to processes and resumed after a kill",
    )
    data.add_argument(
        "--text_online",
        action="store_true",
        help="encode captions every step (needed for --tag_dropout and --keep_tokens)",
    )
    data.add_argument(
        "--proportion_empty_prompts",
        "--caption_dropout",
        type=float,
        default=0.0,
        help="fraction of samples trained with the empty prompt (zero embeddings, for CFG)",
    )
    data.add_argument(
        "--keep_tokens", type=int, default=0, help="with --text_online: first N tags stay in place"
    )
    data.add_argument(
        "--tag_dropout", type=float, default=0.0, help="with --text_online: drop each other tag"
    )
    data.add_argument(
        "--validation_rows", type=int, default=16, help="held-out cache rows for the validation loss"
    )
    data.add_argument("--dataloader_num_workers", type=int, default=2)

    tags = parser.add_argument_group("tag-based loss weighting (NAI V3)")
    tags.add_argument("--no_tag_weighting", action="store_true", help="every sample weighs 1")
    tags.add_argument(
        "--tag_frequency_path", default=None, help="tag_frequencies.json (default: the cache's)"
    )
    tags.add_argument(
        "--dynamic_tag_weights",
        action="store_true",
        help="count tag frequencies over the training rows instead of reading them from a file",
    )
    tags.add_argument("--tag_class_map", default=None, help="JSON {tag: class}; heuristics for the others")
    tags.add_argument("--min_tag_weight", type=float, default=0.1)
    tags.add_argument("--max_tag_weight", type=float, default=3.0)
    for name, weight in DEFAULT_CLASS_WEIGHTS.items():
        tags.add_argument(f"--{name}_weight", type=float, default=weight, help=f"class weight of {name} tags")

    ztsnr = parser.add_argument_group("noise schedule and loss")
    ztsnr.add_argument(
        "--sigma_max", type=float, default=NAI_SIGMA_MAX, help="terminal σ of the ZTSNR schedule"
    )
    ztsnr.add_argument("--no_ztsnr", action="store_true", help="ablation only: SDXL's schedule (σ_max 14.6)")
    ztsnr.add_argument(
        "--loss_weighting",
        choices=LOSS_WEIGHTINGS,
        default="min_snr",
        help="min_snr keeps the pure-noise step trained; min_snr_unguarded is the textbook form",
    )
    ztsnr.add_argument("--snr_gamma", type=float, default=5.0, help="γ of MinSNR (NAI used 5)")
    ztsnr.add_argument(
        "--resolution_shift",
        action="store_true",
        help="shift training timesteps by s = √(H·W)/1024 per bucket (σ → s·σ)",
    )
    ztsnr.add_argument(
        "--normalize_latents",
        action="store_true",
        help="per-channel mean/std normalisation of latents from the cache's statistics",
    )

    adapters = parser.add_argument_group("LoRA (instead of a full fine-tune) and EMA")
    adapters.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help="train a LoRA of this rank on the UNet (default: full UNet)",
    )
    adapters.add_argument(
        "--lora_alpha", type=float, default=None, help="LoRA scale alpha/rank (default: rank)"
    )
    adapters.add_argument("--lora_dropout", type=float, default=0.0)
    adapters.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=list(DEFAULT_TARGET_MODULES),
        help="module names (or suffixes) the LoRA adapts: the transformer blocks' attention projections",
    )
    adapters.add_argument(
        "--allow_epsilon_base",
        action="store_true",
        help="train a LoRA on an ε-prediction base anyway (it cannot make that model v-prediction ZTSNR)",
    )
    adapters.add_argument("--use_ema", action="store_true", help="keep an EMA of the trained weights")
    adapters.add_argument("--ema_decay", type=float, default=0.9999, help="decay after the warm-up")
    adapters.add_argument(
        "--ema_warmup",
        choices=["power", "tensorflow", "none"],
        default="power",
        help="decay warm-up: power 1-(1+s/inv_gamma)^-power, tensorflow s/(s+9), none",
    )
    adapters.add_argument("--ema_power", type=float, default=2 / 3, help="3/4 for runs under ~100k steps")
    adapters.add_argument("--ema_inv_gamma", type=float, default=1.0)
    adapters.add_argument("--ema_update_every", type=int, default=1, help="update the EMA every N steps")
    adapters.add_argument(
        "--ema_device",
        choices=["accelerator", "cpu"],
        default="accelerator",
        help="cpu keeps the fp32 average in host memory (saves accelerator memory)",
    )
    adapters.add_argument(
        "--export_ema",
        action="store_true",
        help="the exported model (pipeline, single file, LoRA) is the EMA",
    )
    adapters.add_argument("--validate_ema", action="store_true", help="sample validation images with the EMA")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", "--batch_size", type=int, default=4, help="per device")
    optim.add_argument("--num_train_epochs", "--num_epochs", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=1e-5)
    optim.add_argument(
        "--scale_lr", action="store_true", help="multiply lr by batch × accumulation × processes"
    )
    optim.add_argument(
        "--lr_scheduler",
        default="constant_with_warmup",
        help="diffusers schedule: constant, constant_with_warmup, linear, cosine, ...",
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument(
        "--optimizer",
        choices=["adamw", "adamw8bit", "adafactor"],
        default="adamw",
        help="adamw (fused torch kernel), adamw8bit (bitsandbytes), adafactor (factored second moments)",
    )
    optim.add_argument("--use_8bit_adam", action="store_true", help="alias of --optimizer adamw8bit")
    optim.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="global-norm clipping; 0 or less: no clipping"
    )
    optim.add_argument(
        "--max_bad_steps",
        type=int,
        default=20,
        help="non-finite steps in a row (checked at logging steps) that stop the run",
    )

    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    speed.add_argument("--enable_amp", action="store_true", help="alias of --mixed_precision bf16")
    speed.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in backward (less memory)",
    )
    speed.add_argument(
        "--fused_backward_pass",
        action="store_true",
        help="step each parameter inside backward: whole-model gradients never exist (1 process, no accumulation)",
    )
    speed.add_argument(
        "--weights_dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: no fp32 master weights (half the weight memory); updates use --bf16_update",
    )
    speed.add_argument(
        "--bf16_update",
        choices=["stochastic", "kahan"],
        default="stochastic",
        help="how bf16 weights take an fp32 update: stochastic rounding or a Kahan compensation buffer",
    )
    speed.add_argument(
        "--attention_backend",
        choices=list(ATTENTION_BACKENDS),
        default="auto",
        help="SDPA kernel (cudnn was 17%% faster than auto on an H200) or xformers",
    )
    speed.add_argument("--allow_tf32", action="store_true")
    speed.add_argument(
        "--enable_xformers",
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="alias of --attention_backend xformers (PyTorch SDPA, with one warning, where xformers is missing)",
    )
    speed.add_argument("--enable_compile", action="store_true", help="torch.compile the UNet")
    speed.add_argument(
        "--compile_mode", default="default", help="torch.compile mode (default, max-autotune, ...)"
    )

    logs = parser.add_argument_group("checkpoints, logging and validation")
    logs.add_argument("--output_dir", default="sdxl-ztsnr-model")
    logs.add_argument("--seed", type=int, default=0)
    logs.add_argument("--checkpointing_steps", type=int, default=500)
    logs.add_argument("--checkpoints_total_limit", type=int, default=None)
    logs.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='a checkpoint directory or "latest" (what a requeue passes: a finished run then trains nothing)',
    )
    logs.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start a new run in an output_dir that holds another run's checkpoints (they are deleted)",
    )
    logs.add_argument(
        "--logging_steps", type=int, default=10, help="host syncs (loss, skipped steps) happen here"
    )
    logs.add_argument("--logging_dir", default="logs")
    logs.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    logs.add_argument("--use_wandb", action="store_true", help="alias of --report_to wandb")
    logs.add_argument("--wandb_project", default="sdxl-ztsnr")
    logs.add_argument("--wandb_run_name", default=None)
    logs.add_argument("--validation_prompt", action="append", default=None, help="repeat for several prompts")
    logs.add_argument("--validation_steps", type=int, default=500)
    logs.add_argument("--num_validation_images", type=int, default=2, help="per prompt")
    logs.add_argument("--validation_inference_steps", type=int, default=28)
    logs.add_argument("--validation_guidance_scale", type=float, default=5.0)
    logs.add_argument("--validation_guidance_rescale", type=float, default=0.7)
    logs.add_argument(
        "--no_single_file", action="store_true", help="skip the single-file .safetensors export"
    )
    logs.add_argument("--push_to_hub", action="store_true")
    logs.add_argument("--hub_model_id", default=None)
    logs.add_argument("--hub_token", default=None, help="or log in with `huggingface-cli login`")
    vae = parser.add_argument_group("VAE decoder stage (train_vae.py, after the UNet, on the same images)")
    vae.add_argument(
        "--finetune_vae",
        action="store_true",
        help="then fine-tune the VAE decoder (encoder frozen: latents stay valid) into OUTPUT_DIR/vae and the "
        "single file",
    )
    vae.add_argument("--vae_learning_rate", type=float, default=None, help="default: train_vae.py's (1e-5)")
    vae.add_argument("--vae_max_train_steps", type=int, default=None, help="default: one epoch of the images")
    vae.add_argument(
        "--vae_perceptual_weight", type=float, default=0.1, help="LPIPS weight (0: MSE only, no download)"
    )
    vae.add_argument(
        "--_lpips_random_backbone", action="store_true", help=argparse.SUPPRESS
    )  # tests: offline
    args = parser.parse_args(argv)

    if (args.vae_learning_rate is not None or args.vae_max_train_steps) and not args.finetune_vae:
        parser.error("--vae_learning_rate and --vae_max_train_steps are for the --finetune_vae stage")
    if args.finetune_vae and not args.train_data_dir:
        parser.error(
            "--finetune_vae trains on the images: give --train_data_dir (a cache holds only latents)"
        )
    if args.enable_amp and args.mixed_precision is None:
        args.mixed_precision = "bf16"
    args.mixed_precision = args.mixed_precision or "no"
    if args.use_wandb:
        args.report_to = "wandb"
    if args.use_8bit_adam:
        args.optimizer = "adamw8bit"
    if args.enable_xformers:
        args.attention_backend = "xformers"
    if (args.precomputed_dir is None) == (args.train_data_dir is None):
        parser.error(
            "give exactly one of --precomputed_dir (a latent cache) or --train_data_dir (raw images)"
        )
    # --tag_dropout / --keep_tokens change the caption each step: only online text encoding can do that.
    args.text_online_implied = bool((args.tag_dropout or args.keep_tokens) and not args.text_online)
    args.text_online = args.text_online or args.text_online_implied
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        parser.error("--proportion_empty_prompts must be in [0, 1]")
    if (args.export_ema or args.validate_ema) and not args.use_ema:
        parser.error("--export_ema and --validate_ema need --use_ema")
    return args


def make_accelerator(args: argparse.Namespace):
    return launch.make_accelerator(
        args.output_dir,
        args.logging_dir,
        args.mixed_precision,
        args.gradient_accumulation_steps,
        args.report_to,
    )


def precompute_raw_data(args: argparse.Namespace) -> Path:
    """--train_data_dir: build (or finish, or reuse) OUTPUT_DIR/cache with precompute_latents.py's own code."""
    import precompute_latents

    cache_dir = Path(args.output_dir) / "cache"
    argv = [
        "--train_data_dir",
        args.train_data_dir,
        "--pretrained_model_name_or_path",
        args.pretrained_model_name_or_path,
        "--output_dir",
        str(cache_dir),
        "--resolution",
        str(args.resolution or 1024),
        "--bucket_step",
        str(args.bucket_step),
        "--max_token_chunks",
        str(args.max_token_chunks),
        "--shard_size",
        str(args.precompute_shard_size),
    ]
    if args.pretrained_vae_model_name_or_path:
        argv += ["--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path]
    if args.text_online:
        argv.append("--text_online")
    precompute_latents.main(precompute_latents.parse_args(argv))
    return cache_dir


def load_training_data(args: argparse.Namespace, accelerator) -> TrainingRows:
    """The cache (refused if made for another model), tag weights, held-out rows, online text encoders."""
    from sdxl_ztsnr.cache import load_cache, load_pad_chunk, model_identity, open_cache
    from sdxl_ztsnr.precompute import load_vae
    from sdxl_ztsnr.tags import load_tag_classes, load_tag_frequencies, scale_tag_weights, tag_factors
    from sdxl_ztsnr.text_encoding import encode_prompts, load_text_encoders

    # A local cache, a Hub dataset id (downloaded once, memory-mapped), or a raw folder precomputed now.
    source = args.precomputed_dir or precompute_raw_data(args)
    accelerator.wait_for_everyone()
    vae = load_vae(
        args.pretrained_model_name_or_path, vae_name_or_path=args.pretrained_vae_model_name_or_path
    )
    dataset, metadata, cache_dir = open_cache(source)
    cached_text = not metadata["settings"]["text_online"]
    text_online = args.text_online or not cached_text
    tokenizers, encoders = (
        load_text_encoders(args.pretrained_model_name_or_path)
        if (cached_text or text_online)
        else (None, None)
    )
    # What the cache depends on must be this model: same VAE, same text encoders (when embeddings are cached).
    expected = model_identity(vae, encoders if cached_text else None)
    if not cached_text:
        expected = {k: v for k, v in expected.items() if not k.startswith("text_encoder")}
    if args.resolution is not None:
        expected["resolution"] = args.resolution  # a cache made at another resolution is refused, by name
    dataset, metadata = load_cache(cache_dir, expected)
    del vae
    if args.text_online_implied:
        logger.info(
            "--tag_dropout/--keep_tokens change captions each step: encoding them online (--text_online)"
        )
    elif text_online and not args.text_online:
        logger.info("the cache holds no text embeddings: encoding captions every step (--text_online)")

    train_ids, validation_ids = split_rows(
        dataset.with_format("arrow")["source"], args.validation_rows, args.seed
    )
    weights = torch.ones(len(dataset))
    if not args.no_tag_weighting:
        if args.dynamic_tag_weights:
            frequencies = training_tag_frequencies(dataset, train_ids)
        else:
            frequencies = load_tag_frequencies(args.tag_frequency_path or cache_dir / "tag_frequencies.json")
        class_weights = {name: getattr(args, f"{name}_weight") for name in DEFAULT_CLASS_WEIGHTS}
        tag_classes = load_tag_classes(args.tag_class_map) if args.tag_class_map else None
        factor = tag_factors(frequencies, class_weights, tag_classes)
        raw = training_tag_weights(dataset, train_ids, factor)
        weights[torch.from_numpy(train_ids)] = scale_tag_weights(
            raw, args.min_tag_weight, args.max_tag_weight
        )

    encode = None
    if text_online:
        dtype = torch.float16 if accelerator.device.type == "cuda" else torch.float32
        encoders = [e.to(accelerator.device, dtype) for e in encoders]
        max_chunks = metadata["settings"]["max_token_chunks"]

        def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return encode_prompts(prompts, tokenizers, encoders, max_chunks)

    mean = std = None
    if args.normalize_latents:
        mean, std = torch.tensor(metadata["latents_mean"]), torch.tensor(metadata["latents_std"])
    return TrainingRows(
        dataset,
        metadata,
        train_ids,
        validation_ids,
        weights,
        load_pad_chunk(cache_dir),
        mean,
        std,
        args.proportion_empty_prompts,
        encode,
        args.keep_tokens,
        args.tag_dropout,
        args.dataloader_num_workers,
    )


def load_unet(args: argparse.Namespace, device_type: str):
    from diffusers import UNet2DConditionModel

    with loading_model(args.pretrained_model_name_or_path, "unet"):
        unet = UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
        )
    unet.train()
    if args.weights_dtype == "bf16":
        unet.to(torch.bfloat16)  # the optimizer updates it through --bf16_update
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device_type == "cuda":
        unet.to(memory_format=torch.channels_last)  # cuDNN's tensor-core convolutions read NHWC directly
    return unet


def make_optimizer(args: argparse.Namespace, weights: TrainedWeights, accelerator):
    """The optimizer the flags ask for: plain, per-parameter for bf16 weights, or fused into backward."""
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if args.fused_backward_pass:
        check_fused_backward(
            args.gradient_accumulation_steps, accelerator.num_processes, args.mixed_precision
        )
        note = fused_backward_clipping_note(args.max_grad_norm)
        if note:
            logger.info(note)
    return build_training_optimizer(
        weights.parameters,
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
    )


def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype the UNet's matrix work runs in: the autocast dtype, else the weights'."""
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    return mixed or (torch.bfloat16 if args.weights_dtype == "bf16" else torch.float32)


def trained_weights(args: argparse.Namespace, unet, distributed_type) -> TrainedWeights:
    """The whole UNet or a LoRA on it (refused on an ε-prediction base), and its EMA when asked."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP and (args.lora_rank or args.use_ema):
        raise UserError(
            "--lora_rank and --use_ema are not supported under FSDP (sharded weights); use DDP or DeepSpeed "
            "ZeRO-2 (examples/accelerate/) for them"
        )
    lora = ema = None
    if args.lora_rank:
        check_lora_base(args.pretrained_model_name_or_path, args.allow_epsilon_base, args.revision)
        lora = LoraSettings(
            args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_target_modules)
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


def save_checkpoint(args, accelerator, step: int, position: DataPosition, run_id: str) -> None:
    """accelerate state + trainer_state.json: the position in the data order and what it means.

    No random state is needed: every per-sample draw is keyed by the step (sdxl_ztsnr.keyed_random).
    """
    checkpointing.save_checkpoint_atomic(
        accelerator,
        args.output_dir,
        step,
        {"run_id": run_id, "global_batch_size": args.train_batch_size * accelerator.num_processes},
        epoch=position.epoch,
        batch_offset=position.batch,
        total_limit=args.checkpoints_total_limit,
    )


def resume_position(state: dict, global_batch_size: int) -> DataPosition:
    """The data position of a checkpoint; a changed global batch size keeps the epoch's fraction (and says so)."""
    saved = state.get("global_batch_size", global_batch_size)
    offset = state["batch_offset"]
    if saved != global_batch_size:
        offset = offset * saved // global_batch_size
        logger.warning(
            "the global batch changed from %d to %d rows since the checkpoint: continuing epoch %d at batch %d; "
            "the run will not equal an unbroken one",
            saved,
            global_batch_size,
            state["epoch"],
            offset,
        )
    return DataPosition(state["epoch"], offset)


def load_vae_for_outputs(args: argparse.Namespace):
    """The VAE that made the latents: --pretrained_vae_model_name_or_path when given, else the pipeline's."""
    from diffusers import AutoencoderKL

    if args.pretrained_vae_model_name_or_path:
        with loading_model(args.pretrained_vae_model_name_or_path, "vae"):
            return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    with loading_model(args.pretrained_model_name_or_path, "vae"):
        return AutoencoderKL.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
        )


def save_outputs(
    args,
    accelerator,
    weights: TrainedWeights,
    unet,
    data: TrainingRows,
    metrics: dict,
    step: int,
    run_id: str,
) -> None:
    """The one save path for the model: diffusers pipeline + single file (or the LoRA files), the EMA beside,
    config JSON, model card, Hub upload.

    outputs.json is written last: it says the outputs of ``step`` of this run are complete (a requeue of a
    finished run then leaves them alone).
    """
    model = weights.main_process_unet(accelerator, unet)
    if not accelerator.is_main_process:
        return
    out = Path(args.output_dir)
    name = out.resolve().name
    weights.save(out, name, args.pretrained_model_name_or_path, not args.no_ztsnr, args.export_ema)
    if weights.lora is None:
        with weights.exported(args.export_ema):
            save_model(args, model, data, out, name)
    config = {k: v for k, v in vars(args).items() if k != "hub_token"}
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    card = model_card(
        args.hub_model_id or name,
        args.pretrained_model_name_or_path,
        config,
        validation_images=None,
        metrics=metrics,
        normalized_latents=args.normalize_latents,
    )
    (out / "README.md").write_text(card)
    # Readable per the user's umask (safetensors writes 0600): a UI running as another user can load the model.
    export.apply_umask([p for p in out.iterdir() if p.name != "cache"])
    lifecycle.mark_outputs_complete(out, run_id, step)


def publish(args: argparse.Namespace, accelerator) -> None:
    """--push_to_hub: the model repo gets the outputs, never the cache, checkpoints or the VAE stage's run."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return
    from sdxl_ztsnr.hub import DEFAULT_IGNORE_PATTERNS, push_to_hub

    out = Path(args.output_dir)
    ignore = list(DEFAULT_IGNORE_PATTERNS)
    # A cache given with --precomputed_dir inside OUTPUT_DIR is no part of the model either.
    if args.precomputed_dir and Path(args.precomputed_dir).resolve().is_relative_to(out.resolve()):
        ignore.append(Path(args.precomputed_dir).resolve().relative_to(out.resolve()).as_posix() + "/")
    push_to_hub(out, args.hub_model_id or out.resolve().name, token=args.hub_token, ignore_patterns=ignore)


def check_vae_stage(args: argparse.Namespace) -> None:
    """--finetune_vae: fail at start-up, not after the UNet stage, when LPIPS cannot be loaded (offline)."""
    if not args.finetune_vae or args.vae_perceptual_weight == 0:
        return
    from sdxl_ztsnr.vae_training import LpipsWeightsMissing, load_lpips

    try:
        load_lpips("vgg", random_backbone=args._lpips_random_backbone)
    except LpipsWeightsMissing as error:
        message = str(error).replace("--perceptual_weight", "--vae_perceptual_weight")
        raise UserError(f"--finetune_vae: {message}") from None


def run_vae_stage(args: argparse.Namespace) -> dict:
    """--finetune_vae: train_vae.py on the same images, its decoder then put into the pipeline and single file.

    Runs on every process, after the UNet's outputs are written; requeue-safe (it resumes its own run in
    OUTPUT_DIR/vae_finetune, and a finished one only installs its decoder again).
    """
    if not args.finetune_vae:
        return {}
    import train_vae

    argv = ["--train_data_dir", args.train_data_dir, "--train_batch_size", str(args.train_batch_size)]
    argv += [
        "--mixed_precision",
        args.mixed_precision,
        "--seed",
        str(args.seed),
        "--report_to",
        args.report_to,
    ]
    argv += ["--perceptual_weight", str(args.vae_perceptual_weight), "--resume_from_checkpoint", "latest"]
    argv += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
    if args.vae_learning_rate is not None:
        argv += ["--learning_rate", str(args.vae_learning_rate)]
    if args.vae_max_train_steps:
        argv += ["--max_train_steps", str(args.vae_max_train_steps)]
    for flag in ("enable_compile", "overwrite_output_dir", "_lpips_random_backbone"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    out = Path(args.output_dir)
    single_file = None if args.no_single_file else out / f"{out.resolve().name}.safetensors"
    logger.info("--finetune_vae: fine-tuning the VAE decoder on %s", args.train_data_dir)
    return train_vae.finetune_pipeline_vae(out, argv, single_file)


def save_model(args, unet, data: TrainingRows, out: Path, name: str) -> None:
    """The fine-tuned UNet as a diffusers pipeline directory and a single file (original SDXL layout)."""
    from diffusers import StableDiffusionXLPipeline

    vae = load_vae_for_outputs(args)
    with loading_model(args.pretrained_model_name_or_path):
        base = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            unet=unet,
            vae=vae,
            revision=args.revision,
            variant=args.variant,
        )
    mean, std = (None, None)
    if args.normalize_latents:
        mean, std = vae_config_latent_stats(data.latents_mean, data.latents_std, vae.config.scaling_factor)
    export.save_pipeline(
        out,
        unet,
        vae,
        (base.text_encoder, base.text_encoder_2),
        (base.tokenizer, base.tokenizer_2),
        scheduler_config(ztsnr=not args.no_ztsnr),
        latents_mean=mean,
        latents_std=std,
        ztsnr=not args.no_ztsnr,
        # The normalisation folded into the VAE's 1×1 convolutions (exact): every consumer, including diffusers
        # pipelines that ignore latents_mean/std and the single file's loaders, decodes the UNet's latents right.
        fold_latents=True,
    )
    if not args.no_single_file:
        export.save_single_file(
            out / f"{name}.safetensors",
            unet.state_dict(),
            vae.state_dict(),
            base.text_encoder.state_dict(),
            base.text_encoder_2.state_dict(),
            v_pred=True,
            ztsnr=not args.no_ztsnr,
            latents_mean=mean,
            latents_std=std,
        )


def run_validation(
    args, accelerator, weights: TrainedWeights, unet, data: TrainingRows, alpha_bar, step: int
) -> dict[str, float]:
    """Validation loss on held-out rows and sample grids (all processes' models are equal; main computes).

    With --validate_ema both use the EMA weights.
    """
    from diffusers import StableDiffusionXLPipeline

    metrics: dict[str, float] = {}
    model = weights.main_process_unet(accelerator, unet)
    if not accelerator.is_main_process:
        return metrics
    batches = data.validation_batches(accelerator.device)  # read outside autocast: fp16 rows stay fp16
    with accelerator.autocast(), weights.exported(args.validate_ema):
        metrics = fixed_validation_loss(model, batches, alpha_bar, seed=args.seed)
        if args.validation_prompt:
            pipeline = StableDiffusionXLPipeline.from_pretrained(
                args.pretrained_model_name_or_path,
                unet=model,
                vae=load_vae_for_outputs(args),
                revision=args.revision,
                variant=args.variant,
                torch_dtype=torch.float32,
            ).to(accelerator.device)
            if args.normalize_latents:
                mean, std = vae_config_latent_stats(
                    data.latents_mean, data.latents_std, pipeline.vae.config.scaling_factor
                )
                pipeline.vae.register_to_config(latents_mean=mean, latents_std=std)
            pipeline.set_progress_bar_config(disable=True)
            height, width = data.validation_size
            images = sample_images(
                pipeline,
                args.validation_prompt,
                args.num_validation_images,
                args.validation_inference_steps,
                args.validation_guidance_scale,
                args.validation_guidance_rescale,
                alpha_bar,
                height,
                width,
                seed=args.seed,
            )
            grid = image_grid(images, columns=args.num_validation_images)
            grid.save(Path(args.output_dir) / f"validation-{step:07d}.png")
            log_images(accelerator.trackers, grid, args.validation_prompt, step)
            del pipeline
    model.train()
    accelerator.log(metrics, step=step)
    return metrics


def finish_only(
    args, accelerator, weights: TrainedWeights, data: TrainingRows, plan: lifecycle.RunPlan
) -> dict:
    """A requeue of a finished run: train nothing, overwrite nothing; write the outputs only if missing."""
    logger.info(
        "run %s already finished at step %d (%s): nothing to train",
        plan.run_id,
        plan.resume_step,
        plan.resume,
    )
    if not plan.outputs_complete:
        logger.info("its outputs are missing or incomplete: writing them from %s", plan.resume)
        unet = accelerator.prepare(weights.unet)
        weights.register_checkpoint_hooks(accelerator)
        accelerator.load_state(plan.resume)
        save_outputs(args, accelerator, weights, unet, data, {}, plan.resume_step, plan.run_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    run_vae_stage(args)
    if not plan.outputs_complete:
        publish(args, accelerator)
    return {"step": plan.resume_step, "skipped_steps": 0, "finished_before": True}


def main(args: argparse.Namespace) -> dict:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved" lines break the bar
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    make_output_dir(args.output_dir)
    # Lifecycle first (before hours of precompute): fresh start, resume, or an already finished run.
    plan = lifecycle.plan_run_on_all_ranks(
        accelerator, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir
    )
    check_vae_stage(args)

    # Data: the latent cache (built here from raw images if needed), global batches of one bucket each.
    data = load_training_data(args, accelerator)
    sampler = BucketBatchSampler(
        data.train_buckets,
        args.train_batch_size,
        args.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )
    accumulation = args.gradient_accumulation_steps
    # Accumulation cycles run across epoch ends: an epoch is a number of micro-batches, not of updates.
    max_steps = args.max_train_steps or math.ceil(args.num_train_epochs * len(sampler) / accumulation)

    # Model: the whole UNet or a LoRA on it, with its EMA; then schedule and optimizer.
    weights = trained_weights(args, load_unet(args, accelerator.device.type), accelerator.distributed_type)
    if plan.finished_at(max_steps):
        return finish_only(args, accelerator, weights, data, plan)
    alpha_bar = alphas_cumprod(ztsnr=not args.no_ztsnr, sigma_max=args.sigma_max)
    attention = configure_attention(
        weights.unet, args.attention_backend, accelerator.device, compute_dtype(args)
    )
    optimizer = make_optimizer(args, weights, accelerator)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_steps
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(weights.unet, optimizer, lr_scheduler)
    if args.fused_backward_pass:
        optimizer.optimizer.attach()  # after prepare: the hooks sit on the parameters that train
    weights.register_checkpoint_hooks(accelerator)
    if args.enable_compile:
        unet = launch.compile_or_eager(unet, accelerator.device, args.compile_mode)
    # --max_grad_norm 0 (kohya's "no clipping"): the norm is still computed, to catch non-finite steps.
    clip_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf

    # Resume: weights, optimizer, lr schedule and the position in the data order.
    global_step, position = 0, DataPosition()
    if plan.resume is not None:
        accelerator.load_state(plan.resume)
        state = checkpointing.load_trainer_state(plan.resume)
        global_step = state["step"]
        position = resume_position(state, sampler.global_batch_size)
        logger.info("resumed run %s from %s at step %d", plan.run_id, plan.resume, global_step)
    accelerator.step = 0  # checkpoints sit on update boundaries: the next micro-batch starts a cycle
    if accelerator.is_main_process:
        accelerator.init_trackers(
            args.wandb_project if "wandb" in args.report_to else "sdxl_ztsnr",
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
            init_kwargs={"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {},
        )
    logger.info(
        "%d training rows, %d buckets, %d global batches of %d per epoch, %d steps",
        len(data.train_ids),
        len(sampler.rows_by_bucket),
        len(sampler),
        sampler.global_batch_size,
        max_steps,
    )
    # Start-up leaves millions of long-lived objects (models, datasets): one automatic full garbage collection
    # over them stalls a step for ~0.4 s. Collect once now and keep them out of later collections.
    gc.collect()
    gc.freeze()
    progress = tqdm(
        total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    stream = data.stream(sampler, accelerator.device, args.seed, position, global_step * accumulation)
    running_loss = torch.zeros((), device=accelerator.device)
    bad_in_a_row = torch.zeros((), device=accelerator.device)
    bad_total = torch.zeros((), device=accelerator.device)
    micro_batches, log_time = 0, time.perf_counter()
    metrics: dict[str, float] = {}

    while global_step < max_steps:
        for _ in range(accumulation):  # one optimizer update
            position, batch = next(stream)
            with accelerator.accumulate(unet), attention_context(attention):
                # The loss in one place: ZTSNR noising, v target, MSE × MinSNR(guarded) × tag weight.
                loss, _ = training_loss(
                    unet,
                    batch,
                    alpha_bar,
                    weighting=args.loss_weighting,
                    snr_gamma=args.snr_gamma,
                    timestep_shift=data.timestep_shift(batch) if args.resolution_shift else 1.0,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    found_inf = clip_and_check_gradients(
                        accelerator, optimizer, weights.parameters, clip_norm, args.mixed_precision == "fp16"
                    )
                optimizer.step()
                clear_nonfinite_mark(optimizer)
                optimizer.zero_grad(set_to_none=True)
            running_loss += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0)
            micro_batches += 1
        lr_scheduler.step()
        global_step += 1
        weights.after_update(global_step, final=global_step == max_steps)
        bad_in_a_row = (bad_in_a_row + found_inf) * found_inf
        bad_total += found_inf
        progress.update(1)

        if global_step % args.logging_steps == 0 or global_step == max_steps:
            elapsed = time.perf_counter() - log_time
            logs = {
                # the mean over the micro-batches of this window, on every process
                "loss": accelerator.reduce(running_loss, "mean").item() / micro_batches,
                "lr": lr_scheduler.get_last_lr()[0],
                "samples_per_s": micro_batches * sampler.global_batch_size / elapsed,
                "skipped_steps": bad_total.item(),
            }
            progress.set_postfix(
                loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", samples_s=f"{logs['samples_per_s']:.2f}"
            )
            accelerator.log(logs, step=global_step)
            running_loss.zero_()
            micro_batches, log_time = 0, time.perf_counter()
            if bad_in_a_row.item() >= args.max_bad_steps:
                save_checkpoint(args, accelerator, global_step, position, plan.run_id)
                raise SystemExit(
                    f"{int(bad_in_a_row.item())} non-finite steps in a row at step {global_step}: "
                    "lower --learning_rate or check the data; a checkpoint was saved"
                )
        if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
            save_checkpoint(args, accelerator, global_step, position, plan.run_id)
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < max_steps:
            metrics = run_validation(args, accelerator, weights, unet, data, alpha_bar, global_step)

    progress.close()
    accelerator.wait_for_everyone()
    metrics = run_validation(args, accelerator, weights, unet, data, alpha_bar, global_step)
    save_outputs(args, accelerator, weights, unet, data, metrics, global_step, plan.run_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    gc.unfreeze()
    result = {"step": global_step, "skipped_steps": bad_total.item(), **metrics}
    del unet, optimizer, weights  # the VAE stage gets the accelerator's memory
    accelerator.free_memory()
    vae_metrics = run_vae_stage(args)
    publish(args, accelerator)
    return {**result, **{f"vae_{k}": v for k, v in vae_metrics.items() if isinstance(v, (int, float))}}


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
