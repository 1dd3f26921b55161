"""Precompute: images and captions -> VAE latents, text embeddings, SDXL micro-conditioning and tags in a
`datasets` cache (see cache.py for the layout). Used by precompute_latents.py and by the trainer's raw-folder
mode.

Work is cut into shards of `shard_size` consecutive inputs; rank r of N takes shards r, r+N, ... (a streamed
source has no length: each rank cuts its own part of the stream into shards, see streaming_inputs.py). DataLoader
workers decode, bucket and crop images; the main process groups them by bucket, encodes a bucket's batch
when it holds `vae_batch_pixels` worth of pixels (halving it on out-of-memory), and hands each finished
shard to a writer thread (save as .tmp, then rename). Rank 0 waits for all shards and merges them. A rerun
skips finished shards, so a killed run is finished by running the same command again.

Latents are the VAE posterior mean (deterministic; kohya's cache does the same, sampling would freeze one
noise draw into the cache) times `scaling_factor` (after `shift_factor` where a VAE has one), as the UNet
sees them; the Welford statistics describe these stored fp16 values.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from sdxl_ztsnr import cache
from sdxl_ztsnr.buckets import make_buckets
from sdxl_ztsnr.console import loading_model, make_output_dir
from sdxl_ztsnr.images import (
    DEFAULT_MAX_PIXELS,
)
from sdxl_ztsnr.inputs import DatasetInputs, FolderInputs, _PrepareDataset, prepare_input  # noqa: F401 (API)
from sdxl_ztsnr.latent_stats import WelfordState, welford_update
from sdxl_ztsnr.streaming_inputs import StreamingInputs, stream_items
from sdxl_ztsnr.tags import tag_frequencies
from sdxl_ztsnr.text_encoding import CHUNK_LENGTH, count_chunks, empty_chunk_embeds, encode_prompts

Hook = Callable[[str, int], None]  # (event, shard index): "shard_saved_tmp", "shard_written", "merge", ...


def load_vae(
    model_name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_name_or_path: str | None = None,
) -> torch.nn.Module:
    """The pipeline's VAE (or a separate one), eval mode; refuses fp16 for a VAE whose config forces upcast."""
    from diffusers import AutoencoderKL

    from sdxl_ztsnr.text_encoding import module_fingerprint

    if vae_name_or_path:
        with loading_model(vae_name_or_path, "VAE"):
            vae = AutoencoderKL.from_pretrained(vae_name_or_path, torch_dtype=torch.float32)
    else:
        with loading_model(model_name_or_path, "vae"):
            vae = AutoencoderKL.from_pretrained(
                model_name_or_path, subfolder="vae", torch_dtype=torch.float32
            )
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        raise ValueError(
            "--vae_dtype fp16: this VAE's config sets force_upcast (SDXL's VAE overflows in fp16 and gives NaN "
            "latents); use fp32 (default) or bf16, or a VAE made for fp16 (e.g. madebyollin/sdxl-vae-fp16-fix "
            "via --pretrained_vae_model_name_or_path)"
        )
    vae.requires_grad_(False).eval()
    fingerprint = module_fingerprint(vae)  # of the stored weights, before any cast
    vae = vae.to(device=device, dtype=dtype)
    vae.weights_fingerprint = fingerprint
    return vae


