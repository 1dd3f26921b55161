"""Steps/s and peak memory of VAE decoder fine-tuning (train_vae.py's VaeStep), one fresh process per variant.

    python benchmarks/vae.py                      # CPU: tiny VAE, 256² crops, batch 2
    python benchmarks/vae.py --sdxl_architecture  # GPU: SDXL's VAE architecture, 512² crops, batch 4, fp32 vs bf16

Each variant runs the trainer's own micro-batch (`sdxl_ztsnr.vae_training.VaeStep`: encoder without grad,
decoder forward/backward, MSE + 0.1·LPIPS-VGG, optional PatchGAN with the adaptive weight, fused AdamW under
accelerate) on random crops held on the device, in a process of its own so that the peak memory is that
variant's: on CUDA torch.cuda.max_memory_allocated, on the CPU the process's peak resident set (ru_maxrss,
which includes torch itself; "RSS before" is the same process just before the first step). Models are
random-init (no download): the tiny test VAE, or AutoencoderKL with SDXL's VAE config; LPIPS gets a random VGG
backbone (same cost as the real one). `--data` also times the data path alone: random crops from ~1 MP JPEGs
through DataLoader workers, as train_vae.py reads them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from precompute import SDXL_VAE, write_photos  # noqa: E402  (benchmarks/precompute.py)
from timing import append_jsonl, print_table  # noqa: E402


def rss_mib() -> float:
    """Resident set of this process now, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_vae(spec: dict):
    from diffusers import AutoencoderKL

    if spec["arch"] == "sdxl":
        return AutoencoderKL(**SDXL_VAE)
    return AutoencoderKL.from_pretrained(spec["tiny_dir"], subfolder="vae")


