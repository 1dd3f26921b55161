"""The VAE decoder fine-tune (NovelAI Diffusion V3 §4; Stability's sd-vae-ft-mse): train_vae.py's run, and the
--finetune_vae stage of train_sdxl_ztsnr.py, both through ``finetune_vae(VaeRun)``.

Random crops from full-resolution images; MSE (or L1) + LPIPS, optionally a PatchGAN hinge loss with the adaptive
weight of taming-transformers. Only the decoder trains by default, so latent caches and UNets stay valid.
Writes the output directory as an AutoencoderKL directory, a single-file VAE in the original layout, held-out
PSNR/SSIM/LPIPS of the starting and the fine-tuned VAE, and a model card. Requeue-safe, resumable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdxl_ztsnr import checkpointing, lifecycle, options, vae_data, vae_metrics, vae_options, vae_training
from sdxl_ztsnr.console import UserError, loading_model, make_output_dir
from sdxl_ztsnr.launch import compile_or_eager, init_trackers, make_accelerator
from sdxl_ztsnr.train_data import DataPosition
from sdxl_ztsnr.vae_outputs import install_finetuned_vae, save_vae, vae_model_card

logger = logging.getLogger("train_vae")

# Where the --finetune_vae stage of train_sdxl_ztsnr.py trains, inside the pipeline's output directory.
VAE_STAGE_SUBFOLDER = "vae_finetune"
RAW_WEIGHTS_SUBFOLDER = "raw_weights"  # with --use_ema: the last raw weights beside the published EMA ones


@dataclass(frozen=True)
class VaeRun:
    """The settings of one VAE fine-tune, one field per flag of train_vae.py (see its --help)."""

    # model and images
    pretrained_model_name_or_path: str | None
    pretrained_vae_model_name_or_path: str | None
    config: str | None
    revision: str | None
    variant: str | None
    train_data_dir: str | None
    dataset_name: str | None
    data_config: str | None
    dataset_split: str
    image_column: str
    max_image_pixels: int | None
    crop_size: int
    validation_images: int
    dataloader_num_workers: int
    # loss
    loss: str
    perceptual_weight: float
    lpips_net: str
    latents: str
    train_encoder: bool
    kl_weight: float
    gan_start_step: int | None
    gan_weight: float
    disc_learning_rate: float | None
    disc_channels: int
    disc_layers: int
    # optimisation and EMA
    train_batch_size: int
    num_train_epochs: int
    max_train_steps: int | None
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    use_8bit_adam: bool
    max_grad_norm: float
    use_ema: bool
    ema_decay: float
    ema_update_every: int
    ema_device: str
    # speed and memory
    mixed_precision: str
    gradient_checkpointing: bool
    allow_tf32: bool
    enable_compile: bool
    compile_mode: str
    # run, logging, outputs
    output_dir: str
    seed: int
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    overwrite_output_dir: bool
    logging_steps: int
    logging_dir: str
    report_to: str
    wandb_project: str
    wandb_run_name: str | None
    validation_steps: int
    no_single_file: bool
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None
    lpips_random_backbone: bool = False  # tests: LPIPS without its ImageNet weights (offline)

    @classmethod
    def from_options(cls, parsed: argparse.Namespace) -> VaeRun:
        """The settings a parsed VAE command line holds (aliases already resolved)."""
        values = vars(parsed)
        fields = {f.name for f in dataclasses.fields(cls)}
        run = {name: values[name] for name in fields if name in values}
        run["lpips_random_backbone"] = bool(values.get("_lpips_random_backbone", False))
        return cls(**run)

    def saved(self) -> dict:
        """training_config.json: every flag's value (accepted back as --config_file), no token."""
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("hub_token", "lpips_random_backbone")
        }


def parse_vae_options(argv: Sequence[str]) -> VaeRun:
    """A VAE fine-tune's settings from train_vae.py-style flags (what the trainer's VAE stage passes)."""
    parser = options.new_parser("VAE fine-tune", config_file=False)
    vae_options.add_vae_finetune_options(parser)
    parsed = parser.parse_args(list(argv))
    vae_options.check_vae_finetune_args(parser, parsed)
    return VaeRun.from_options(parsed)