@torch.no_grad()
def vae_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H/8, W/8) fp32 posterior mean, shifted and scaled as the UNet sees it; pixels in [-1, 1]."""
    mean = vae.encode(pixels).latent_dist.mean.float()
    shift = vae.config.get("shift_factor", None)
    if shift is not None:
        mean = mean - shift
    return mean * vae.config.scaling_factor


def encode_with_oom_retry(
    encode: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, int]:
    """encode(batch) in sub-batches of batch_size; on out-of-memory halve the size and retry the failed
    sub-batch. Returns (outputs concatenated, the batch size that worked); raises if 1 does not fit."""
    outputs, start = [], 0
    while start < len(batch):
        chunk = batch[start : start + batch_size]
        out_of_memory = False
        try:
            outputs.append(encode(chunk))
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            out_of_memory = True  # handled outside the except block, so the failed frame's tensors are freed
        if out_of_memory:
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"out of memory: VAE batch size lowered to {batch_size}", flush=True)
            continue
        start += len(chunk)
    return torch.cat(outputs), batch_size


def _fingerprint(strings: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for s in strings:
        digest.update(s.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


class _ShardBuilder:
    """Rows, skipped inputs and statistics of one shard while it is being encoded."""

    def __init__(self, index: int, channels: int):
        self.index, self.rows, self.skipped = index, [], []
        self.welford = WelfordState.empty(channels)
        self.pending: dict[tuple[int, int], list] = defaultdict(list)  # bucket -> [(item, sample)]
        self.inputs = self.upscaled = self.truncated = 0
        self.started = time.time()

    def summary(self) -> dict:
        return {
            "index": self.index,
            "inputs": self.inputs,
            "rows": len(self.rows),
            "skipped": self.skipped,
            # per input image, not per row: a flipped copy does not count its tags twice
            "tag_counts": tag_frequencies({r["_order"][0]: r["tags"] for r in self.rows}.values()),
            "welford": self.welford.to_dict(),
            "buckets": dict(Counter(f"{r['bucket'][0]}x{r['bucket'][1]}" for r in self.rows)),
            "upscaled": self.upscaled,
            "truncated_prompts": self.truncated,
            "masked": sum(r["mask"] is not None for r in self.rows),
            "seconds": time.time() - self.started,
        }


class _Encoder:
    """Main-process side: bucket batches through the VAE and text encoders, into shard rows.

    On CUDA a batch's results are copied back asynchronously and turned into rows while the GPU encodes
    the next batch, so the per-row CPU work (checks, Welford, arrow rows) never leaves the GPU idle.
    """

    def __init__(self, vae, tokenizers, text_encoders, max_token_chunks: int, vae_batch_pixels: int):
        self.vae, self.tokenizers, self.text_encoders = vae, tokenizers, text_encoders
        self.max_chunks, self.batch_pixels = max_token_chunks, vae_batch_pixels
        self.device = next(vae.parameters()).device
        self.dtype = next(vae.parameters()).dtype
        self.batch_cap: dict[tuple[int, int], int] = {}  # per bucket, lowered after out-of-memory
        self.seconds = Counter()  # "encode" (launching; all of it on CPU), "sync" (waiting for the GPU)
        self.batches: list[tuple[tuple[int, int], int]] = []  # (bucket, batch size) of each VAE call
        self.in_flight: tuple | None = None

    def batch_size(self, bucket: tuple[int, int]) -> int:
        return self.batch_cap.get(bucket, max(1, self.batch_pixels // (bucket[0] * bucket[1])))

    def encode(self, shard: _ShardBuilder, bucket: tuple[int, int]) -> None:
        """Launch the pending batch of `bucket`, then finish the previously launched one."""
        entries, shard.pending[bucket] = shard.pending[bucket], []
        if not entries:
            return
        start = time.perf_counter()
        # Pinned (H, W, 3) uint8 from the workers: per-image async uploads, stacked on the device.
        pixels = torch.stack([sample["pixels"].to(self.device, non_blocking=True) for _, sample in entries])
        x = (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.dtype)  # (B, 3, H, W) in [-1, 1]
        latents, working = encode_with_oom_retry(lambda b: vae_latents(self.vae, b), x, len(entries))
        if working < len(entries):
            self.batch_cap[bucket] = working
        self.batches.append((bucket, len(entries)))
        outputs = [latents.to(torch.float16)]  # (B, C, H/8, W/8), fp16 on disk
        chunks = None
        if self.text_encoders is not None:
            # A caption of several lines (data config) stores all of them; the cached embedding is of the first.
            prompts = [item["prompt"].split("\n", 1)[0] for item, _ in entries]
            needed = count_chunks(prompts, self.tokenizers, max_chunks=1 << 30)
            chunks = [min(n, self.max_chunks) for n in needed]
            shard.truncated += sum(
                n > self.max_chunks and not s["flipped"] for n, (_, s) in zip(needed, entries, strict=True)
            )
            embeds, pooled = encode_prompts(
                prompts, self.tokenizers, self.text_encoders, self.max_chunks, max(chunks)
            )
            outputs += [embeds.to(torch.float16), pooled.to(torch.float16)]
        outputs = [t.to("cpu", non_blocking=True) for t in outputs]  # pinned host memory on CUDA
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.seconds["encode"] += time.perf_counter() - start
        previous, self.in_flight = self.in_flight, (shard, entries, outputs, chunks, event)
        if previous is not None:
            self._complete(*previous)

    def drain(self) -> None:
        """Finish the batch still in flight (at the end of a shard)."""
        if self.in_flight is not None:
            previous, self.in_flight = self.in_flight, None
            self._complete(*previous)

    def _complete(self, shard: _ShardBuilder, entries: list, outputs: list, chunks, event) -> None:
        if event is not None:
            start = time.perf_counter()
            event.synchronize()
            self.seconds["sync"] += time.perf_counter() - start
        latents = outputs[0]
        finite = torch.isfinite(latents).flatten(1).all(dim=1)
        if finite.any():
            shard.welford = welford_update(shard.welford, latents[finite].float())
        for i, (item, sample) in enumerate(entries):
            if not finite[i]:
                reason = "VAE gave non-finite latents (fp16/bf16 overflow?); use --vae_dtype fp32"
                shard.skipped.append(
                    {"path": item["source"], "reason": reason, "kind": cache.skip_kind(reason)}
                )
                continue
            row = {
                "latents": latents[i].numpy(),
                "original_size": list(sample["original_size"]),
                "crop_top_left": list(sample["crop_top_left"]),
                "target_size": list(sample["bucket"]),
                "bucket": list(sample["bucket"]),
                "tags": item["tags"],
                "prompt": item["prompt"],
                "source": item["source"],
                "flipped": sample["flipped"],
                "mask": None,
                "_order": (item["index"], sample["flipped"]),
            }
            if sample.get("mask") is not None:
                mask = sample["mask"].numpy()  # (h, w) uint8 loss weights, made by the workers
                if mask.shape != latents.shape[2:]:
                    raise RuntimeError(
                        f"mask {mask.shape} is not the latents' size {tuple(latents.shape[2:])}"
                    )
                row["mask"] = mask
            if chunks is not None:
                row["prompt_embeds"] = outputs[1][i, : chunks[i] * CHUNK_LENGTH].numpy()
                row["pooled_prompt_embeds"] = outputs[2][i].numpy()
            shard.rows.append(row)


def _indexed_items(inputs, items: list[tuple[int, int]], options: dict, num_workers: int, pin: bool):
    """Prepared inputs of the (shard, input index) items, in order, decoded by DataLoader workers."""
    return torch.utils.data.DataLoader(
        _PrepareDataset(items, inputs, options),
        batch_size=None,  # one input per item: the main process batches by bucket
        num_workers=num_workers,
        pin_memory=pin,
        prefetch_factor=4 if num_workers else None,
    )


def _run_shards(
    prepared,
    total: int | None,
    output_dir: Path,
    encoder: _Encoder,
    features,
    hook: Hook | None,
    progress: bool,
    rank: int,
    shard_extras: dict[int, dict],
) -> Counter:
    """Encode prepared items (in shard order), writing each shard as it completes; returns timings/counts.
    shard_extras[shard] (streams) adds skipped entries and fields to a shard's summary."""
    stats = Counter()
    if total == 0:
        return stats
    channels = encoder.vae.config.latent_channels
    writer = ThreadPoolExecutor(max_workers=1)  # writing shard k overlaps encoding shard k+1
    pending: tuple[int, Future] | None = None

    def finish(shard: _ShardBuilder) -> None:
        nonlocal pending
        for bucket in list(shard.pending):  # the remainders, in partial batches
            encoder.encode(shard, bucket)
        encoder.drain()
        shard.rows.sort(key=lambda row: row["_order"])
        extra = shard_extras.pop(shard.index, {})
        shard.skipped += extra.pop("skipped", [])
        summary = {**shard.summary(), **extra}
        stats["rows"] += len(shard.rows)
        stats["skipped"] += len(shard.skipped)
        wait_written()
        before_rename = (lambda i=shard.index: hook("shard_saved_tmp", i)) if hook else None
        future = writer.submit(
            cache.write_shard, output_dir, shard.index, shard.rows, features, summary, before_rename
        )
        pending = (shard.index, future)

    def wait_written() -> None:
        nonlocal pending
        if pending is not None:
            start = time.perf_counter()
            pending[1].result()  # re-raises a write error here
            stats["write_wait_s"] += time.perf_counter() - start
            stats["shards"] += 1
            if hook:
                hook("shard_written", pending[0])
            pending = None

    shard: _ShardBuilder | None = None
    bar = tqdm(total=total, desc=f"precompute (rank {rank})", unit="img", disable=not progress)
    try:
        iterator = iter(prepared)
        while True:
            start = time.perf_counter()
            item = next(iterator, None)
            stats["wait_s"] += time.perf_counter() - start  # time the encoder waited for decoded images
            if shard is not None and (item is None or item["shard"] != shard.index):
                finish(shard)
                shard = None
            if item is None:
                break
            if shard is None:
                shard = _ShardBuilder(item["shard"], channels)
            if item.get("marker"):  # a stream's shard with no examples
                continue
            shard.inputs += 1
            stats["inputs"] += 1
            if item["skipped"] is not None:
                path, reason = item["skipped"]
                shard.skipped.append({"path": path, "reason": reason, "kind": cache.skip_kind(reason)})
            else:
                shard.upscaled += bool(item["upscaled"])
                for sample in item["samples"]:
                    bucket = tuple(sample["bucket"])
                    shard.pending[bucket].append((item, sample))
                    if len(shard.pending[bucket]) >= encoder.batch_size(bucket):
                        encoder.encode(shard, bucket)
            bar.update(1)
        wait_written()
    finally:
        bar.close()
        writer.shutdown(wait=True)
    stats.update({f"{k}_s": v for k, v in encoder.seconds.items()})
    stats["batches"] = encoder.batches  # (bucket, size) of every VAE call, for benchmarks
    return stats


