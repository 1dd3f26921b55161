"""Throughput of the whole precompute (decode, bucket, VAE, text, write, merge) against the bare VAE encode of
the same batches, in the same process. Prints a table.

    python benchmarks/precompute.py                      # CPU: tiny model, 128² buckets
    python benchmarks/precompute.py --sdxl_architecture  # GPU: random-init SDXL VAE and CLIP sizes, 1024²

The SDXL-architecture models are random-init (no download): VAE with SDXL's config and CLIP ViT-L + bigG
shaped text encoders; throughput does not depend on the weights. Goal on a GPU: precompute >= 90% of bare.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import print_table  # noqa: E402  (benchmarks/timing.py)

from sdxl_ztsnr import precompute  # noqa: E402
from sdxl_ztsnr.buckets import make_buckets  # noqa: E402
from sdxl_ztsnr.demo_data import write_demo_dataset  # noqa: E402
from sdxl_ztsnr.text_encoding import load_text_encoders  # noqa: E402
from sdxl_ztsnr.tiny import WORD_LIST, build_tiny_sdxl  # noqa: E402

# SDXL's VAE (stabilityai/stable-diffusion-xl-base-1.0, vae/config.json), architecture only.
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# SDXL's text encoders: CLIP ViT-L/14 (OpenAI) and OpenCLIP ViT-bigG/14, 77 positions.
SDXL_TEXT = (
    dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
    ),
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
    ),
)
# Shapes near SDXL's buckets, (width, height), cycled.
PHOTO_SIZES = ((1024, 1024), (1216, 832), (832, 1216), (1344, 768), (896, 1152), (1536, 1024), (1100, 1400))


def write_photos(out_dir: Path, n: int, seed: int = 0) -> None:
    """n JPEGs around 1 MP with smooth structure plus grain (realistic decode cost) and 20-90 tag captions."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        coarse = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out_dir / f"{i:05d}.jpg", quality=90)
        tags = rng.choice(WORD_LIST, size=int(rng.integers(20, 90)))
        (out_dir / f"{i:05d}.txt").write_text(", ".join(tags), encoding="utf-8")


def sdxl_models(tiny_dir: Path, device: torch.device, vae_dtype: torch.dtype, text_dtype: torch.dtype):
    """Random-init SDXL-size VAE and text encoders built on the device; the tiny pipeline's tokenizers."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(tiny_dir, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    ids = dict(
        vocab_size=len(tokenizers[0]),
        max_position_embeddings=77,
        bos_token_id=tokenizers[0].bos_token_id,
        eos_token_id=tokenizers[0].eos_token_id,
        pad_token_id=tokenizers[0].eos_token_id,
    )
    with torch.device(device):
        vae = AutoencoderKL(**SDXL_VAE).to(vae_dtype).eval()
        encoders = [
            CLIPTextModel(CLIPTextConfig(**SDXL_TEXT[0], projection_dim=768, **ids)),
            CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT[1], projection_dim=1280, **ids)),
        ]
    encoders = [e.to(text_dtype).eval().requires_grad_(False) for e in encoders]
    vae.requires_grad_(False)
    return vae, tokenizers, encoders


def bare_encode_seconds(vae, inputs, batches, buckets, device) -> float:
    """Seconds for vae_latents over the logged (bucket, size) batches, from device-resident uint8 pixels."""
    per_bucket = defaultdict(list)
    for index in range(len(inputs)):
        item = precompute.prepare_input(inputs, index, buckets)
        for sample in item["samples"]:
            per_bucket[tuple(sample["bucket"])].append(sample["pixels"].to(device))
    stacked, taken = [], defaultdict(int)
    for bucket, size in batches:
        start = taken[bucket]
        stacked.append(torch.stack(per_bucket[bucket][start : start + size]))
        taken[bucket] += size
    dtype = next(vae.parameters()).dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for pixels in stacked:
        x = (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(dtype)
        precompute.vae_latents(vae, x).to(torch.float16)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sdxl_architecture", action="store_true", help="SDXL-size VAE/encoders (for GPUs)")
    parser.add_argument("--images", type=int, default=None, help="default 96 (tiny) or 192 (SDXL)")
    parser.add_argument("--resolution", type=int, default=None, help="default 128 (tiny) or 1024 (SDXL)")
    parser.add_argument("--vae_dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--vae_batch_pixels", type=int, default=None, help="default 8 images at resolution²")
    parser.add_argument("--num_workers", type=int, default=None, help="default 1 on CPU, min(8, cpus) on GPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    big = args.sdxl_architecture
    n = args.images or (192 if big else 96)
    resolution = args.resolution or (1024 if big else 128)
    step = 64 if resolution >= 512 else 32
    workers = (
        args.num_workers
        if args.num_workers is not None
        else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 1)
    )
    batch_pixels = args.vae_batch_pixels or 8 * resolution * resolution
    vae_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.vae_dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_dir = build_tiny_sdxl(tmp / "tiny")
        data = tmp / "data"
        data.mkdir()
        if big:
            write_photos(data, n)
            text_dtype = torch.float16 if device.type == "cuda" else torch.float32
            vae, tokenizers, encoders = sdxl_models(tiny_dir, device, vae_dtype, text_dtype)
        else:
            write_demo_dataset(data, n=n, seed=0)
            vae = precompute.load_vae(str(tiny_dir), vae_dtype, device)
            tokenizers, encoders = load_text_encoders(tiny_dir, torch.float32, device)
        inputs = precompute.FolderInputs(data)
        buckets = make_buckets(resolution, step)
        options = dict(
            resolution=resolution, bucket_step=step, vae_batch_pixels=batch_pixels, num_workers=workers
        )
        options.update(shard_size=max(8, n // 4), progress=False)

        # Warm-up on a few images (allocator, cuDNN autotuning, worker start-up paths), then the timed run.
        warm = precompute.FolderInputs(data)
        warm.paths = warm.paths[: len(PHOTO_SIZES) * 2]
        precompute.precompute(warm, tmp / "warm", vae, tokenizers, encoders, **options)
        start = time.perf_counter()
        result = precompute.precompute(inputs, tmp / "cache", vae, tokenizers, encoders, **options)
        whole = time.perf_counter() - start
        run = result["run"]
        bare = bare_encode_seconds(vae, inputs, run["batches"], buckets, device)
        rows = result["metadata"]["counts"]["rows"]

    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} thread)"
    )
    model = "SDXL-arch VAE + CLIP (random init)" if big else "tiny SDXL"
    print(
        f"\nprecompute benchmark: {n} images -> {rows} rows, buckets at {resolution}², VAE {args.vae_dtype}, "
    )
    print(f"{len(run['batches'])} VAE batches, {workers} decode worker(s), device {name}, model {model}\n")
    rows = [
        ["whole precompute (decode..write, merge)", f"{whole:.2f}", f"{n / whole:.2f}"],
        ["bare VAE encode, same batches", f"{bare:.2f}", f"{rows / bare:.2f}"],
        ["precompute / bare", "", f"{100 * (n / whole) / (rows / bare):.1f}%"],
    ]
    print_table(["path", "seconds", "images/s"], rows)
    print(
        f"\nin the timed run: waiting for decoded images {run.get('wait_s', 0):.2f} s, encode calls "
        f"{run.get('encode_s', 0):.2f} s, waiting for the GPU {run.get('sync_s', 0):.2f} s, "
        f"waiting for shard writes {run.get('write_wait_s', 0):.2f} s"
    )


if __name__ == "__main__":
    main()