def load_images(run, accelerator) -> tuple[vae_data.ImageSource, vae_data.ImageScan]:
    """The image source, decoded once across all ranks; bad images listed in OUTPUT_DIR/skipped.jsonl."""
    from sdxl_ztsnr.images import DEFAULT_MAX_PIXELS

    if run.data_config:
        from sdxl_ztsnr.data_config import load_data_config

        images = vae_data.SourceImages(load_data_config(run.data_config))
    elif run.train_data_dir:
        images = vae_data.FolderImages(run.train_data_dir)
    else:
        images = vae_data.DatasetImages(run.dataset_name, run.image_column, run.dataset_split)
    scan = vae_data.scan_images_on_all_ranks(
        accelerator, images, run.dataloader_num_workers, run.max_image_pixels or DEFAULT_MAX_PIXELS
    )
    if not scan.usable:
        raise SystemExit(
            f"error: every one of the {len(images)} images was skipped; see {run.output_dir}/skipped.jsonl"
        )
    return images, scan


def report_skipped(output_dir: str, scan: vae_data.ImageScan, total: int) -> None:
    """OUTPUT_DIR/skipped.jsonl (empty when nothing was skipped) and one log line."""
    path = vae_data.write_skipped(output_dir, scan.skipped)
    if scan.skipped:
        logger.warning(
            "%d of %d images skipped; the reason for each is in %s", len(scan.skipped), total, path
        )


def load_starting_vae(run: VaeRun, accelerator):
    """The VAE to fine-tune, fp32, and its config (what the outputs keep). A single-file base is converted
    once per machine into a cached diffusers directory (sdxl_ztsnr.base_model.resolve_base)."""
    from diffusers import AutoencoderKL

    from sdxl_ztsnr.base_model import resolve_base

    if run.pretrained_vae_model_name_or_path:
        with loading_model(run.pretrained_vae_model_name_or_path, "vae"):
            vae = AutoencoderKL.from_pretrained(
                run.pretrained_vae_model_name_or_path, torch_dtype=torch.float32
            )
    else:
        base = resolve_base(
            run.pretrained_model_name_or_path, run.config, run.revision, run.variant,
            first=accelerator.local_main_process_first,
        )  # fmt: skip
        with loading_model(base.label, "vae"):
            vae = AutoencoderKL.from_pretrained(
                base.path,
                subfolder="vae",
                revision=base.revision,
                variant=base.variant,
                torch_dtype=torch.float32,
            )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if run.crop_size % factor:
        raise SystemExit(
            f"error: --crop_size {run.crop_size} must be a multiple of the VAE's downsampling {factor}"
        )
    return vae, dict(vae.config)


def load_lpips(run) -> torch.nn.Module | None:
    """The LPIPS network for the loss and the metric; stops here (before any data work) when it cannot be had."""
    try:
        return vae_training.load_lpips(run.lpips_net, random_backbone=run.lpips_random_backbone)
    except vae_training.LpipsWeightsMissing as error:
        if run.perceptual_weight > 0:
            raise SystemExit(f"error: {error}") from None
        logger.warning("LPIPS is not measured (--perceptual_weight 0): %s", error)
        return None


class Evaluation:
    """Held-out crops, the starting VAE's reconstructions of them, and the metrics of every validation."""

    def __init__(self, crops: torch.Tensor, lpips_model, device, autocast):
        self.crops, self.lpips, self.device, self.autocast = crops, lpips_model, device, autocast
        self.starting_reconstruction: torch.Tensor | None = None
        self.starting: dict[str, float] = {}
        self.history: list[dict] = []

    def measure(self, vae) -> tuple[dict[str, float], torch.Tensor]:
        reconstruction = vae_metrics.reconstruct(vae, self.crops, self.device, autocast=self.autocast)
        return vae_metrics.reconstruction_metrics(reconstruction, self.crops, self.lpips), reconstruction

    def measure_start(self, vae) -> None:
        self.starting, self.starting_reconstruction = self.measure(vae)
        logger.info("starting VAE on %d held-out crops: %s", len(self.crops), self.starting)


