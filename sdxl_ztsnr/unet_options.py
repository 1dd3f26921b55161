"""The UNet trainer's own option groups (train_sdxl_ztsnr.py): its data, tag weighting, schedule and loss, LoRA
and EMA, validation and the VAE stage. The groups it shares with the other scripts are in options.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.optimizers import check_optimizer_name, check_per_parameter_optimizer, parse_optimizer_args
from sdxl_ztsnr.options import (
    add_data_config_option,
    add_ema_options,
    add_mask_source_options,
    resolve_aliases,
)
from sdxl_ztsnr.schedule import NUM_TRAIN_TIMESTEPS
from sdxl_ztsnr.timestep_sampling import TIMESTEP_MODES, TimestepSampling


def add_training_data_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The latent cache (or a raw folder precomputed first), captions as the trainer reads them, the loader."""
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
    # Alone: precomputed into OUTPUT_DIR/cache first; with --precomputed_dir: its repeats, weights,
    # regularisation and caption settings apply to that cache's sources.
    add_data_config_option(data)
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
    add_mask_source_options(data, "raw data: ")
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

    return data


def add_tag_weighting_options(
    parser: argparse.ArgumentParser, class_weights: Mapping[str, float]
) -> argparse._ArgumentGroup:
    """NAI V3's tag-based loss weighting: rarer tags and weightier classes count more."""
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
    for name, weight in class_weights.items():
        tags.add_argument(f"--{name}_weight", type=float, default=weight, help=f"class weight of {name} tags")

    return tags


def add_schedule_options(
    parser: argparse.ArgumentParser, sigma_max: float, loss_weightings: Sequence[str]
) -> argparse._ArgumentGroup:
    """The ZTSNR noise schedule, the loss weighting and what moves the timesteps."""
    ztsnr = parser.add_argument_group("noise schedule and loss")
    ztsnr.add_argument("--sigma_max", type=float, default=sigma_max, help="terminal σ of the ZTSNR schedule")
    ztsnr.add_argument("--no_ztsnr", action="store_true", help="ablation only: SDXL's schedule (σ_max 14.6)")
    ztsnr.add_argument(
        "--loss_weighting",
        choices=list(loss_weightings),
        default="min_snr",
        help="min_snr keeps the pure-noise step trained; min_snr_unguarded is the textbook form",
    )
    ztsnr.add_argument("--snr_gamma", type=float, default=5.0, help="γ of MinSNR (NAI used 5)")
    ztsnr.add_argument(
        "--masked_loss",
        action="store_true",
        help="require loss masks in the cache (kohya's switch; masks the cache holds are used without it)",
    )
    ztsnr.add_argument(
        "--no_masked_loss", action="store_true", help="ignore the cache's masks: every pixel weighs 1"
    )
    ztsnr.add_argument(
        "--resolution_shift",
        action="store_true",
        help="shift training timesteps by s = √(H·W)/1024 per bucket (σ → s·σ)",
    )
    ztsnr.add_argument(
        "--timestep_sampling",
        choices=list(TIMESTEP_MODES),
        default="uniform",
        help="training timestep distribution: uniform; logit_normal (sigmoid of N(--logit_mean, --logit_std) "
        "over the range); high_noise (density rising to the pure-noise step, --high_noise_bias: for ε→v "
        "conversion)",
    )
    ztsnr.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean of logit(t/T)")
    ztsnr.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: std of logit(t/T)")
    ztsnr.add_argument(
        "--high_noise_bias",
        type=float,
        default=1.0,
        help="high_noise: b >= 0 in t/T = 1 − (1−u)^(1+b); 0 is uniform, 1 draws t = 999 3.2%% of the time "
        "(32× uniform) and t = 0 at half the uniform rate, 2: 10%%",
    )
    ztsnr.add_argument(
        "--min_timestep", type=int, default=0, help="lowest timestep trained (inclusive, as kohya's)"
    )
    ztsnr.add_argument(
        "--max_timestep",
        type=int,
        default=NUM_TRAIN_TIMESTEPS,
        help="timesteps trained are below this (exclusive, as kohya's); bounds hold after --resolution_shift",
    )
    ztsnr.add_argument(
        "--timestep_importance_weighting",
        action="store_true",
        help="multiply each sample's loss by p_uniform(t)/p_draw(t): the expected loss is then the uniform "
        "draw's (default off, as kohya/SimpleTuner/OneTrainer: the distribution is part of the objective)",
    )
    ztsnr.add_argument(
        "--normalize_latents",
        action="store_true",
        help="per-channel mean/std normalisation of latents from the cache's statistics",
    )

    return ztsnr


