"""Tiles per second of the tiled img2img redraw with tiles batched (--tile_batch) against one at a time.

    python benchmarks/upscale.py --threads 1          # CPU: tiny model, 512² canvas, 128 px tiles
    python benchmarks/upscale.py --sdxl_architecture  # GPU: random-init SDXL UNet/VAE/CLIP, 1024 px tiles

Times `sdxl_ztsnr.upscaling.redraw_pass` — VAE encode, the img2img steps with CFG, VAE decode and the masked
blend of every tile of one pass — on the same canvas and tiles for each batch size, after a warm-up pass per
batch size; the batch sizes take turns, round after round, so load from other processes hits all alike. Also
checks that every batch size gives the canvas of batch 1 (max abs difference, in 8-bit steps).
SDXL architecture: the UNet of SDXL base 1.0 (2.57B parameters) and SDXL's VAE and CLIP shapes, random
weights (no download; speed does not depend on the weights), bf16 UNet and text encoders, fp32 VAE (SDXL's
overflows in fp16), a 3072×2048 canvas: six 1024 px tiles, windows of 1088 px. Goal: batched ≥ 1.5× one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_ztsnr.sampling import load_pipeline, make_scheduler, pipeline_conditioning, training_alpha_bar  # noqa: E402
from sdxl_ztsnr.schedule import scheduler_config  # noqa: E402
from sdxl_ztsnr.tiling import tile_passes  # noqa: E402
from sdxl_ztsnr.tiny import build_tiny_sdxl  # noqa: E402
from sdxl_ztsnr.upscaling import job_seed, pixel_multiple, redraw_pass  # noqa: E402


def sdxl_pipeline(tiny_dir: Path, device: torch.device, dtype: torch.dtype):
    """A StableDiffusionXLPipeline of random-init SDXL-size models (the other benchmarks' configs)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from precompute import sdxl_models  # benchmarks/precompute.py: SDXL VAE and CLIP shapes
    from train_step import SDXL_UNET  # benchmarks/train_step.py: SDXL base 1.0's UNet config

    vae, tokenizers, encoders = sdxl_models(tiny_dir, device, torch.float32, dtype)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype).eval().requires_grad_(False)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config()),
    )


def canvas_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(3, H, W) in [0, 1]: smooth colour structure, as a pre-upscaled image has."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 3, height // 64 + 1, width // 64 + 1)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdxl_architecture", action="store_true", default=torch.cuda.is_available())
    parser.add_argument("--tiny", dest="sdxl_architecture", action="store_false", help="the tiny model")
    parser.add_argument("--batches", default="1,2,4,8", help="tile batch sizes to compare")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per batch size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--denoise", type=float, default=0.35)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="append one line per batch size")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    batches = [int(b) for b in options.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_sdxl(Path(tmp) / "tiny")
        if options.sdxl_architecture:
            pipeline = sdxl_pipeline(tiny, device, torch.bfloat16)
            canvas_hw, tile, padding, vae_tile = (2048, 3072), 1024, 32, 1024
        else:
            pipeline = load_pipeline(tiny, device=device)
            canvas_hw, tile, padding, vae_tile = (512, 512), 128, 32, None
    pipeline.set_progress_bar_config(disable=True)
    (jobs,) = tile_passes(canvas_hw, tile, padding, 8, "linear", pixel_multiple(pipeline))
    canvas = canvas_image(*canvas_hw)
    conditioning = pipeline_conditioning(pipeline, ["1girl, solo, outdoors, detailed"], [""])
    config = dict(pipeline.scheduler.config)
    alpha_bar = training_alpha_bar(config)
    seeds = [job_seed(0, 0, k) for k in range(len(jobs))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_pass(batch: int) -> tuple[torch.Tensor, float, float]:
        sync()
        wall, cpu = time.perf_counter(), time.thread_time()
        out = redraw_pass(
            pipeline, canvas, jobs, conditioning, lambda: make_scheduler("euler", config, options.steps, alpha_bar),
            options.denoise, 5.0, 0.7, seeds, canvas_hw, batch, vae_tile,
        )  # fmt: skip
        sync()
        return out, time.perf_counter() - wall, time.thread_time() - cpu

    window = jobs[0].window[2:]
    print(
        f"{'SDXL architecture' if options.sdxl_architecture else 'tiny model'} on {device}, torch threads "
        f"{torch.get_num_threads()}: {len(jobs)} tiles of {tile} px (windows {window[1]}x{window[0]}), "
        f"{options.steps} steps x denoise {options.denoise}, CFG on"
    )
    reference = {}
    for batch in batches:  # warm-up, and the canvases compared below
        reference[batch] = one_pass(batch)[0]
    times: dict[int, list[tuple[float, float]]] = {b: [] for b in batches}
    for _ in range(options.rounds):
        for batch in batches:
            times[batch].append(one_pass(batch)[1:])
    base = statistics.median(w for w, _ in times[batches[0]])
    base_cpu = statistics.median(c for _, c in times[batches[0]])
    print(
        "\n| tile_batch | tiles/s | s/pass (median) | x vs first | CPU-time x vs first | max diff vs first (8-bit) |"
    )
    print("|---|---|---|---|---|---|")
    for batch in batches:
        wall = statistics.median(w for w, _ in times[batch])
        cpu = statistics.median(c for _, c in times[batch])
        diff = float((reference[batch] - reference[batches[0]]).abs().max()) * 255
        print(
            f"| {batch} | {len(jobs) / wall:.3f} | {wall:.2f} | {base / wall:.2f} | {base_cpu / cpu:.2f} | {diff:.3f} |"
        )
        if options.json:
            with options.json.open("a") as handle:
                record = dict(bench="upscale", sdxl=options.sdxl_architecture, device=str(device), tile_batch=batch,
                              tiles_per_s=len(jobs) / wall, seconds_per_pass=wall, rounds=times[batch])  # fmt: skip
                handle.write(json.dumps(record) + "\n")
    if device.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
