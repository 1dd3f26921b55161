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
import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl_ztsnr import checkpointing, lifecycle, vae_data, vae_metrics, vae_training
from sdxl_ztsnr.console import loading_model, make_output_dir
from sdxl_ztsnr.launch import compile_or_eager, init_trackers, make_accelerator
from sdxl_ztsnr.train_data import DataPosition
from sdxl_ztsnr.vae_outputs import install_finetuned_vae, save_vae, vae_model_card

logger = logging.getLogger("train_vae")

# Where the --finetune_vae stage of train_sdxl_ztsnr.py trains, inside the pipeline's output directory.
VAE_STAGE_SUBFOLDER = "vae_finetune"
RAW_WEIGHTS_SUBFOLDER = "raw_weights"  # with --use_ema: the last raw weights beside the published EMA ones


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path", "--model_path", default=None, help="SDXL pipeline; VAE from vae/"
    )
    model.add_argument(
        "--pretrained_vae_model_name_or_path", default=None, help="an AutoencoderKL directory or repo"
    )
    model.add_argument("--revision", default=None)
    model.add_argument("--variant", default=None)

    data = parser.add_argument_group("data (the same image loading and skipped.jsonl as precompute)")
    data.add_argument("--train_data_dir", "--data_dir", default=None, help="folder of images (recursive)")
    data.add_argument(
        "--dataset_name", default=None, help="HF dataset: Hub name, load_dataset path or save_to_disk dir"
    )
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--image_column", default="image")
    data.add_argument("--max_image_pixels", type=int, default=None, help="decompression-bomb limit (w·h)")
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

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", "--batch_size", type=int, default=4, help="per device")
    optim.add_argument("--num_train_epochs", "--num_epochs", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", "--vae_learning_rate", type=float, default=1e-5)
    optim.add_argument("--lr_scheduler", default="constant", help="diffusers schedule: constant, cosine, ...")
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--use_8bit_adam", action="store_true")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="0 or less: no clipping")
    optim.add_argument("--use_ema", action="store_true", help="publish an EMA of the trained weights")
    optim.add_argument("--ema_decay", type=float, default=0.9999)
    optim.add_argument("--ema_update_every", type=int, default=1)
    optim.add_argument("--ema_device", choices=["accelerator", "cpu"], default="accelerator")

    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None)
    speed.add_argument("--enable_amp", action="store_true", help="alias of --mixed_precision bf16")
    speed.add_argument("--gradient_checkpointing", action="store_true")
    speed.add_argument("--allow_tf32", action="store_true")
    speed.add_argument("--enable_compile", action="store_true", help="torch.compile (eager where it cannot)")
    speed.add_argument("--compile_mode", default="default")

    logs = parser.add_argument_group("checkpoints, logging and validation")
    logs.add_argument("--output_dir", default="sdxl-vae-finetune")
    logs.add_argument("--seed", type=int, default=0)
    logs.add_argument("--checkpointing_steps", type=int, default=500)
    logs.add_argument("--checkpoints_total_limit", type=int, default=None)
    logs.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint directory or "latest"')
    logs.add_argument("--overwrite_output_dir", action="store_true")
    logs.add_argument("--logging_steps", type=int, default=10)
    logs.add_argument("--logging_dir", default="logs")
    logs.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    logs.add_argument("--use_wandb", action="store_true", help="alias of --report_to wandb")
    logs.add_argument("--wandb_project", default="sdxl-vae")
    logs.add_argument("--wandb_run_name", default=None)
    logs.add_argument(
        "--validation_steps", type=int, default=500, help="held-out metrics + grid (0: at the end)"
    )
    logs.add_argument("--no_single_file", action="store_true")
    logs.add_argument("--push_to_hub", action="store_true")
    logs.add_argument("--hub_model_id", default=None)
    logs.add_argument("--hub_token", default=None)
    parser.add_argument(
        "--_lpips_random_backbone", action="store_true", help=argparse.SUPPRESS
    )  # tests, offline
    args = parser.parse_args(argv)

    if (args.pretrained_model_name_or_path is None) and (args.pretrained_vae_model_name_or_path is None):
        parser.error("give --pretrained_model_name_or_path (its vae/) or --pretrained_vae_model_name_or_path")
    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --train_data_dir (--data_dir) or --dataset_name")
    if args.enable_amp and args.mixed_precision is None:
        args.mixed_precision = "bf16"
    args.mixed_precision = args.mixed_precision or "no"
    if args.mixed_precision == "fp16":
        parser.error("--mixed_precision fp16: SDXL's VAE overflows in fp16; use bf16 or no")
    if args.use_wandb:
        args.report_to = "wandb"
    if args.crop_size < 32:
        parser.error("--crop_size must be at least 32 px")
    if args.perceptual_weight < 0 or args.kl_weight < 0 or args.gan_weight < 0:
        parser.error("--perceptual_weight, --kl_weight and --gan_weight must be >= 0")
    return args


