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
import logging
import math
from pathlib import Path

import torch

from sdxl_ztsnr import checkpointing, launch, lifecycle, options, unet_options, unet_settings
from sdxl_ztsnr.attention import ATTENTION_BACKENDS, attention_context, configure_attention
from sdxl_ztsnr.base_model import BaseModel, conversion_note, resolve_base
from sdxl_ztsnr.console import make_output_dir
from sdxl_ztsnr.lora import DEFAULT_TARGET_MODULES
from sdxl_ztsnr.lora_variants import LORA_TYPES
from sdxl_ztsnr.optimizers import (
    clear_nonfinite_mark,
    clip_and_check_gradients,
)
from sdxl_ztsnr.run_config import DATA_SOURCES_KEY, parse_with_config_file, saved_options
from sdxl_ztsnr.schedule import (
    LOSS_WEIGHTINGS,
    NAI_SIGMA_MAX,
    alphas_cumprod,
)
from sdxl_ztsnr.step_logs import StepLogs
from sdxl_ztsnr.tags import DEFAULT_CLASS_WEIGHTS
from sdxl_ztsnr.text_encoder_training import (
    TrainedTextEncoders,
)
from sdxl_ztsnr.train_data import (
    BucketBatchSampler,  # noqa: F401 (the lifecycle tests size epochs with it)
    DataPosition,
    TrainingRows,
    vae_config_latent_stats,
)
from sdxl_ztsnr.trained_weights import TrainedWeights
from sdxl_ztsnr.training import training_loss
from sdxl_ztsnr.training_cache import CaptionSettings, TagWeighting, open_training_rows
from sdxl_ztsnr.unet_outputs import publish_run, write_run_outputs
from sdxl_ztsnr.validation import ValidationSampling, fixed_validation_loss, log_images, validation_grid