def add_adapter_options(
    parser: argparse.ArgumentParser, lora_targets: Sequence[str], lora_types: Sequence[str] = ("lora",)
) -> argparse._ArgumentGroup:
    """A LoRA (or DoRA, LoHa, LoKr; new or continued from a file) instead of a full fine-tune, and an EMA."""
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
        default=list(lora_targets),
        help="module names (or suffixes) the LoRA adapts: the transformer blocks' attention projections; with "
        "--lora_weights the file's",
    )
    adapters.add_argument(
        "--lora_type",
        choices=list(lora_types),
        default=None,
        help="the adapter, through peft: lora (default), dora (weight-decomposed), loha (Hadamard), lokr "
        "(Kronecker); with --lora_weights the file's",
    )
    adapters.add_argument(
        "--lora_weights",
        "--network_weights",
        default=None,
        metavar="FILE",
        help="continue a LoRA: a kohya/A1111/LyCORIS or diffusers/peft .safetensors; its type, rank, alpha and "
        "target modules are taken from the file (flags given beside it must agree)",
    )
    adapters.add_argument(
        "--allow_epsilon_base",
        action="store_true",
        help="train a LoRA on an ε-prediction base anyway (it cannot make that model v-prediction ZTSNR)",
    )
    add_ema_options(adapters, "keep an EMA of the trained weights", full=True)
    adapters.add_argument(
        "--export_ema",
        action="store_true",
        help="the exported model (pipeline, single file, LoRA) is the EMA",
    )
    adapters.add_argument("--validate_ema", action="store_true", help="sample validation images with the EMA")

    return adapters


def add_text_encoder_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Training both text encoders beside the UNet (kohya's --train_text_encoder, --learning_rate_te1/te2)."""
    text = parser.add_argument_group("text encoders")
    text.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="train both text encoders too (whole, or a LoRA on each with --lora_rank); implies --text_online",
    )
    text.add_argument(
        "--text_encoder_lr",
        "--learning_rate_te1",
        "--text_encoder_lr1",
        type=float,
        default=None,
        help="learning rate of encoder 1 (CLIP ViT-L); default --learning_rate; 0 leaves it frozen",
    )
    text.add_argument(
        "--text_encoder_2_lr",
        "--learning_rate_te2",
        "--text_encoder_lr2",
        type=float,
        default=None,
        help="learning rate of encoder 2 (OpenCLIP ViT-bigG); default --text_encoder_lr; 0 leaves it frozen",
    )
    return text


def add_validation_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Sample grids and the fixed-noise validation loss during and after the run."""
    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_prompt", action="append", default=None, help="repeat for several prompts"
    )
    validation.add_argument("--validation_steps", type=int, default=500)
    validation.add_argument("--num_validation_images", type=int, default=2, help="per prompt")
    validation.add_argument("--validation_inference_steps", type=int, default=28)
    validation.add_argument("--validation_guidance_scale", type=float, default=5.0)
    validation.add_argument("--validation_guidance_rescale", type=float, default=0.7)
    return validation


def add_vae_stage_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--finetune_vae: the VAE decoder stage after the UNet, on the same images."""
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
    return vae