def load_images(args, accelerator) -> tuple[vae_data.ImageSource, vae_data.ImageScan]:
    """The image source, decoded once across all ranks; bad images listed in OUTPUT_DIR/skipped.jsonl."""
    from sdxl_ztsnr.images import DEFAULT_MAX_PIXELS

    if args.train_data_dir:
        images = vae_data.FolderImages(args.train_data_dir)
    else:
        images = vae_data.DatasetImages(args.dataset_name, args.image_column, args.dataset_split)
    scan = vae_data.scan_images_on_all_ranks(
        accelerator, images, args.dataloader_num_workers, args.max_image_pixels or DEFAULT_MAX_PIXELS
    )
    if not scan.usable:
        raise SystemExit(
            f"error: every one of the {len(images)} images was skipped; see {args.output_dir}/skipped.jsonl"
        )
    return images, scan


def report_skipped(output_dir: str, scan: vae_data.ImageScan, total: int) -> None:
    """OUTPUT_DIR/skipped.jsonl (empty when nothing was skipped) and one log line."""
    path = vae_data.write_skipped(output_dir, scan.skipped)
    if scan.skipped:
        logger.warning(
            "%d of %d images skipped; the reason for each is in %s", len(scan.skipped), total, path
        )


def load_starting_vae(args):
    """The VAE to fine-tune, fp32, and its config (what the outputs keep)."""
    from diffusers import AutoencoderKL

    if args.pretrained_vae_model_name_or_path:
        with loading_model(args.pretrained_vae_model_name_or_path, "vae"):
            vae = AutoencoderKL.from_pretrained(
                args.pretrained_vae_model_name_or_path, torch_dtype=torch.float32
            )
    else:
        with loading_model(args.pretrained_model_name_or_path, "vae"):
            vae = AutoencoderKL.from_pretrained(
                args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                variant=args.variant, torch_dtype=torch.float32,
            )  # fmt: skip
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.crop_size % factor:
        raise SystemExit(
            f"error: --crop_size {args.crop_size} must be a multiple of the VAE's downsampling {factor}"
        )
    return vae, dict(vae.config)


def load_lpips(args) -> torch.nn.Module | None:
    """The LPIPS network for the loss and the metric; stops here (before any data work) when it cannot be had."""
    try:
        return vae_training.load_lpips(args.lpips_net, random_backbone=args._lpips_random_backbone)
    except vae_training.LpipsWeightsMissing as error:
        if args.perceptual_weight > 0:
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
    args, accelerator, model, ema, evaluation: Evaluation | None, step: int
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
    grid.save(Path(args.output_dir) / f"validation-{step:07d}.png")
    log_images(accelerator.trackers, grid, ["original | starting | fine-tuned"], step)
    accelerator.log({f"val_{k}": v for k, v in metrics.items()}, step=step)
    logger.info("step %d, held-out: %s (starting: %s)", step, metrics, evaluation.starting)
    return metrics