def measure(spec: dict) -> dict:
    """Time ``spec["steps"]`` micro-batches of VaeStep after ``spec["warmup"]``; runs in a fresh process."""
    from accelerate import Accelerator

    from sdxl_ztsnr import vae_training
    from sdxl_ztsnr.optimizers import build_optimizer

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=spec["precision"])
    vae = build_vae(spec)
    trainable = vae_training.select_trainable(vae)
    if spec["checkpointing"]:
        vae.enable_gradient_checkpointing()
    model = vae_training.Reconstructor(vae)
    optimizer = build_optimizer(trainable, "adamw", 1e-5, device_type=device.type)
    lpips_model = vae_training.load_lpips("vgg", random_backbone=True).to(device) if spec["lpips"] else None
    model, optimizer = accelerator.prepare(model, optimizer)
    disc = disc_optimizer = None
    if spec["gan"]:
        disc = vae_training.PatchDiscriminator()
        disc_optimizer = build_optimizer(disc.parameters(), "adamw", 1e-5, device_type=device.type)
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    settings = vae_training.VaeLossSettings(
        perceptual_weight=0.1 if spec["lpips"] else 0.0, gan_start_step=0 if spec["gan"] else None
    )
    step = vae_training.VaeStep(accelerator, model, optimizer, settings, lpips_model, disc, disc_optimizer)
    size, batch_size = spec["crop"], spec["batch"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    batch = {
        "pixels": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1,
        "noise": torch.randn(
            batch_size, vae.config.latent_channels, size // factor, size // factor, device=device
        ),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(spec["warmup"]):
        step(batch, spec["gan"])
    sync()
    before = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        logs = step(batch, spec["gan"])
    sync()
    seconds = (time.perf_counter() - start) / spec["steps"]
    assert torch.isfinite(logs["loss"]), "the benchmark step gave a non-finite loss"
    record = {
        **spec,
        "step_ms": 1000 * seconds,
        "steps_per_s": 1 / seconds,
        "samples_per_s": batch_size / seconds,
    }
    if device.type == "cuda":
        record["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        record["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["rss_before_mib"] = before
    record["trainable_params"] = sum(p.numel() for p in trainable)
    return record


def measure_in_fresh_process(spec: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(measure, (spec,))


def measure_data_path(crop: int, workers: int, images: int, batches: int, batch_size: int) -> dict:
    """Crops/s of train_vae.py's data path: JPEG decode, cover-resize, keyed random crop, latent noise."""
    from sdxl_ztsnr.train_data import DataPosition
    from sdxl_ztsnr.vae_data import CropBatchSampler, CropData, FolderImages, scan_images

    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp), images)
        source = FolderImages(tmp)
        scan = scan_images(source, num_workers=workers)
        data = CropData(source, scan.usable, scan.sizes, crop, (4, crop // 8, crop // 8), workers)
        sampler = CropBatchSampler(len(scan.usable), batch_size, seed=0)
        stream = data.stream(sampler, torch.device("cpu"), DataPosition())
        next(stream)  # workers started
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        seconds = time.perf_counter() - start
    return {"path": "data", "crop": crop, "workers": workers, "crops_per_s": batches * batch_size / seconds}


def print_step_table(title: str, records: list[dict]) -> None:
    cpu = "rss_before_mib" in records[0]
    columns = ["variant", "crop", "batch", "precision", "steps/s", "samples/s", "step ms", "peak MiB"]
    rows = [
        [r["name"], f"{r['crop']}²", r["batch"], r["precision"], f"{r['steps_per_s']:.3f}", f"{r['samples_per_s']:.2f}",
         f"{r['step_ms']:.0f}", f"{r['peak_mib']:.0f}"] + [f"{r['rss_before_mib']:.0f}"] * cpu
        for r in records
    ]  # fmt: skip
    print_table(columns + ["RSS before MiB"] * cpu, rows, title)


def variants(options) -> list[dict]:
    """(name, precision, lpips, gan, checkpointing) per architecture."""
    if options.sdxl_architecture:
        table = [
            ("mse+lpips", "no", True, False, False),
            ("mse+lpips", "bf16", True, False, False),
            ("mse+lpips+ckpt", "bf16", True, False, True),
            ("mse+lpips+gan", "bf16", True, True, False),
        ]
    else:
        table = [
            ("mse", "no", False, False, False),
            ("mse+lpips", "no", True, False, False),
            ("mse+lpips+ckpt", "no", True, False, True),
            ("mse+lpips+gan", "no", True, True, False),
        ]
    if options.precision:
        table = [row for row in table if row[1] == options.precision]
    return [dict(name=n, precision=p, lpips=lp, gan=g, checkpointing=c) for n, p, lp, g, c in table]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sdxl_architecture", action="store_true", help="SDXL's VAE config (random weights)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--crop_size", type=int, default=None, help="default 256 (tiny) or 512 (SDXL)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 2 (tiny) or 4 (SDXL)")
    parser.add_argument("--precision", choices=["no", "bf16"], default=None, help="only these variants")
    parser.add_argument("--warmup", type=int, default=None, help="default 1 (CPU) or 3 (CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps: default 3 (CPU) or 20 (CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data", action="store_true", help="also time the data path (JPEG -> crops)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for --data")
    parser.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    options = parser.parse_args()
    options.device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    crop = options.crop_size or (512 if options.sdxl_architecture else 256)
    batch = options.batch_size or (4 if options.sdxl_architecture else 2)
    steps = options.steps or (20 if options.device == "cuda" else 3)
    warmup = options.warmup if options.warmup is not None else (3 if options.device == "cuda" else 1)
    common = dict(
        arch="sdxl" if options.sdxl_architecture else "tiny", device=options.device, crop=crop, batch=batch,
        warmup=warmup, steps=steps, threads=options.threads,
    )  # fmt: skip
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        if not options.sdxl_architecture:
            from sdxl_ztsnr.tiny import build_tiny_sdxl

            common["tiny_dir"] = str(build_tiny_sdxl(Path(tmp) / "tiny"))
        for variant in variants(options):
            records.append(measure_in_fresh_process({**common, **variant}))
            print(
                f"  {variant['name']} {variant['precision']}: {records[-1]['steps_per_s']:.3f} steps/s",
                flush=True,
            )
    arch = "SDXL VAE architecture" if options.sdxl_architecture else "tiny VAE"
    print_step_table(f"VAE fine-tuning step, {arch}, {options.device}, {options.threads} thread(s)", records)
    if options.data:
        data = measure_data_path(crop, options.workers, images=16, batches=20, batch_size=batch)
        print(
            f"\ndata path: {data['crops_per_s']:.1f} crops/s at {crop}² from ~1 MP JPEGs, {options.workers} workers"
        )
        records.append(data)
    append_jsonl(options.json, records)


if __name__ == "__main__":
    main()
