"""A whole precompute as a command runs it: the process group, the VAE and text encoders loaded for the device,
`precompute.precompute` on every rank, and the end-of-run summary. precompute_latents.py and the trainer's raw
folder mode (--train_data_dir) both run this.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.data_config import DataConfig
from sdxl_ztsnr.precompute import Hook, load_vae, precompute
from sdxl_ztsnr.source_cache import precompute_sources
from sdxl_ztsnr.source_inputs import open_source
from sdxl_ztsnr.text_encoding import load_text_encoders

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODE_WORKERS = min(8, os.cpu_count() or 1)  # image decoding processes, unless told otherwise


def process_state():
    """accelerate's PartialState for this launch (gloo where several processes have no CUDA), checked."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Several processes without CUDA: accelerate only sets up gloo when asked for the CPU explicitly.
    state = PartialState(cpu=launched > 1 and not torch.cuda.is_available())
    if state.num_processes != launched:
        raise UserError(
            f"launched as {launched} processes but accelerate sees {state.num_processes}; check the launcher"
        )
    return state


def run_precompute(
    inputs,  # a precompute source, or a DataConfig of several
    output_dir: str | os.PathLike,
    model: str,
    vae_model: str | None = None,
    vae_dtype: str = "fp32",
    text_encoder_dtype: str = "auto",
    text_online: bool = False,
    hook: Hook | None = None,
    **settings,
) -> dict:
    """Load the models ``inputs`` are encoded with and run `precompute` on every process; rank 0 merges.

    ``settings`` are `precompute`'s keyword arguments (resolution, buckets, crop, shards, workers, ...).
    Raises cache.NoUsableInputsError when every input was skipped.
    """
    import datasets

    datasets.disable_progress_bars()  # our own tqdm bar counts images; save_to_disk's per-shard bars are noise
    state = process_state()
    if state.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a few fixed bucket shapes: autotuning pays off
        torch.backends.cuda.matmul.allow_tf32 = True
    vae = load_vae(model, DTYPES[vae_dtype], state.device, vae_model)
    tokenizers = text_encoders = None
    if not text_online:
        if text_encoder_dtype == "auto":
            text_encoder_dtype = "fp16" if state.device.type == "cuda" else "fp32"
        tokenizers, text_encoders = load_text_encoders(model, DTYPES[text_encoder_dtype], state.device)
    info = {"model": {"pretrained_model_name_or_path": model, "pretrained_vae_model_name_or_path": vae_model}}

    def run_one(source_inputs, directory, **more) -> dict:
        return precompute(
            source_inputs,
            directory,
            vae,
            tokenizers,
            text_encoders,
            rank=state.process_index,
            world_size=state.num_processes,
            barrier=state.wait_for_everyone if state.num_processes > 1 else None,
            hook=hook,
            info=info,
            **more,
        )

    if isinstance(inputs, DataConfig):  # several sources: one cache each under sources/, merged at the top
        return precompute_sources(
            inputs,
            output_dir,
            run_one,
            lambda s: open_source(s, inputs.path),
            state.process_index,
            **settings,
        )
    return run_one(inputs, output_dir, **settings)


def format_summary(result: dict, output_dir: str) -> str:
    """End-of-run report: rows, skipped by reason, buckets, time and throughput."""
    metadata, run = result.get("metadata"), result.get("run", {})
    if result["status"] == "already complete":
        return f"cache already complete: {metadata['counts']['rows']} rows in {output_dir}; nothing changed"
    lines = []
    if run.get("inputs"):
        seconds = run.get("seconds", 0.0)
        lines.append(
            f"this process: {run['inputs']} inputs -> {run.get('rows', 0)} rows in {seconds:.1f} s "
            f"({run['inputs'] / max(seconds, 1e-9):.2f} img/s); waiting for images {run.get('wait_s', 0):.1f} s, "
            f"encoding {run.get('encode_s', 0):.1f} s, waiting for the GPU {run.get('sync_s', 0):.1f} s, "
            f"for writes {run.get('write_wait_s', 0):.1f} s"
        )
    if run.get("shards_resumed"):
        lines.append(f"resumed: {run['shards_resumed']} shard(s) were already done")
    if metadata is not None:
        counts = metadata["counts"]
        lines.append(f"cache {output_dir}: {counts['rows']} rows from {counts['inputs']} inputs")
        for entry in metadata.get("sources", []):
            kinds = ", ".join(f"{k}: {n}" for k, n in entry["skipped_by_kind"].items())
            lines.append(
                f"  source {entry['name']}: {entry['rows']} rows from {entry['inputs']} inputs, "
                f"{entry['skipped']} skipped" + (f" ({kinds})" if kinds else "")
            )
        lines.append(
            f"skipped: {counts['skipped']}"
            + "".join(f"\n  {k}: {n}" for k, n in counts["skipped_by_kind"].items())
        )
        if counts["skipped"]:
            lines.append(f"  (path and reason of each in {Path(output_dir) / 'skipped.jsonl'})")
        lines.append(
            "buckets (height x width: rows): " + ", ".join(f"{b}: {n}" for b, n in counts["buckets"].items())
        )
        if counts.get("masked"):
            lines.append(f"rows with a loss mask: {counts['masked']} of {counts['rows']}")
        if counts["upscaled"]:
            lines.append(f"upscaled (smaller than their bucket): {counts['upscaled']}")
        if counts["truncated_prompts"]:
            chunks = metadata["settings"]["max_token_chunks"]
            lines.append(f"prompts truncated to {chunks} chunks: {counts['truncated_prompts']}")
        lines.append(
            "latents mean "
            + ", ".join(f"{m:.4f}" for m in metadata["latents_mean"])
            + "; std "
            + ", ".join(f"{s:.4f}" for s in metadata["latents_std"])
        )
    return "\n".join(lines)