def save_outputs(
    args, accelerator, model, ema, evaluation, final: dict, step: int, run_id: str, starting_config
) -> None:
    """The one save path: AutoencoderKL dir, single file, metrics table, card, outputs.json last, Hub upload."""
    if not accelerator.is_main_process:
        return
    out = Path(args.output_dir)
    vae = accelerator.unwrap_model(model)
    vae = getattr(vae, "_orig_mod", vae).vae
    single_file = None if args.no_single_file else f"{out.resolve().name}.safetensors"
    if ema is not None:
        save_vae(vae, out / RAW_WEIGHTS_SUBFOLDER, starting_config)
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():
        save_vae(vae, out, starting_config, single_file)
    _, table = vae_metrics.write_metrics(
        out, evaluation.starting, final, step, evaluation.history, len(evaluation.crops), args.crop_size
    )
    config = {k: v for k, v in vars(args).items() if k != "hub_token" and not k.startswith("_")}
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    base = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
    card = vae_model_card(
        args.hub_model_id or out.resolve().name, base, config, table.read_text(), single_file
    )
    (out / "README.md").write_text(card)
    lifecycle.mark_outputs_complete(out, run_id, step)
    if args.push_to_hub:
        from sdxl_ztsnr.hub import DEFAULT_IGNORE_PATTERNS, push_to_hub

        # skipped.jsonl names files on this machine; validation grids stay local too.
        ignore = [*DEFAULT_IGNORE_PATTERNS, "skipped.jsonl", "validation-*.png"]
        push_to_hub(
            out, args.hub_model_id or out.resolve().name, token=args.hub_token, ignore_patterns=ignore
        )


def save_checkpoint(args, accelerator, step: int, position: DataPosition, run_id: str, evaluation) -> None:
    """accelerate state (+ EMA through its hook) and trainer_state.json; crops and noise are keyed by the step."""
    history = evaluation.history if evaluation is not None else []
    checkpointing.save_checkpoint_atomic(
        accelerator,
        args.output_dir,
        step,
        {
            "run_id": run_id,
            "global_batch_size": args.train_batch_size * accelerator.num_processes,
            "history": history,
        },
        epoch=position.epoch,
        batch_offset=position.batch,
        total_limit=args.checkpoints_total_limit,
    )


def make_ema(args, accelerator, trainable):
    if not args.use_ema:
        return None
    from sdxl_ztsnr.ema import EmaWeights

    ema = EmaWeights(trainable, args.ema_decay, args.ema_update_every, args.ema_device)
    accelerator.register_save_state_pre_hook(ema.save_state_hook(accelerator.is_main_process))
    accelerator.register_load_state_pre_hook(ema.load_state_hook())
    return ema


def finish_only(args, accelerator, vae, evaluation, plan: lifecycle.RunPlan, starting_config) -> dict:
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
        model = vae_training.Reconstructor(vae, args.train_encoder, args.latents == "sample")
        ema = make_ema(args, accelerator, vae_training.select_trainable(vae, args.train_encoder))
        model = accelerator.prepare(model)
        accelerator.load_state(plan.resume)
        final = {}
        if evaluation is not None:
            evaluation.history = checkpointing.load_trainer_state(plan.resume).get("history", [])
            final = run_validation(args, accelerator, model, ema, evaluation, plan.resume_step)
        save_outputs(
            args, accelerator, model, ema, evaluation, final, plan.resume_step, plan.run_id, starting_config
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


def build_training(args, accelerator, vae, lpips_model, max_steps: int) -> Training:
    """The decoder side only unless --train_encoder; AdamW, lr schedule, EMA; a discriminator for the GAN term."""
    from diffusers.optimization import get_scheduler

    from sdxl_ztsnr.optimizers import build_optimizer

    trainable = vae_training.select_trainable(vae, args.train_encoder)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    model = vae_training.Reconstructor(vae, args.train_encoder, args.latents == "sample")
    name = "adamw8bit" if args.use_8bit_adam else "adamw"
    adam = (
        (args.adam_beta1, args.adam_beta2),
        args.adam_weight_decay,
        args.adam_epsilon,
        accelerator.device.type,
    )
    optimizer = build_optimizer(trainable, name, args.learning_rate, *adam)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_steps
    )
    ema = make_ema(args, accelerator, trainable)
    # The VAE first: checkpoints then hold it as model 0 whether or not a discriminator follows (finish_only).
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    disc = disc_optimizer = None
    if args.gan_start_step is not None:
        disc = vae_training.PatchDiscriminator(3, args.disc_channels, args.disc_layers)
        disc_optimizer = build_optimizer(
            disc.parameters(), name, args.disc_learning_rate or args.learning_rate, *adam
        )
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    if args.enable_compile:
        model = compile_or_eager(model, accelerator.device, args.compile_mode)
    settings = vae_training.VaeLossSettings(
        args.loss,
        args.perceptual_weight,
        args.kl_weight if args.train_encoder else 0.0,
        args.gan_weight,
        args.gan_start_step,
    )
    clip_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
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


