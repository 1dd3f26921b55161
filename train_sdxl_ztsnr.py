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
import os
import time
from pathlib import Path

import torch

from sdxl_ztsnr import checkpointing, export
from sdxl_ztsnr.model_card import model_card
from sdxl_ztsnr.schedule import (
    LOSS_WEIGHTINGS,
    NAI_SIGMA_MAX,
    alphas_cumprod,
    scheduler_config,
)
from sdxl_ztsnr.tags import DEFAULT_CLASS_WEIGHTS
from sdxl_ztsnr.train_data import BucketBatchSampler, TrainingRows, split_rows, vae_config_latent_stats
from sdxl_ztsnr.training import build_optimizer, clear_nonfinite_mark, mark_nonfinite_step, training_loss
from sdxl_ztsnr.validation import fixed_validation_loss, image_grid, log_images, sample_images

logger = logging.getLogger("train_sdxl_ztsnr")

# Flags of stages that are not part of this script yet: stop at once rather than ignore them.
NOT_BUILT = {
    "finetune_vae": "VAE decoder fine-tuning is train_vae.py's job, which is not built yet; drop --finetune_vae",
    "vae_learning_rate": "--vae_learning_rate belongs to VAE fine-tuning (train_vae.py, not built yet)",
}


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
        "--resolution", type=int, default=1024, help="maximum bucket area is resolution² (raw data)"
    )
    data.add_argument(
        "--bucket_step", type=int, default=64, help="bucket sides are multiples of this (raw data)"
    )
    data.add_argument("--max_token_chunks", type=int, default=3, help="75-token chunks per prompt (raw data)")
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
    optim.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument(
        "--max_bad_steps",
        type=int,
        default=20,
        help="non-finite steps in a row (checked at logging steps) that stop the run",
    )

    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    speed.add_argument("--enable_amp", action="store_true", help="alias of --mixed_precision bf16")
    speed.add_argument("--gradient_checkpointing", action="store_true")
    speed.add_argument("--allow_tf32", action="store_true")
    speed.add_argument(
        "--enable_xformers", "--enable_xformers_memory_efficient_attention", action="store_true"
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
    logs.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint directory or "latest"')
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
    for name in NOT_BUILT:
        parser.add_argument(f"--{name}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    for name, message in NOT_BUILT.items():
        if getattr(args, name) is not None:
            parser.error(message)
    if args.enable_amp and args.mixed_precision is None:
        args.mixed_precision = "bf16"
    args.mixed_precision = args.mixed_precision or "no"
    if args.use_wandb:
        args.report_to = "wandb"
    if (args.precomputed_dir is None) == (args.train_data_dir is None):
        parser.error(
            "give exactly one of --precomputed_dir (a latent cache) or --train_data_dir (raw images)"
        )
    if (args.tag_dropout or args.keep_tokens) and not args.text_online:
        parser.error("--tag_dropout and --keep_tokens change the caption, so they need --text_online")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        parser.error("--proportion_empty_prompts must be in [0, 1]")
    return args


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    report_to = None if args.report_to == "none" else args.report_to
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project,
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
        str(args.resolution),
        "--bucket_step",
        str(args.bucket_step),
        "--max_token_chunks",
        str(args.max_token_chunks),
    ]
    if args.pretrained_vae_model_name_or_path:
        argv += ["--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path]
    if args.text_online:
        argv.append("--text_online")
    precompute_latents.main(precompute_latents.parse_args(argv))
    return cache_dir


def load_training_data(args: argparse.Namespace, accelerator) -> TrainingRows:
    """The cache (refused if made for another model), tag weights, held-out rows, online text encoders."""
    from sdxl_ztsnr.cache import load_cache, load_pad_chunk, model_identity
    from sdxl_ztsnr.precompute import load_vae
    from sdxl_ztsnr.tags import load_tag_classes, load_tag_frequencies, tag_frequencies, tag_loss_weights
    from sdxl_ztsnr.text_encoding import encode_prompts, load_text_encoders

    cache_dir = Path(args.precomputed_dir) if args.precomputed_dir else precompute_raw_data(args)
    accelerator.wait_for_everyone()
    vae = load_vae(
        args.pretrained_model_name_or_path, vae_name_or_path=args.pretrained_vae_model_name_or_path
    )
    dataset, metadata = load_cache(cache_dir)
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
    dataset, metadata = load_cache(cache_dir, expected)
    del vae
    if text_online and not args.text_online:
        logger.info("the cache holds no text embeddings: encoding captions every step (--text_online)")

    train_ids, validation_ids = split_rows(len(dataset), args.validation_rows, args.seed)
    tag_lists = dataset.with_format("arrow")["tags"].to_pylist()
    weights = torch.ones(len(dataset))
    if not args.no_tag_weighting:
        if args.dynamic_tag_weights:
            frequencies = tag_frequencies(tag_lists[i] for i in train_ids)
        else:
            frequencies = load_tag_frequencies(args.tag_frequency_path or cache_dir / "tag_frequencies.json")
        class_weights = {name: getattr(args, f"{name}_weight") for name in DEFAULT_CLASS_WEIGHTS}
        tag_classes = load_tag_classes(args.tag_class_map) if args.tag_class_map else None
        weights[train_ids] = tag_loss_weights(
            [tag_lists[i] for i in train_ids],
            frequencies,
            class_weights,
            tag_classes,
            args.min_tag_weight,
            args.max_tag_weight,
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

    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
    )
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # noqa: BLE001 - xformers raises several kinds; all mean "not usable"
            raise SystemExit(
                f"--enable_xformers: xformers is not usable here ({error}); drop the flag"
            ) from error
    if device_type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return unet


def save_checkpoint(args, accelerator, step: int, epoch: int, batch_offset: int, generator) -> None:
    """accelerate state + trainer_state.json (position in the data order, every rank's generator state)."""
    from accelerate.utils import gather_object

    states = gather_object([generator.get_state().numpy().tobytes().hex()])
    checkpointing.save_checkpoint_atomic(
        accelerator,
        args.output_dir,
        step,
        {"generator_states": states},
        epoch=epoch,
        batch_offset=batch_offset,
        total_limit=args.checkpoints_total_limit,
    )


def restore_generator(generator: torch.Generator, states: list[str], rank: int) -> None:
    """Set this rank's generator from a checkpoint (a rank beyond the saved ones keeps its seed)."""
    if rank < len(states):
        generator.set_state(torch.frombuffer(bytearray.fromhex(states[rank]), dtype=torch.uint8).clone())


def save_outputs(args, accelerator, unet, data: TrainingRows, metrics: dict, final: bool) -> None:
    """The one save path for the model: diffusers pipeline, single file, config JSON and model card."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    if not accelerator.is_main_process:
        return
    unet = accelerator.unwrap_model(unet)
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile wrapper
    base = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=unet, revision=args.revision, variant=args.variant
    )
    vae = base.vae
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    mean, std = (None, None)
    if args.normalize_latents:
        mean, std = vae_config_latent_stats(data.latents_mean, data.latents_std, vae.config.scaling_factor)
    out = Path(args.output_dir)
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
    )
    if not args.no_single_file:
        name = Path(args.output_dir).resolve().name
        export.save_single_file(
            out / f"{name}.safetensors",
            unet.state_dict(),
            vae.state_dict(),
            base.text_encoder.state_dict(),
            base.text_encoder_2.state_dict(),
            v_pred=True,
            ztsnr=not args.no_ztsnr,
        )
    config = {k: v for k, v in vars(args).items() if k != "hub_token"}
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    card = model_card(
        args.hub_model_id or out.resolve().name,
        args.pretrained_model_name_or_path,
        config,
        validation_images=None,
        metrics=metrics,
    )
    (out / "README.md").write_text(card)
    if final and args.push_to_hub:
        from sdxl_ztsnr.hub import push_to_hub

        push_to_hub(out, args.hub_model_id or out.resolve().name, token=args.hub_token)


def run_validation(args, accelerator, unet, data: TrainingRows, alpha_bar, step: int) -> dict[str, float]:
    """Validation loss on held-out rows (all processes' models are equal; main computes) and sample grids."""
    from diffusers import StableDiffusionXLPipeline

    metrics: dict[str, float] = {}
    if not accelerator.is_main_process:
        return metrics
    model = accelerator.unwrap_model(unet)
    with accelerator.autocast():
        metrics = fixed_validation_loss(
            model, data.validation_batches(accelerator.device), alpha_bar, seed=args.seed
        )
        if args.validation_prompt:
            pipeline = StableDiffusionXLPipeline.from_pretrained(
                args.pretrained_model_name_or_path,
                unet=getattr(model, "_orig_mod", model),
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


def main(args: argparse.Namespace) -> dict:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # Data: the latent cache (built here from raw images if needed), batches of one bucket each.
    data = load_training_data(args, accelerator)
    sampler = BucketBatchSampler(
        data.train_buckets,
        args.train_batch_size,
        args.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )
    updates_per_epoch = math.ceil(len(sampler) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)

    # Model, schedule, optimizer.
    unet = load_unet(args, accelerator.device.type)
    alpha_bar = alphas_cumprod(ztsnr=not args.no_ztsnr, sigma_max=args.sigma_max)
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(
        unet.parameters(),
        "adamw8bit" if args.use_8bit_adam else "adamw",
        lr,
        (args.adam_beta1, args.adam_beta2),
        args.adam_weight_decay,
        args.adam_epsilon,
        accelerator.device.type,
    )
    # accelerate steps a prepared scheduler once per process per update, hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if args.enable_compile:
        unet = torch.compile(unet, mode=args.compile_mode)
    # Listed once: walking the module tree behind unet.parameters() costs milliseconds of host time per step.
    trained_parameters = list(unet.parameters())
    # Timesteps, noise and caption dropout come from this CPU generator: reproducible on any device,
    # and saved in each checkpoint (as JSON, not a pickle) so a resumed run draws what the unbroken run drew.
    generator = torch.Generator().manual_seed(args.seed * 1009 + accelerator.process_index)

    # Resume: weights, optimizer, lr schedule, RNG and the position in the data order.
    global_step, start_epoch, start_batch = 0, 0, 0
    resume = checkpointing.resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = checkpointing.load_trainer_state(resume)
        global_step, start_epoch, start_batch = state["step"], state["epoch"], state["batch_offset"]
        restore_generator(generator, state["generator_states"], accelerator.process_index)
        logger.info("resumed from %s at step %d", resume, global_step)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            args.wandb_project if "wandb" in args.report_to else "sdxl_ztsnr",
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
            init_kwargs={"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {},
        )

    logger.info(
        "%d training rows, %d buckets, %d steps, %d epochs",
        len(data.train_buckets),
        len(set(data.train_buckets)),
        max_steps,
        num_epochs,
    )
    # Start-up leaves millions of long-lived objects (models, datasets): one automatic full garbage collection
    # over them stalls a step for ~0.4 s. Collect once now and keep them out of later collections.
    gc.collect()
    gc.freeze()
    progress = tqdm(
        total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    running_loss = torch.zeros((), device=accelerator.device)
    bad_in_a_row = torch.zeros((), device=accelerator.device)
    bad_total = torch.zeros((), device=accelerator.device)
    samples_since_log, log_time = 0, time.perf_counter()
    metrics: dict[str, float] = {}

    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        for batch_index, batch in enumerate(
            data.loader(sampler, accelerator.device, generator), start=sampler.start_batch
        ):
            with accelerator.accumulate(unet):
                # The loss in one place: ZTSNR noising, v target, MSE × MinSNR(guarded) × tag weight.
                loss, _ = training_loss(
                    unet,
                    batch,
                    alpha_bar,
                    generator,
                    args.loss_weighting,
                    args.snr_gamma,
                    data.timestep_shift(batch) if args.resolution_shift else 1.0,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trained_parameters, args.max_grad_norm)
                    found_inf = mark_nonfinite_step(optimizer, grad_norm, args.mixed_precision == "fp16")
                optimizer.step()
                clear_nonfinite_mark(optimizer)
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0)
            samples_since_log += args.train_batch_size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            bad_in_a_row = (bad_in_a_row + found_inf) * found_inf
            bad_total += found_inf
            progress.update(1)

            if global_step % args.logging_steps == 0 or global_step == max_steps:
                elapsed = time.perf_counter() - log_time
                logs = {
                    "loss": running_loss.item() / (args.logging_steps * args.gradient_accumulation_steps),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "samples_per_s": samples_since_log / elapsed,
                    "skipped_steps": bad_total.item(),
                }
                progress.set_postfix(
                    loss=f"{logs['loss']:.4f}",
                    lr=f"{logs['lr']:.2e}",
                    samples_s=f"{logs['samples_per_s']:.2f}",
                )
                accelerator.log(logs, step=global_step)
                running_loss.zero_()
                samples_since_log, log_time = 0, time.perf_counter()
                if bad_in_a_row.item() >= args.max_bad_steps:
                    save_checkpoint(args, accelerator, global_step, epoch, batch_index + 1, generator)
                    raise SystemExit(
                        f"{int(bad_in_a_row.item())} non-finite steps in a row at step {global_step}: "
                        "lower --learning_rate or check the data; a checkpoint was saved"
                    )
            if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                save_checkpoint(args, accelerator, global_step, epoch, batch_index + 1, generator)
            if args.validation_steps and global_step % args.validation_steps == 0:
                metrics = run_validation(args, accelerator, unet, data, alpha_bar, global_step)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break

    accelerator.wait_for_everyone()
    metrics = run_validation(args, accelerator, unet, data, alpha_bar, global_step)
    save_outputs(args, accelerator, unet, data, metrics, final=True)
    accelerator.end_training()
    gc.unfreeze()
    return {"step": global_step, "skipped_steps": bad_total.item(), **metrics}


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