def timestep_sampling(args: argparse.Namespace) -> TimestepSampling:
    """The --timestep_sampling group as the value training_loss takes."""
    return TimestepSampling(
        args.timestep_sampling,
        args.logit_mean,
        args.logit_std,
        args.high_noise_bias,
        args.min_timestep,
        args.max_timestep,
        args.timestep_importance_weighting,
    )


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The trainer's flags that only make sense together, and the seed's aliases resolved."""
    if (args.vae_learning_rate is not None or args.vae_max_train_steps) and not args.finetune_vae:
        parser.error("--vae_learning_rate and --vae_max_train_steps are for the --finetune_vae stage")
    if args.finetune_vae and not args.train_data_dir:
        parser.error(
            "--finetune_vae trains on the images: give --train_data_dir (a cache holds only latents; for "
            "several sources run train_vae.py --data_config after the UNet run)"
        )
    resolve_aliases(args)
    if args.train_data_dir is not None and (args.precomputed_dir or args.data_config):
        parser.error("--train_data_dir is one raw folder: give it alone, or use --data_config for several")
    if not (args.precomputed_dir or args.train_data_dir or args.data_config):
        parser.error(
            "give --precomputed_dir (a latent cache), --train_data_dir (raw images) or --data_config (sources)"
        )
    if (args.mask_dir or args.alpha_mask) and not args.train_data_dir:
        parser.error(
            "--mask_dir and --alpha_mask are read with --train_data_dir; a cache holds its masks already"
        )
    if args.masked_loss and args.no_masked_loss:
        parser.error("--masked_loss requires the cache's masks, --no_masked_loss ignores them: give one")
    text_lrs = (args.text_encoder_lr, args.text_encoder_2_lr)
    if any(lr is not None for lr in text_lrs) and not args.train_text_encoder:
        parser.error("--text_encoder_lr and --text_encoder_2_lr are for --train_text_encoder")
    if any(lr is not None and lr < 0 for lr in text_lrs):
        parser.error("--text_encoder_lr and --text_encoder_2_lr must be >= 0 (0 leaves that encoder frozen)")
    if args.train_text_encoder and args.text_encoder_lr == 0 and not args.text_encoder_2_lr:
        parser.error("--train_text_encoder with both text-encoder learning rates 0 trains neither: drop it")
    if args.train_text_encoder and args.lora_weights:
        parser.error(
            "--train_text_encoder with --lora_weights: a continued LoRA trains the UNet's adapter only "
            "(the file's lora_te keys are not read); drop one of them"
        )
    if args.train_text_encoder and args.lora_rank and args.lora_type not in (None, "lora"):
        parser.error(
            f"--train_text_encoder gives the text encoders a plain LoRA; --lora_type {args.lora_type} is for "
            "the UNet only: train the encoders in a separate plain-LoRA run, or drop --train_text_encoder"
        )
    # --tag_dropout / --keep_tokens change the caption each step, --train_text_encoder needs the captions
    # themselves: only online text encoding can do that.
    changed = bool(args.tag_dropout or args.keep_tokens or args.train_text_encoder)
    if args.data_config:
        from sdxl_ztsnr.data_config import load_data_config

        changed = changed or load_data_config(args.data_config).online_captions  # fails early on a bad file
    args.text_online_implied = bool(changed and not args.text_online)
    args.text_online = args.text_online or args.text_online_implied
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        parser.error("--proportion_empty_prompts must be in [0, 1]")
    if (args.export_ema or args.validate_ema) and not args.use_ema:
        parser.error("--export_ema and --validate_ema need --use_ema")
    if args.lora_type and not (args.lora_rank or args.lora_weights):
        parser.error("--lora_type needs --lora_rank (a new adapter) or --lora_weights (a continued one)")
    try:
        timestep_sampling(args).check(NUM_TRAIN_TIMESTEPS)
        parse_optimizer_args(args.optimizer_args)
        check_optimizer_name(args.optimizer)
        if args.fused_backward_pass:
            check_per_parameter_optimizer(
                args.optimizer, "--fused_backward_pass", "drop --fused_backward_pass"
            )
        if args.weights_dtype == "bf16":
            check_per_parameter_optimizer(
                args.optimizer, "--weights_dtype bf16", "train with --weights_dtype fp32"
            )
    except UserError as error:
        parser.error(str(error))