def main(args: argparse.Namespace) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = make_accelerator(
        args.output_dir,
        args.logging_dir,
        args.mixed_precision,
        args.gradient_accumulation_steps,
        args.report_to,
    )
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    make_output_dir(args.output_dir)
    # Lifecycle, then the LPIPS backbone: both can stop the run before minutes of image decoding.
    plan = lifecycle.plan_run_on_all_ranks(
        accelerator, args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir
    )
    lpips_model = load_lpips(args)
    if lpips_model is not None:
        lpips_model.to(accelerator.device)
    if args.train_encoder:
        logger.warning(
            "!!! --train_encoder: the ENCODER changes, so latents change: every latent cache made with the "
            "starting VAE and every UNet trained on it no longer match this VAE; recompute and retrain them. !!!"
        )

    # Data: every image decoded once (bad ones skipped), whole images held out, random crops of the rest.
    images, scan = load_images(args, accelerator)
    train_pos, held_pos = vae_data.split_held_out(len(scan.usable), args.validation_images, args.seed)
    vae, starting_config = load_starting_vae(args)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    data = vae_data.CropData(
        images,
        [scan.usable[i] for i in train_pos],
        [scan.sizes[i] for i in train_pos],
        args.crop_size,
        (vae.config.latent_channels, args.crop_size // factor, args.crop_size // factor),
        args.dataloader_num_workers,
        args.max_image_pixels or vae_data.DEFAULT_MAX_PIXELS,
    )
    rank, processes = accelerator.process_index, accelerator.num_processes
    sampler = vae_data.CropBatchSampler(len(data.indices), args.train_batch_size, args.seed, rank, processes)
    accumulation = args.gradient_accumulation_steps
    max_steps = args.max_train_steps or math.ceil(args.num_train_epochs * len(sampler) / accumulation)

    # Evaluation (main process): held-out crops and the starting VAE's metrics, before any weight changes.
    evaluation = None
    if accelerator.is_main_process:
        held = [scan.usable[i] for i in held_pos]
        crops = vae_data.held_out_crops(images, held, args.crop_size, data.max_pixels)
        evaluation = Evaluation(crops, lpips_model, accelerator.device, accelerator.autocast)
    if plan.finished_at(max_steps):
        return finish_only(args, accelerator, vae, evaluation, plan, starting_config)
    if accelerator.is_main_process:
        report_skipped(args.output_dir, scan, len(images))
        evaluation.measure_start(vae.to(accelerator.device))

    training = build_training(args, accelerator, vae, lpips_model, max_steps)

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
    project = args.wandb_project if "wandb" in args.report_to else "sdxl_vae"
    init_trackers(accelerator, project, vars(args), args.wandb_run_name)
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

        if global_step % args.logging_steps == 0 or global_step == max_steps:
            logs = {
                **running.flush(accelerator, sampler.global_batch_size),
                "lr": training.lr_scheduler.get_last_lr()[0],
            }
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
            save_checkpoint(args, accelerator, global_step, position, plan.run_id, evaluation)
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < max_steps:
            metrics = run_validation(args, accelerator, training.model, training.ema, evaluation, global_step)

    accelerator.wait_for_everyone()
    metrics = run_validation(args, accelerator, training.model, training.ema, evaluation, global_step)
    save_outputs(
        args,
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
    and the card. ``argv``: this script's options (data, lr, batch, lifecycle flags). Requeue-safe."""
    pipeline_dir = Path(pipeline_dir)
    stage_dir = pipeline_dir / VAE_STAGE_SUBFOLDER
    args = parse_args(
        [
            "--pretrained_model_name_or_path",
            str(pipeline_dir),
            "--output_dir",
            str(stage_dir),
            "--no_single_file",
            *argv,
        ]
    )
    result = main(args)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        install_finetuned_vae(pipeline_dir, stage_dir, single_file)
    state.wait_for_everyone()
    return result


if __name__ == "__main__":
    from sdxl_ztsnr.console import run_script

    run_script(main, parse_args)
