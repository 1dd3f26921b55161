"""What a UNet training run writes, the one save path used at the end and by a requeue that finds them missing:
the diffusers pipeline and single file (or the LoRA files), the EMA beside, training_config.json, the model card,
outputs.json last; and publishing them to the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl_ztsnr import export, lifecycle
from sdxl_ztsnr.base_model import BaseModel
from sdxl_ztsnr.lora import DIFFUSERS_LORA_NAME, EMA_LORA_SUBFOLDER
from sdxl_ztsnr.model_card import model_card
from sdxl_ztsnr.schedule import scheduler_config
from sdxl_ztsnr.text_encoder_training import TrainedTextEncoders
from sdxl_ztsnr.train_data import vae_config_latent_stats
from sdxl_ztsnr.trained_weights import TrainedWeights

LatentStats = tuple[torch.Tensor, torch.Tensor]  # the cache's per-channel latent mean and std, (4,) each


def save_pipeline_and_single_file(
    out: Path,
    name: str,
    base: BaseModel,
    unet: torch.nn.Module,
    ztsnr: bool,
    single_file: bool,
    latent_stats: LatentStats | None = None,
    text_encoders: TrainedTextEncoders | None = None,
) -> None:
    """The fine-tuned UNet as a diffusers pipeline directory and a single file (original SDXL layout), with the
    trained text encoders in place of the base's (--train_text_encoder)."""
    vae = base.load_vae()
    components = text_encoders.pipeline_components() if text_encoders is not None else {}
    pipeline = base.load_pipeline(unet, vae, components=components)
    mean = std = None
    if latent_stats is not None:
        mean, std = vae_config_latent_stats(*latent_stats, vae.config.scaling_factor)
    export.save_pipeline(
        out,
        unet,
        vae,
        (pipeline.text_encoder, pipeline.text_encoder_2),
        (pipeline.tokenizer, pipeline.tokenizer_2),
        scheduler_config(ztsnr=ztsnr),
        latents_mean=mean,
        latents_std=std,
        ztsnr=ztsnr,
        # The normalisation folded into the VAE's 1×1 convolutions (exact): every consumer, including diffusers
        # pipelines that ignore latents_mean/std and the single file's loaders, decodes the UNet's latents right.
        fold_latents=True,
    )
    if single_file:
        export.save_single_file(
            out / f"{name}.safetensors",
            unet.state_dict(),
            vae.state_dict(),
            pipeline.text_encoder.state_dict(),
            pipeline.text_encoder_2.state_dict(),
            v_pred=True,
            ztsnr=ztsnr,
            latents_mean=mean,
            latents_std=std,
        )


def write_run_outputs(
    out: Path,
    weights: TrainedWeights,
    model: torch.nn.Module,
    base: BaseModel,
    config: dict,
    run_id: str,
    step: int,
    ztsnr: bool = True,
    export_ema: bool = False,
    single_file: bool = True,
    latent_stats: LatentStats | None = None,
    metrics: dict | None = None,
    card_name: str | None = None,
    text_encoders: TrainedTextEncoders | None = None,
) -> None:
    """Every output of step ``step`` of run ``run_id`` (main process only); outputs.json last, so a requeue of
    a finished run knows they are complete and leaves them alone. Trained text encoders go into the pipeline and
    the single file, or (LoRA) into both LoRA files."""
    name = out.resolve().name
    weights.save(out, name, base.label, ztsnr, export_ema)
    if weights.lora is not None and text_encoders is not None:
        with weights.exported(export_ema):
            text_encoders.save_lora(out / DIFFUSERS_LORA_NAME, out / f"{name}.safetensors", weights.unet)
        if weights.ema is not None:  # the EMA LoRA files: the UNet's EMA with the encoders' LoRAs as trained
            ema_dir = out / EMA_LORA_SUBFOLDER
            with weights.exported(True):
                text_encoders.save_lora(
                    ema_dir / DIFFUSERS_LORA_NAME, ema_dir / f"{name}_ema.safetensors", weights.unet
                )
    if weights.lora is None:
        with weights.exported(export_ema):
            save_pipeline_and_single_file(
                out, name, base, model, ztsnr, single_file, latent_stats, text_encoders
            )
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    card = model_card(
        card_name or name,
        base.label,
        config,
        validation_images=None,
        metrics=metrics or {},
        normalized_latents=latent_stats is not None,
    )
    (out / "README.md").write_text(card)
    # Readable per the user's umask (safetensors writes 0600): a UI running as another user can load the model.
    export.apply_umask([p for p in out.iterdir() if p.name != "cache"])
    lifecycle.mark_outputs_complete(out, run_id, step)


def publish_run(out: Path, repo_id: str | None, token: str | None, cache_dir: str | None = None) -> None:
    """The model repo gets the outputs, never the cache, checkpoints or the VAE stage's run."""
    from sdxl_ztsnr.hub import DEFAULT_IGNORE_PATTERNS, push_to_hub

    ignore = list(DEFAULT_IGNORE_PATTERNS)
    # A cache given with --precomputed_dir inside OUTPUT_DIR is no part of the model either.
    if cache_dir and Path(cache_dir).resolve().is_relative_to(out.resolve()):
        ignore.append(Path(cache_dir).resolve().relative_to(out.resolve()).as_posix() + "/")
    push_to_hub(out, repo_id or out.resolve().name, token=token, ignore_patterns=ignore)