logger = logging.getLogger("train_sdxl_ztsnr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options.new_parser(__doc__.split("\n\n")[0])
    options.add_model_options(
        parser,
        model_help="diffusers SDXL pipeline: a local directory or a Hub repo id",
        vae_help="a VAE to use instead of the pipeline's",
        variant_help='weights variant to load, e.g. "fp16"',
    )
    unet_options.add_training_data_options(parser)
    unet_options.add_tag_weighting_options(parser, DEFAULT_CLASS_WEIGHTS)
    unet_options.add_schedule_options(parser, NAI_SIGMA_MAX, LOSS_WEIGHTINGS)
    unet_options.add_adapter_options(parser, DEFAULT_TARGET_MODULES, LORA_TYPES)
    unet_options.add_text_encoder_options(parser)
    options.add_optimizer_options(
        parser,
        "constant_with_warmup",
        "diffusers schedule: constant, constant_with_warmup, linear, cosine, ...",
        weight_decay=1e-2,
        trainer=True,
    )
    options.add_memory_options(
        parser, ["no", "fp16", "bf16"], unet=True, attention_backends=ATTENTION_BACKENDS
    )
    options.add_run_options(
        parser,
        "sdxl-ztsnr-model",
        'a checkpoint directory or "latest" (what a requeue passes: a finished run then trains nothing)',
        "start a new run in an output_dir that holds another run's checkpoints (they are deleted)",
    )
    options.add_logging_options(parser, "sdxl-ztsnr", "host syncs (loss, skipped steps) happen here")
    unet_options.add_validation_options(parser)
    options.add_output_options(
        parser, "skip the single-file .safetensors export", "or log in with `huggingface-cli login`"
    )
    unet_options.add_vae_stage_options(parser)
    return parse_with_config_file(parser, argv, lambda args: unet_options.check_training_args(parser, args))


def make_accelerator(args: argparse.Namespace):
    return launch.make_accelerator(
        args.output_dir,
        args.logging_dir,
        args.mixed_precision,
        args.gradient_accumulation_steps,
        args.report_to,
    )


def precompute_raw_data(args: argparse.Namespace, base: BaseModel) -> Path:
    """--train_data_dir or --data_config: build (or finish, or reuse) OUTPUT_DIR/cache with precompute_latents.py's
    own code."""
    from sdxl_ztsnr.data_config import load_data_config
    from sdxl_ztsnr.precompute import FolderInputs
    from sdxl_ztsnr.precompute_run import DECODE_WORKERS, format_summary, run_precompute

    cache_dir = Path(args.output_dir) / "cache"
    result = run_precompute(
        load_data_config(args.data_config)
        if args.data_config
        else FolderInputs(args.train_data_dir, args.mask_dir, args.alpha_mask),
        cache_dir,
        base.path,
        base.vae_path,
        text_online=args.text_online,
        resolution=args.resolution or 1024,
        bucket_step=args.bucket_step,
        max_token_chunks=args.max_token_chunks,
        shard_size=args.precompute_shard_size,
        num_workers=DECODE_WORKERS,
    )
    print(format_summary(result, str(cache_dir)), flush=True)
    return cache_dir


def base_model(args: argparse.Namespace, accelerator) -> BaseModel:
    """The base as given, or a single file's diffusers copy (made by one process per machine, then reused)."""
    return resolve_base(
        args.pretrained_model_name_or_path,
        args.config,
        args.revision,
        args.variant,
        args.pretrained_vae_model_name_or_path,
        accelerator.local_main_process_first,
    )


def load_training_data(
    args: argparse.Namespace, accelerator, base: BaseModel, text: TrainedTextEncoders | None = None
) -> TrainingRows:
    """The cache (refused if made for another model), tag weights, held-out rows, online text encoders (the
    trained ones with --train_text_encoder)."""
    # A local cache, a Hub dataset id (downloaded once, memory-mapped), or a raw folder precomputed now.
    source = args.precomputed_dir or precompute_raw_data(args, base)
    accelerator.wait_for_everyone()
    if args.text_online_implied:
        reason = (
            "--train_text_encoder trains on the captions"
            if args.train_text_encoder
            else "--tag_dropout/--keep_tokens change captions each step"
        )
        logger.info("%s: encoding them online (--text_online)", reason)
    tags = None
    if not args.no_tag_weighting:
        class_weights = {name: getattr(args, f"{name}_weight") for name in DEFAULT_CLASS_WEIGHTS}
        tags = TagWeighting(
            class_weights,
            args.tag_frequency_path,
            args.dynamic_tag_weights,
            args.tag_class_map,
            args.min_tag_weight,
            args.max_tag_weight,
        )
    captions = CaptionSettings(
        args.proportion_empty_prompts, args.keep_tokens, args.tag_dropout, args.text_online
    )
    data_config = None
    if args.data_config:
        from sdxl_ztsnr.data_config import load_data_config

        data_config = load_data_config(args.data_config)
        for note in data_config.notes:
            logger.info(note)
    return open_training_rows(
        source,
        base,
        accelerator.device,
        captions,
        tags,
        None if data_config else args.resolution,  # several sources: each its own resolution
        args.validation_rows,
        args.seed,
        args.normalize_latents,
        args.dataloader_num_workers,
        "require" if args.masked_loss else "ignore" if args.no_masked_loss else "auto",
        text,
        data_config=data_config,
    )


def run_config(args: argparse.Namespace, data: TrainingRows) -> dict:
    """training_config.json: the flags, and for several sources what each one holds and skipped."""
    from sdxl_ztsnr.source_cache import source_summary

    config = saved_options(args)
    summary = source_summary(data.metadata)
    if summary:
        counts = data.source_row_counts()
        for entry, rows, samples in zip(summary, counts, data.epoch_counts, strict=True):
            entry.update(training_rows=rows, samples_per_epoch=samples)
        config[DATA_SOURCES_KEY] = summary
    return config
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


def latent_stats(args: argparse.Namespace, data: TrainingRows):
    return (data.latents_mean, data.latents_std) if args.normalize_latents else None


def save_outputs(
    args,
    accelerator,
    base: BaseModel,
    weights: TrainedWeights,
    text: TrainedTextEncoders,
    unet,
    data: TrainingRows,
    metrics: dict,
    step: int,
    run_id: str,
) -> None:
    """The one save path for the model (sdxl_ztsnr.unet_outputs), from the main process."""
    model = weights.main_process_unet(accelerator, unet)
    if accelerator.is_main_process:
        write_run_outputs(
            Path(args.output_dir),
            weights,
            model,
            base,
            run_config(args, data),
            run_id,
            step,
            ztsnr=not args.no_ztsnr,
            export_ema=args.export_ema,
            single_file=not args.no_single_file,
            latent_stats=latent_stats(args, data),
            metrics=metrics,
            card_name=args.hub_model_id,
            text_encoders=text,
        )


def publish(args: argparse.Namespace, accelerator) -> None:
    """--push_to_hub: the outputs, never the cache, checkpoints or the VAE stage's run."""
    if args.push_to_hub and accelerator.is_main_process:
        publish_run(Path(args.output_dir), args.hub_model_id, args.hub_token, args.precomputed_dir)


def run_vae_stage(args: argparse.Namespace) -> dict:
    """The VAE stage (requeue-safe: it resumes its own run in OUTPUT_DIR/vae_finetune), its decoder then put
    into the pipeline and the single file."""
    stage = unet_settings.vae_stage(args)
    if stage is None:
        return {}
    out = Path(args.output_dir)
    return stage.run(out, None if args.no_single_file else out / f"{out.resolve().name}.safetensors")


def run_validation(
    args,
    accelerator,
    base: BaseModel,
    weights: TrainedWeights,
    text: TrainedTextEncoders,
    unet,
    data: TrainingRows,
    alpha_bar,
    step: int,
) -> dict[str, float]:
    """Validation loss on held-out rows and sample grids (all processes' models are equal; main computes).

    With --validate_ema both use the EMA weights.
    """
    metrics: dict[str, float] = {}
    model = weights.main_process_unet(accelerator, unet)
    if not accelerator.is_main_process:
        return metrics
    batches = data.validation_batches(accelerator.device)  # read outside autocast: fp16 rows stay fp16
    with accelerator.autocast(), weights.exported(args.validate_ema):
        metrics = fixed_validation_loss(model, batches, alpha_bar, seed=args.seed)
        if args.validation_prompt:
            pipeline = base.load_pipeline(
                model, dtype=torch.float32, components=text.pipeline_components()
            ).to(accelerator.device)
            stats = latent_stats(args, data)
            if stats is not None:
                mean, std = vae_config_latent_stats(*stats, pipeline.vae.config.scaling_factor)
                pipeline.vae.register_to_config(latents_mean=mean, latents_std=std)
            sampling = ValidationSampling(
                args.validation_prompt,
                args.num_validation_images,
                args.validation_inference_steps,
                args.validation_guidance_scale,
                args.validation_guidance_rescale,
            )
            grid = validation_grid(pipeline, sampling, alpha_bar, data.validation_size, args.seed)
            grid.save(Path(args.output_dir) / f"validation-{step:07d}.png")
            log_images(accelerator.trackers, grid, args.validation_prompt, step)
            del pipeline
    model.train()
    accelerator.log(metrics, step=step)
    return metrics


def finish_only(
    args,
    accelerator,
    base: BaseModel,
    weights: TrainedWeights,
    text: TrainedTextEncoders,
    data: TrainingRows,
    plan: lifecycle.RunPlan,
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
        text.prepare(accelerator)
        text.register_checkpoint_hooks(accelerator)  # before the UNet's (see there)
        weights.register_checkpoint_hooks(accelerator)
        accelerator.load_state(plan.resume)
        save_outputs(args, accelerator, base, weights, text, unet, data, {}, plan.resume_step, plan.run_id)
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
    stage = unet_settings.vae_stage(args)
    if stage is not None:
        stage.check()  # LPIPS cannot load (offline): say so now, not after the UNet stage

    # Base and data: the latent cache (built here from raw images if needed), global batches of one bucket each.
    base = base_model(args, accelerator)
    logger.info(conversion_note(base.schedule(), ztsnr=not args.no_ztsnr))
    # The text encoders train with --train_text_encoder (and encode the captions then); else stay frozen.
    text = unet_settings.trained_text_encoders(args, base, accelerator.distributed_type)
    data = load_training_data(args, accelerator, base, text)
    sampler = data.sampler(
        args.train_batch_size, args.seed, accelerator.process_index, accelerator.num_processes
    )
    accumulation = args.gradient_accumulation_steps
    # Accumulation cycles run across epoch ends: an epoch is a number of micro-batches, not of updates.
    max_steps = args.max_train_steps or math.ceil(args.num_train_epochs * len(sampler) / accumulation)

    # Model: the whole UNet or a LoRA on it, with its EMA (and the text encoders above); schedule, optimizer.
    unet = base.load_trainable_unet(
        args.weights_dtype == "bf16",
        args.gradient_checkpointing,
        channels_last=accelerator.device.type == "cuda",
    )
    weights = unet_settings.trained_weights(args, base, unet, accelerator.distributed_type)
    if plan.finished_at(max_steps):
        return finish_only(args, accelerator, base, weights, text, data, plan)
    alpha_bar = alphas_cumprod(ztsnr=not args.no_ztsnr, sigma_max=args.sigma_max)
    timesteps = unet_options.timestep_sampling(args)
    logger.info(timesteps.describe(len(alpha_bar)))
    attention = configure_attention(
        weights.unet, args.attention_backend, accelerator.device, unet_settings.compute_dtype(args)
    )
    optimizer = unet_settings.make_optimizer(args, weights, text, accelerator)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_steps
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(weights.unet, optimizer, lr_scheduler)
    text_models = text.prepare(accelerator)  # the trained text encoders, prepared: [] when they are frozen
    if args.fused_backward_pass:
        optimizer.optimizer.attach()  # after prepare: the hooks sit on the parameters that train
    text.register_checkpoint_hooks(accelerator)  # before the UNet's: see TrainedTextEncoders
    weights.register_checkpoint_hooks(accelerator)
    trained_parameters = weights.parameters + text.parameters
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
        position = checkpointing.resume_position(state, sampler.global_batch_size)
        logger.info("resumed run %s from %s at step %d", plan.run_id, plan.resume, global_step)
    accelerator.step = 0  # checkpoints sit on update boundaries: the next micro-batch starts a cycle
    project = args.wandb_project if "wandb" in args.report_to else "sdxl_ztsnr"
    launch.init_trackers(accelerator, project, saved_options(args), args.wandb_run_name)
    for entry in run_config(args, data).get(DATA_SOURCES_KEY, []):
        logger.info(
            "source %s: %d rows (%d training), %d samples per epoch; skipped %d inputs%s",
            entry["name"], entry["rows"], entry["training_rows"], entry["samples_per_epoch"], entry["skipped"],
            "".join(f", {k}: {n}" for k, n in entry["skipped_by_kind"].items()),
        )  # fmt: skip
    logger.info(
        "%d training rows, %d buckets, %d global batches of %d per epoch, %d steps",
        len(data.train_ids), len(sampler.rows_by_bucket), len(sampler), sampler.global_batch_size, max_steps,
    )  # fmt: skip
    # Start-up leaves millions of long-lived objects (models, datasets): one automatic full garbage collection
    # over them stalls a step for ~0.4 s. Collect once now and keep them out of later collections.
    gc.collect()
    gc.freeze()
    progress = tqdm(
        total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    stream = data.stream(sampler, accelerator.device, args.seed, position, global_step * accumulation)
    logs, metrics = StepLogs(accelerator.device), {}

    while global_step < max_steps:
        for _ in range(accumulation):  # one optimizer update
            position, batch = next(stream)
            with accelerator.accumulate(unet, *text_models), attention_context(attention):
                batch = data.encode_text(batch)  # --train_text_encoder: captions encoded here, with gradients
                # The loss in one place: ZTSNR noising, v target, MSE × MinSNR(guarded) × tag weight (× importance).
                loss, _ = training_loss(
                    unet,
                    batch,
                    alpha_bar,
                    weighting=args.loss_weighting,
                    snr_gamma=args.snr_gamma,
                    timestep_shift=data.timestep_shift(batch) if args.resolution_shift else 1.0,
                    timestep_sampling=timesteps,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    found_inf = clip_and_check_gradients(
                        accelerator, optimizer, trained_parameters, clip_norm, args.mixed_precision == "fp16"
                    )
                optimizer.step()
                clear_nonfinite_mark(optimizer)
                optimizer.zero_grad(set_to_none=True)
            logs.add_micro_batch(loss)
        lr_scheduler.step()
        global_step += 1
        weights.after_update(global_step, final=global_step == max_steps)
        logs.add_update(found_inf)
        progress.update(1)

        if global_step % args.logging_steps == 0 or global_step == max_steps:
            window = logs.flush(accelerator, sampler.global_batch_size, lr_scheduler.get_last_lr()[0])
            progress.set_postfix(
                loss=f"{window['loss']:.4f}",
                lr=f"{window['lr']:.2e}",
                samples_s=f"{window['samples_per_s']:.2f}",
            )
            accelerator.log(window, step=global_step)
            if logs.bad_steps_in_a_row() >= args.max_bad_steps:
                save_checkpoint(args, accelerator, global_step, position, plan.run_id)
                raise SystemExit(
                    f"{logs.bad_steps_in_a_row()} non-finite steps in a row at step {global_step}: "
                    "lower --learning_rate or check the data; a checkpoint was saved"
                )
        if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
            save_checkpoint(args, accelerator, global_step, position, plan.run_id)
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < max_steps:
            metrics = run_validation(
                args, accelerator, base, weights, text, unet, data, alpha_bar, global_step
            )

    progress.close()
    accelerator.wait_for_everyone()
    metrics = run_validation(args, accelerator, base, weights, text, unet, data, alpha_bar, global_step)
    save_outputs(args, accelerator, base, weights, text, unet, data, metrics, global_step, plan.run_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    gc.unfreeze()
    result = {"step": global_step, "skipped_steps": logs.bad_total.item(), **metrics}
    del unet, optimizer, weights, text, text_models  # the VAE stage gets the accelerator's memory
    accelerator.free_memory()
    vae_metrics = run_vae_stage(args)
    publish(args, accelerator)
    return {**result, **{f"vae_{k}": v for k, v in vae_metrics.items() if isinstance(v, (int, float))}}


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