def precompute(
    inputs: FolderInputs | DatasetInputs | StreamingInputs,
    output_dir: str | os.PathLike,
    vae: torch.nn.Module,
    tokenizers: Sequence | None = None,
    text_encoders: Sequence[torch.nn.Module] | None = None,
    *,
    resolution: int = 1024,
    bucket_step: int = 64,
    min_bucket_side: int | None = None,
    max_bucket_side: int | None = None,
    crop: Literal["center", "random"] = "center",
    flip: bool = False,
    seed: int = 0,
    max_token_chunks: int = 3,
    min_image_side: int = 0,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    allow_empty_captions: bool = False,
    shard_size: int = 512,
    vae_batch_pixels: int = 8 * 1024 * 1024,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    overwrite: bool = False,
    barrier: Callable[[], None] | None = None,
    hook: Hook | None = None,
    progress: bool = True,
    info: dict | None = None,
    merge_timeout_s: float | None = None,
) -> dict:
    """Build (or finish) the cache in output_dir; text_encoders=None stores no embeddings (--text_online).

    Every rank calls this with the same arguments; `barrier` (e.g. accelerator.wait_for_everyone) orders
    rank 0's --overwrite cleanup before the others start. Returns {"status": "complete" | "already complete"
    | "rank done", "metadata": ... (rank 0), "run": this process's counts and timings}.
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if shard_size < 1 or max_token_chunks < 1:
        raise ValueError(f"shard_size ({shard_size}) and max_token_chunks ({max_token_chunks}) must be >= 1")
    started = time.time()
    output_dir = make_output_dir(output_dir)
    buckets = make_buckets(resolution, bucket_step, min_bucket_side, max_bucket_side)
    streamed = inputs.kind == "stream"  # no length up front: each rank reads its part of the stream
    sources = [] if streamed else [inputs.source(i) for i in range(len(inputs))]
    input_settings = (
        inputs.settings(world_size)
        if streamed
        else {
            "input_kind": inputs.kind,
            **({k: v for k, v in inputs.describe().items() if k.endswith("_column")}),
            "num_inputs": len(sources),
            "inputs_fingerprint": _fingerprint(sources),
        }
    )
    # {} for inputs without masks, so a cache made before masks existed keeps matching its settings.
    mask_settings = getattr(inputs, "mask_settings", dict)()
    text_dtype = None if text_encoders is None else str(next(text_encoders[0].parameters()).dtype)
    settings = {
        "format_version": cache.FORMAT_VERSION,
        **cache.model_identity(vae, text_encoders),
        "vae_dtype": str(next(vae.parameters()).dtype).removeprefix("torch."),
        "text_encoder_dtype": text_dtype and text_dtype.removeprefix("torch."),
        "latent_channels": vae.config.latent_channels,
        "latents": "posterior mean, (z - shift_factor) * scaling_factor",
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.get("shift_factor", None),
        "text_online": text_encoders is None,
        "max_token_chunks": max_token_chunks,
        "resolution": resolution,
        "bucket_step": bucket_step,
        "min_bucket_side": min_bucket_side,
        "max_bucket_side": max_bucket_side,
        "buckets": [list(b) for b in buckets],
        "crop": crop,
        "flip": flip,
        "seed": seed,
        "min_image_side": min_image_side,
        "max_image_pixels": max_image_pixels,
        "allow_empty_captions": allow_empty_captions,
        **input_settings,
        **mask_settings,
        "shard_size": shard_size,
    }
    info = {"input": inputs.describe(), **(info or {})}
    if rank == 0:
        if overwrite:
            cache.remove_cache(output_dir)
        done = cache.check_or_start(output_dir, settings)
    if barrier is not None:
        barrier()
    if rank != 0:
        done = cache.check_or_start(output_dir, settings)
    if done is not None:
        return {"status": "already complete", "metadata": done, "run": {}}

    options = dict(
        buckets=buckets,
        crop=crop,
        flip=flip,
        seed=seed,
        min_image_side=min_image_side,
        max_image_pixels=max_image_pixels,
        allow_empty_captions=allow_empty_captions,
        mask_scale=2 ** (len(vae.config.block_out_channels) - 1),  # the VAE's downsampling (8 for SDXL)
    )
    encoder = _Encoder(vae, tokenizers, text_encoders, max_token_chunks, vae_batch_pixels)
    embed_dim = pooled_dim = None
    if text_encoders is not None:
        embed_dim = sum(e.config.hidden_size for e in text_encoders)
        pooled_dim = text_encoders[1].config.projection_dim
    features = cache.cache_features(vae.config.latent_channels, embed_dim, pooled_dim, bool(mask_settings))
    shard_extras: dict[int, dict] = {}
    if streamed:
        num_shards = total = None  # known once every rank has marked its last shard
        prepared, resumed = stream_items(
            inputs, output_dir, rank, world_size, shard_size, options, num_workers, shard_extras
        )
    else:
        num_shards = -(-len(sources) // shard_size)
        finished = cache.completed_shards(output_dir)
        todo = [s for s in range(rank, num_shards, world_size) if s not in finished]
        cache.remove_partial_shards(output_dir, todo)
        items = [(s, i) for s in todo for i in range(s * shard_size, min((s + 1) * shard_size, len(sources)))]
        total, resumed = len(items), sum(1 for s in range(rank, num_shards, world_size) if s in finished)
        prepared = _indexed_items(inputs, items, options, num_workers, encoder.device.type == "cuda")
    run = _run_shards(prepared, total, output_dir, encoder, features, hook, progress, rank, shard_extras)
    run.update(shards_resumed=resumed)
    result = {"status": "rank done", "metadata": None, "run": run}
    if rank == 0:
        pad_chunk = None if text_encoders is None else empty_chunk_embeds(tokenizers, text_encoders)
        result["metadata"] = cache.finalize_cache(
            output_dir,
            settings,
            num_shards,
            pad_chunk,
            info,
            hook,
            merge_timeout_s,
            world_size if streamed else None,
        )
        result["status"] = "complete"
    run["seconds"] = time.time() - started
    return result