def run_validation(
    run, accelerator, model, ema, evaluation: Evaluation | None, step: int
) -> dict[str, float]:
    """Held-out metrics of the current (EMA) weights and the grid original | starting | fine-tuned (main process)."""
    from sdxl_ztsnr.validation import log_images

    if evaluation is None:
        return {}
    vae = accelerator.unwrap_model(model)
    vae = getattr(vae, "_orig_mod", vae).vae
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():
        metrics, reconstruction = evaluation.measure(vae)
    evaluation.history.append({"step": step, **metrics})
    grid = vae_metrics.comparison_grid(evaluation.crops, evaluation.starting_reconstruction, reconstruction)
    grid.save(Path(run.output_dir) / f"validation-{step:07d}.png")
    log_images(accelerator.trackers, grid, ["original | starting | fine-tuned"], step)
    accelerator.log({f"val_{k}": v for k, v in metrics.items()}, step=step)
    logger.info("step %d, held-out: %s (starting: %s)", step, metrics, evaluation.starting)
    return metrics


def save_outputs(
    run, accelerator, model, ema, evaluation, final: dict, step: int, run_id: str, starting_config
) -> None:
    """The one save path: AutoencoderKL dir, single file, metrics table, card, outputs.json last, Hub upload."""
    if not accelerator.is_main_process:
        return
    out = Path(run.output_dir)
    vae = accelerator.unwrap_model(model)
    vae = getattr(vae, "_orig_mod", vae).vae
    single_file = None if run.no_single_file else f"{out.resolve().name}.safetensors"
    if ema is not None:
        save_vae(vae, out / RAW_WEIGHTS_SUBFOLDER, starting_config)
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():
        save_vae(vae, out, starting_config, single_file)
    _, table = vae_metrics.write_metrics(
        out, evaluation.starting, final, step, evaluation.history, len(evaluation.crops), run.crop_size
    )
    config = run.saved()
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    base = run.pretrained_vae_model_name_or_path or run.pretrained_model_name_or_path
    card = vae_model_card(
        run.hub_model_id or out.resolve().name, base, config, table.read_text(), single_file
    )
    (out / "README.md").write_text(card)
    lifecycle.mark_outputs_complete(out, run_id, step)
    if run.push_to_hub:
        from sdxl_ztsnr.hub import DEFAULT_IGNORE_PATTERNS, push_to_hub

        # skipped.jsonl names files on this machine; validation grids stay local too.
        ignore = [*DEFAULT_IGNORE_PATTERNS, "skipped.jsonl", "validation-*.png"]
        push_to_hub(out, run.hub_model_id or out.resolve().name, token=run.hub_token, ignore_patterns=ignore)


def save_checkpoint(run, accelerator, step: int, position: DataPosition, run_id: str, evaluation) -> None:
    """accelerate state (+ EMA through its hook) and trainer_state.json; crops and noise are keyed by the step."""
    history = evaluation.history if evaluation is not None else []
    checkpointing.save_checkpoint_atomic(
        accelerator,
        run.output_dir,
        step,
        {
            "run_id": run_id,
            "global_batch_size": run.train_batch_size * accelerator.num_processes,
            "history": history,
        },
        epoch=position.epoch,
        batch_offset=position.batch,
        total_limit=run.checkpoints_total_limit,
    )


def make_ema(run, accelerator, trainable):
    if not run.use_ema:
        return None
    from sdxl_ztsnr.ema import EmaWeights

    ema = EmaWeights(trainable, run.ema_decay, run.ema_update_every, run.ema_device)
    accelerator.register_save_state_pre_hook(ema.save_state_hook(accelerator.is_main_process))
    accelerator.register_load_state_pre_hook(ema.load_state_hook())
    return ema


def finish_only(run, accelerator, vae, evaluation, plan: lifecycle.RunPlan, starting_config) -> dict:
    """A requeue of a finished run: train nothing, overwrite nothing; write the outputs only if missing."""
    logger.info(
        "run %s already finished at step %d (%s): nothing to train",
        plan.run_id,
        plan.resume_step,
        plan.resume,
    )
    if not plan.outputs_complete:
        logger.info("its outputs are missing or incomplete: writing them from %s", plan.resume)
        if evaluation is not None:
            evaluation.measure_start(vae.to(accelerator.device))
        model = vae_training.Reconstructor(vae, run.train_encoder, run.latents == "sample")
        ema = make_ema(run, accelerator, vae_training.select_trainable(vae, run.train_encoder))
        model = accelerator.prepare(model)
        accelerator.load_state(plan.resume)
        final = {}
        if evaluation is not None:
            evaluation.history = checkpointing.load_trainer_state(plan.resume).get("history", [])
            final = run_validation(run, accelerator, model, ema, evaluation, plan.resume_step)
        save_outputs(
            run, accelerator, model, ema, evaluation, final, plan.resume_step, plan.run_id, starting_config
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": plan.resume_step, "finished_before": True}


@dataclass
class Training:
    """What the loop drives: the prepared models and optimizers, the step, the EMA."""

    model: torch.nn.Module
    lr_scheduler: object
    step: vae_training.VaeStep
    trainable: list
    ema: object = None


def build_training(run, accelerator, vae, lpips_model, max_steps: int) -> Training:
    """The decoder side only unless --train_encoder; AdamW, lr schedule, EMA; a discriminator for the GAN term."""
    from diffusers.optimization import get_scheduler

    from sdxl_ztsnr.optimizers import build_optimizer

    trainable = vae_training.select_trainable(vae, run.train_encoder)
    if run.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    model = vae_training.Reconstructor(vae, run.train_encoder, run.latents == "sample")
    name = "adamw8bit" if run.use_8bit_adam else "adamw"
    adam = (
        (run.adam_beta1, run.adam_beta2),
        run.adam_weight_decay,
        run.adam_epsilon,
        accelerator.device.type,
    )
    optimizer = build_optimizer(trainable, name, run.learning_rate, *adam)
    lr_scheduler = get_scheduler(
        run.lr_scheduler, optimizer, num_warmup_steps=run.lr_warmup_steps, num_training_steps=max_steps
    )
    ema = make_ema(run, accelerator, trainable)
    # The VAE first: checkpoints then hold it as model 0 whether or not a discriminator follows (finish_only).
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    disc = disc_optimizer = None
    if run.gan_start_step is not None:
        disc = vae_training.PatchDiscriminator(3, run.disc_channels, run.disc_layers)
        disc_optimizer = build_optimizer(
            disc.parameters(), name, run.disc_learning_rate or run.learning_rate, *adam
        )
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    if run.enable_compile:
        model = compile_or_eager(model, accelerator.device, run.compile_mode)
    settings = vae_training.VaeLossSettings(
        run.loss,
        run.perceptual_weight,
        run.kl_weight if run.train_encoder else 0.0,
        run.gan_weight,
        run.gan_start_step,
    )
    clip_norm = run.max_grad_norm if run.max_grad_norm > 0 else math.inf
    step = vae_training.VaeStep(
        accelerator, model, optimizer, settings, lpips_model, disc, disc_optimizer, clip_norm
    )
    return Training(model, lr_scheduler, step, trainable, ema)


class RunningLogs:
    """Sums of the step's logs on the device (no host sync per step), averaged over what each window saw."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.started = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for key, value in logs.items():
            value = torch.nan_to_num(value, nan=0.0, posinf=0.0)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] += 1

    def flush(self, accelerator, samples_per_micro_batch: int) -> dict[str, float]:
        """Means over this window and all processes ("skipped": the count of skipped updates); then clear."""
        keys = sorted(self.sums)
        means = accelerator.reduce(torch.stack([self.sums[k] for k in keys]), "mean").tolist()
        logs = {k: m if k == "skipped" else m / self.counts[k] for k, m in zip(keys, means, strict=True)}
        logs["samples_per_s"] = (
            self.counts["loss"] * samples_per_micro_batch / (time.perf_counter() - self.started)
        )
        self.clear()
        return logs


def finetune_vae(run: VaeRun) -> dict:
    """Fine-tune the VAE as ``run`` says: resume, train, validate, save; a finished run is only completed."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = make_accelerator(
        run.output_dir,
        run.logging_dir,
        run.mixed_precision,
        run.gradient_accumulation_steps,
        run.report_to,
    )
    set_seed(run.seed)
    if run.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    make_output_dir(run.output_dir)
    # Lifecycle, then the LPIPS backbone: both can stop the run before minutes of image decoding.
    plan = lifecycle.plan_run_on_all_ranks(
        accelerator, run.output_dir, run.resume_from_checkpoint, run.overwrite_output_dir
    )
    lpips_model = load_lpips(run)
    if lpips_model is not None:
        lpips_model.to(accelerator.device)
    if run.train_encoder:
        logger.warning(
            "!!! --train_encoder: the ENCODER changes, so latents change: every latent cache made with the "
            "starting VAE and every UNet trained on it no longer match this VAE; recompute and retrain them. !!!"
        )

    # Data: every image decoded once (bad ones skipped), whole images held out, random crops of the rest.
    images, scan = load_images(run, accelerator)
    train_pos, held_pos = vae_data.split_held_out(len(scan.usable), run.validation_images, run.seed)
    vae, starting_config = load_starting_vae(run, accelerator)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    data = vae_data.CropData(
        images,
        [scan.usable[i] for i in train_pos],
        [scan.sizes[i] for i in train_pos],
        run.crop_size,
        (vae.config.latent_channels, run.crop_size // factor, run.crop_size // factor),
        run.dataloader_num_workers,
        run.max_image_pixels or vae_data.DEFAULT_MAX_PIXELS,
    )
    rank, processes = accelerator.process_index, accelerator.num_processes
    sources = counts = None
    if isinstance(images, vae_data.SourceImages):  # several sources: their repeats or weights
        sources, counts = images.epoch_counts(data.indices)
        for config, n, k in zip(
            images.config.sources, np.bincount(sources, minlength=len(counts)), counts, strict=True
        ):
            logger.info("source %s: %d training images, %d samples per epoch", config.name, n, k)
    sampler = vae_data.CropBatchSampler(
        len(data.indices), run.train_batch_size, run.seed, rank, processes, sources, counts
    )
    accumulation = run.gradient_accumulation_steps
    max_steps = run.max_train_steps or math.ceil(run.num_train_epochs * len(sampler) / accumulation)

    # Evaluation (main process): held-out crops and the starting VAE's metrics, before any weight changes.
    evaluation = None
    if accelerator.is_main_process:
        held = [scan.usable[i] for i in held_pos]
        crops = vae_data.held_out_crops(images, held, run.crop_size, data.max_pixels)
        evaluation = Evaluation(crops, lpips_model, accelerator.device, accelerator.autocast)
    if plan.finished_at(max_steps):
        return finish_only(run, accelerator, vae, evaluation, plan, starting_config)
    if accelerator.is_main_process:
        report_skipped(run.output_dir, scan, len(images))
        evaluation.measure_start(vae.to(accelerator.device))

    training = build_training(run, accelerator, vae, lpips_model, max_steps)

    # Resume: weights, optimizers, lr schedule, EMA, the position in the image order, the validation history.
    global_step, position = 0, DataPosition()
    if plan.resume is not None:
        accelerator.load_state(plan.resume)
        state = checkpointing.load_trainer_state(plan.resume)
        global_step, position = state["step"], DataPosition(state["epoch"], state["batch_offset"])
        if state.get("global_batch_size") != sampler.global_batch_size:
            logger.warning(
                "the global batch changed since the checkpoint: the run will not equal an unbroken one"
            )
        if evaluation is not None:
            evaluation.history = state.get("history", [])
        logger.info("resumed run %s from %s at step %d", plan.run_id, plan.resume, global_step)
    accelerator.step = 0  # checkpoints sit on update boundaries: the next micro-batch starts a cycle
    project = run.wandb_project if "wandb" in run.report_to else "sdxl_vae"
    init_trackers(accelerator, project, run.saved(), run.wandb_run_name)
    logger.info(
        "%d training images, %d held out, %d trainable parameters, %d global batches of %d per epoch, %d steps",
        len(data.indices), len(held_pos), vae_training.count_parameters(training.trainable), len(sampler),
        sampler.global_batch_size, max_steps,
    )  # fmt: skip

    progress = tqdm(
        total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    stream = data.stream(sampler, accelerator.device, position, global_step * accumulation)
    running, metrics = RunningLogs(), {}
    while global_step < max_steps:
        gan_active = training.step.settings.gan_active(global_step)
        for _ in range(accumulation):  # one optimizer update
            position, batch = next(stream)
            running.add(training.step(batch, gan_active))
        training.lr_scheduler.step()
        global_step += 1
        if training.ema is not None:
            training.ema.update(global_step, force=global_step == max_steps)
        progress.update(1)

        if global_step % run.logging_steps == 0 or global_step == max_steps:
            logs = {
                **running.flush(accelerator, sampler.global_batch_size),
                "lr": training.lr_scheduler.get_last_lr()[0],
            }
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
        if global_step % run.checkpointing_steps == 0 or global_step == max_steps:
            save_checkpoint(run, accelerator, global_step, position, plan.run_id, evaluation)
        if run.validation_steps and global_step % run.validation_steps == 0 and global_step < max_steps:
            metrics = run_validation(run, accelerator, training.model, training.ema, evaluation, global_step)

    accelerator.wait_for_everyone()
    metrics = run_validation(run, accelerator, training.model, training.ema, evaluation, global_step)
    save_outputs(
        run,
        accelerator,
        training.model,
        training.ema,
        evaluation,
        metrics,
        global_step,
        plan.run_id,
        starting_config,
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": global_step, "starting": evaluation.starting if evaluation else {}, **metrics}


def finetune_pipeline_vae(
    pipeline_dir: str | Path, argv: list[str], single_file: str | Path | None = None
) -> dict:
    """The --finetune_vae stage of train_sdxl_ztsnr.py: fine-tune the decoder of PIPELINE_DIR/vae in
    PIPELINE_DIR/vae_finetune (checkpoints, logs, metrics), then put it into PIPELINE_DIR/vae, ``single_file``
    and the card. ``argv``: train_vae.py's options (data, lr, batch, lifecycle flags). Requeue-safe."""
    pipeline_dir = Path(pipeline_dir)
    stage_dir = pipeline_dir / VAE_STAGE_SUBFOLDER
    run = parse_vae_options(
        [
            "--pretrained_model_name_or_path",
            str(pipeline_dir),
            "--output_dir",
            str(stage_dir),
            "--no_single_file",
            *argv,
        ]
    )
    result = finetune_vae(run)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        install_finetuned_vae(pipeline_dir, stage_dir, single_file)
    state.wait_for_everyone()
    return result


@dataclass(frozen=True)
class VaeStage:
    """train_sdxl_ztsnr.py --finetune_vae: the decoder fine-tuned on the run's images after the UNet stage,
    with the run's batch, precision, seed, trackers and workers; train_vae.py's defaults for the rest."""

    train_data_dir: str
    train_batch_size: int
    mixed_precision: str
    seed: int
    report_to: str
    dataloader_num_workers: int
    perceptual_weight: float = 0.1
    learning_rate: float | None = None  # None: train_vae.py's
    max_train_steps: int | None = None  # None: one epoch of the images
    enable_compile: bool = False
    overwrite_output_dir: bool = False
    lpips_random_backbone: bool = False

    def check(self) -> None:
        """Fail at start-up, not after hours of the UNet stage, when LPIPS cannot be loaded (offline)."""
        if self.perceptual_weight == 0:
            return
        try:
            vae_training.load_lpips("vgg", random_backbone=self.lpips_random_backbone)
        except vae_training.LpipsWeightsMissing as error:
            message = str(error).replace("--perceptual_weight", "--vae_perceptual_weight")
            raise UserError(f"--finetune_vae: {message}") from None

    def argv(self) -> list[str]:
        """The stage as train_vae.py flags (resuming its own run: a requeue continues it)."""
        argv = ["--train_data_dir", self.train_data_dir, "--train_batch_size", str(self.train_batch_size)]
        argv += [
            "--mixed_precision",
            self.mixed_precision,
            "--seed",
            str(self.seed),
            "--report_to",
            self.report_to,
        ]
        argv += ["--perceptual_weight", str(self.perceptual_weight), "--resume_from_checkpoint", "latest"]
        argv += ["--dataloader_num_workers", str(self.dataloader_num_workers)]
        if self.learning_rate is not None:
            argv += ["--learning_rate", str(self.learning_rate)]
        if self.max_train_steps:
            argv += ["--max_train_steps", str(self.max_train_steps)]
        for flag in ("enable_compile", "overwrite_output_dir"):
            if getattr(self, flag):
                argv.append(f"--{flag}")
        if self.lpips_random_backbone:
            argv.append("--_lpips_random_backbone")
        return argv

    def run(self, pipeline_dir: str | Path, single_file: str | Path | None) -> dict:
        """On every process, after the UNet's outputs are written; a finished stage only installs its decoder."""
        logger.info("--finetune_vae: fine-tuning the VAE decoder on %s", self.train_data_dir)
        return finetune_pipeline_vae(pipeline_dir, self.argv(), single_file)
