"""Throughput of the training loop against a bare forward/backward/AdamW step of the same UNet, in one process.

    python benchmarks/train_step.py --threads 1          # CPU: tiny model, the real train_sdxl_ztsnr.main
    python benchmarks/train_step.py --sdxl_architecture  # GPU: random-init SDXL UNet, 1024², batch 4, bf16
    python benchmarks/train_step.py --sdxl_architecture --compile --variants bare,loop

Tiny model (default without CUDA): builds the tiny pipeline and a demo cache (128² buckets), then times
  - full loop: train_sdxl_ztsnr.main itself (arrow cache, bucket sampler, tag weights, DataLoader workers,
    logging), iteration by iteration after the warm-up; start-up and the final save/validation are left out;
  - trainer step: the trainer's per-step code on the same batches, read beforehand and kept in memory;
  - bare step: the same UNet, batch and latent shapes, random tensors on the device, fused AdamW, the same
    v-loss with MinSNR weights, nothing else;
  - bare step + clipping: the same with ``torch.nn.utils.clip_grad_norm_(max_norm=1.0)`` before the optimizer
    step, as diffusers' training examples do by default (the trainer clips at 1.0 by default too, and its
    gradient norm is also its non-finite check).
Each timed step runs right beside one step of each reference (their order turning), so load from other
processes on a shared machine hits all alike; overhead = sum of the path's step times / sum of the
reference's step times − 1, in wall time and in CPU time of the training thread (DataLoader workers' reading
is not in the second), with a 95% bootstrap interval over the pairs.
SDXL architecture (default with CUDA): random weights (no download), synthetic cache rows at 1024² in an
in-memory datasets table, and the variants
  - ref: gpu_anchor.py's "ref" method (fp32 master weights, bf16 autocast, foreach AdamW, loss.item() each
    step, one batch reused; 2 warm-up steps, then steps timed between two device synchronisations);
  - bare: fused AdamW, channels_last, bf16 autocast, the v-loss, no per-step host sync;
  - step: the trainer's per-step code under accelerate (bf16) on batches already on the device;
  - loop: the same plus TrainingRows.loader over the synthetic rows (workers, pinned memory) and logging.
Goals: on the CPU the full loop within 3% of bare; on one GPU, loop >= 1.5x ref. Compare numbers of one call only.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Nothing is downloaded: every model here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import append_jsonl, clock, elapsed, print_table, seconds_per_step, synchronize  # noqa: E402

from sdxl_ztsnr.losses import per_sample_mse  # noqa: E402
from sdxl_ztsnr.optimizers import (  # noqa: E402
    build_optimizer,
    clear_nonfinite_mark,
    clip_and_check_gradients,
)
from sdxl_ztsnr.schedule import add_noise, alphas_cumprod, loss_weights, v_target  # noqa: E402
from sdxl_ztsnr.sdxl_architecture import PROMPT_CHUNK as CHUNK  # noqa: E402
from sdxl_ztsnr.sdxl_architecture import SDXL_UNET  # noqa: E402
from sdxl_ztsnr.training import training_loss  # noqa: E402


def reset_accelerate() -> None:
    """Each Accelerator here stands for a new process; accelerate keeps its state in singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def bare_step(
    unet,
    optimizer,
    alpha_bar: torch.Tensor,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float | None = None,
):
    """Forward, v-loss × MinSNR weight, backward, optimizer step: noise and timesteps drawn on the device.

    With ``max_grad_norm``, ``torch.nn.utils.clip_grad_norm_`` before the step, as diffusers' training examples
    do by default (``--max_grad_norm 1.0``) and the trainer does (its clipping is also its non-finite check).
    """
    device = alpha_bar.device

    def step(inputs: dict) -> None:
        latents = inputs["latents"]
        t = torch.randint(0, len(alpha_bar), (len(latents),), device=device)
        noise = torch.randn_like(latents)
        a = alpha_bar[t]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = unet(
                add_noise(latents, noise, a),
                t,
                encoder_hidden_states=inputs["prompt_embeds"],
                added_cond_kwargs={
                    "text_embeds": inputs["pooled_prompt_embeds"],
                    "time_ids": inputs["time_ids"],
                },
                return_dict=False,
            )[0]
        loss = (per_sample_mse(prediction, v_target(latents, noise, a)) * loss_weights(a)).mean()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class TrainerLoop:
    """The per-step code of train_sdxl_ztsnr.main's loop (keep in step with it), for batches from anywhere.

    ``step`` is the body of the loop for one batch; ``log`` is what a logging step does (host syncs).
    """

    def __init__(self, accelerator, unet, optimizer, lr_scheduler, alpha_bar, generator, fp16: bool):
        self.accelerator, self.unet, self.optimizer = accelerator, unet, optimizer
        self.lr_scheduler, self.alpha_bar, self.generator, self.fp16 = (
            lr_scheduler,
            alpha_bar,
            generator,
            fp16,
        )
        device = accelerator.device
        self.parameters = list(unet.parameters())
        self.running_loss = torch.zeros((), device=device)
        self.bad_in_a_row = torch.zeros((), device=device)
        self.bad_total = torch.zeros((), device=device)
        self.steps = 0

    def step(self, batch: dict) -> None:
        accelerator, unet, optimizer = self.accelerator, self.unet, self.optimizer
        with accelerator.accumulate(unet):
            loss, _ = training_loss(unet, batch, self.alpha_bar, self.generator, "min_snr", 5.0, 1.0)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                found_inf = clip_and_check_gradients(accelerator, optimizer, self.parameters, 1.0, self.fp16)
            optimizer.step()
            clear_nonfinite_mark(optimizer)
            optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()  # once per update, as the trainer (step_scheduler_with_optimizer=False)
        self.running_loss += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0)
        self.bad_in_a_row = (self.bad_in_a_row + found_inf) * found_inf
        self.bad_total += found_inf
        self.steps += 1

    def log(self) -> dict:
        logs = {
            "loss": self.running_loss.item() / max(self.steps, 1),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "skipped_steps": self.bad_total.item(),
            "bad_in_a_row": self.bad_in_a_row.item(),
        }
        self.running_loss.zero_()
        self.steps = 0
        return logs


def prepared_trainer(accelerator, unet, learning_rate: float, max_steps: int, seed: int, compile_unet: bool):
    """Optimizer, lr schedule, accelerate.prepare and torch.compile exactly as train_sdxl_ztsnr.main does."""
    from diffusers.optimization import get_scheduler

    optimizer = build_optimizer(
        unet.parameters(), "adamw", learning_rate, (0.9, 0.999), 1e-2, 1e-8, accelerator.device.type
    )
    lr_scheduler = get_scheduler(
        "constant_with_warmup",
        optimizer,
        num_warmup_steps=0,
        num_training_steps=max_steps,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if compile_unet:
        unet = torch.compile(unet)
    generator = torch.Generator().manual_seed(seed * 1009 + accelerator.process_index)
    return TrainerLoop(
        accelerator,
        unet,
        optimizer,
        lr_scheduler,
        alphas_cumprod(),
        generator,
        accelerator.mixed_precision == "fp16",
    )


def random_like_batches(batches: list[dict]) -> list[dict]:
    """Random tensors of each batch's shapes, on its device (the bare step's inputs: no data reading)."""
    out = []
    for batch in batches:
        out.append(
            {
                "latents": torch.randn_like(batch["latents"]),
                "prompt_embeds": torch.randn_like(batch["prompt_embeds"]),
                "pooled_prompt_embeds": torch.randn_like(batch["pooled_prompt_embeds"]),
                "time_ids": batch["time_ids"].clone(),
            }
        )
    return out


def print_overhead_table(title: str, rows: list[tuple], batch_size: int, ref: str | None = None) -> None:
    """rows: (path, seconds per step, overhead vs bare or None for a bare row[, main-thread CPU overhead]).

    Overhead = extra time per step relative to the bare step; "x ref" = throughput / the ref row's throughput.
    """
    cpu = len(rows[0]) > 3
    columns = ["path", "samples/s", "step ms", "overhead vs bare"]
    columns += ["main-thread CPU overhead"] * cpu + ["x ref"] * bool(ref)
    ref_seconds = {row[0]: row[1] for row in rows}.get(ref)

    def shown(value):
        return "-" if value is None else f"{100 * value:+.1f}%"

    table = []
    for name, seconds, overhead, *cpu_overhead in rows:
        line = [name, f"{batch_size / seconds:.2f}", f"{1000 * seconds:.1f}", shown(overhead)]
        line += [shown(cpu_overhead[0])] * cpu + [f"{ref_seconds / seconds:.2f}"] * bool(ref)
        table.append(line)
    print_table(columns, table, title)


def overhead_interval(
    pairs: list[tuple], column: int = 2, draws: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of the wall overhead (sum of path times / sum of the reference's wall times in
    ``column`` - 1) over the pairs.

    The same step varies by ~15% from one step to the next on a shared 2-core machine, so a few percent of
    overhead needs an interval: resample the pairs with replacement and take the 2.5% and 97.5% quantiles.
    """
    times = np.array([(p[0], p[column]) for p in pairs])
    picks = np.random.default_rng(seed).integers(0, len(times), size=(draws, len(times)))
    chosen = times[picks]  # (draws, pairs, 2)
    ratios = chosen[..., 0].sum(axis=1) / chosen[..., 1].sum(axis=1) - 1
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)


# --- tiny model: the real training script -------------------------------------------------------------


class ReferencesBesideEachTrainerStep:
    """While active, each optimizer step of train_sdxl_ztsnr.main (entering ``Accelerator.accumulate``) first
    records the time since the previous one — the whole previous iteration: its batch from the loader, the
    step, bookkeeping, logging — then runs one step of each reference on random inputs of that iteration's
    shapes.

    Trainer and reference steps alternate ~0.1 s apart, so load from other processes hits all alike.
    """

    def __init__(self, references: list, random_batches: list[dict], warmup: int):
        self.references, self.random_batches, self.warmup = references, random_batches, warmup
        # (trainer iteration wall, its CPU, then wall and CPU of each reference step) seconds
        self.pairs: list[tuple[float, ...]] = []
        self.iteration, self.last = 0, (0.0, 0.0)

    def before_step(self) -> None:
        now = clock()
        if self.iteration > self.warmup:  # the iteration that just ended was trained after the warm-up
            batch = self.random_batches[self.iteration - 1]
            self.pairs.append(
                (*elapsed(self.last, now), *time_references(self.references, batch, self.iteration))
            )
        self.iteration += 1
        self.last = clock()

    def __enter__(self):
        import contextlib

        from accelerate import Accelerator

        self.original = original = Accelerator.accumulate

        @contextlib.contextmanager
        def accumulate(accelerator, *models):
            self.before_step()
            with original(accelerator, *models):
                yield

        Accelerator.accumulate = accumulate
        return self

    def __exit__(self, *exc) -> None:
        from accelerate import Accelerator

        Accelerator.accumulate = self.original


def time_references(references: list, batch: dict, turn: int) -> list[float]:
    """Run each reference step once on ``batch`` (their order turns with ``turn``, so neither always runs right
    after the path); (wall, CPU) seconds of each, in the order of ``references``."""
    times: list[tuple[float, float]] = [(0.0, 0.0)] * len(references)
    for offset in range(len(references)):
        index = (turn + offset) % len(references)
        start = clock()
        references[index](batch)
        times[index] = elapsed(start, clock())
    return [value for pair in times for value in pair]


def trainer_args(model_dir: Path, cache_dir: Path, out_dir: Path, options: argparse.Namespace, steps: int):
    import train_sdxl_ztsnr

    argv = ["--pretrained_model_name_or_path", str(model_dir), "--precomputed_dir", str(cache_dir)]
    argv += ["--output_dir", str(out_dir), "--train_batch_size", str(options.batch_size)]
    argv += ["--max_train_steps", str(steps), "--logging_steps", str(options.logging_steps)]
    # No checkpoint or validation inside the timed steps (the final ones come after the last logging step).
    argv += "--checkpointing_steps 1000000000 --validation_steps 0 --no_single_file --seed 0".split()
    argv += ["--dataloader_num_workers", str(options.num_workers), "--report_to", options.report_to]
    return train_sdxl_ztsnr.parse_args(argv)


def trainer_batches(args: argparse.Namespace, count: int):
    """The first ``count`` batches the trainer would train on (same split, sampler and seed), on its device."""
    import train_sdxl_ztsnr
    from sdxl_ztsnr.train_data import BucketBatchSampler

    reset_accelerate()
    accelerator = train_sdxl_ztsnr.make_accelerator(args)
    data = train_sdxl_ztsnr.load_training_data(args, accelerator)
    sampler = BucketBatchSampler(data.train_buckets, args.train_batch_size, args.seed, 0, 1)
    stream = data.stream(sampler, accelerator.device, args.seed)
    return accelerator, [batch for _, batch in itertools.islice(stream, count)]


def run_tiny(options: argparse.Namespace) -> list[dict]:
    from diffusers import UNet2DConditionModel

    import precompute_latents
    import train_sdxl_ztsnr
    from sdxl_ztsnr.demo_data import write_demo_dataset
    from sdxl_ztsnr.tiny import build_tiny_sdxl

    warmup, steps = options.warmup, options.steps
    total = warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_sdxl(tmp / "tiny")
        write_demo_dataset(tmp / "data", n=options.images, seed=0)
        cache_dir = tmp / "cache"
        argv = ["--train_data_dir", str(tmp / "data"), "--pretrained_model_name_or_path", str(model_dir)]
        argv += ["--output_dir", str(cache_dir), *"--resolution 128 --bucket_step 32 --no_progress".split()]
        precompute_latents.main(precompute_latents.parse_args(argv))

        # The batches the trainer trains on, in its order: the trainer-step path replays them from memory,
        # the bare step gets random tensors of the same shapes.
        args = trainer_args(model_dir, cache_dir, tmp / "probe", options, total)
        accelerator, batches = trainer_batches(args, total)
        device = accelerator.device
        loop = prepared_trainer(
            accelerator, train_sdxl_ztsnr.load_unet(args, device.type), args.learning_rate, total, 0, False
        )
        bare_unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(device).train()
        if device.type == "cuda":
            bare_unet.to(memory_format=torch.channels_last)  # as the trainer's UNet
        optimizer = torch.optim.AdamW(
            bare_unet.parameters(), lr=args.learning_rate, weight_decay=1e-2, fused=True
        )
        alpha_bar = alphas_cumprod().to(device)
        references = [
            bare_step(bare_unet, optimizer, alpha_bar, None),
            bare_step(bare_unet, optimizer, alpha_bar, None, max_grad_norm=1.0),
        ]
        random_batches = random_like_batches(batches)

        # Every timed step runs right beside one step of each reference (bare, bare with clipping).
        step_pairs: list[tuple[float, ...]] = []
        full_pairs: list[tuple[float, ...]] = []
        for round_index in range(options.rounds):
            # As train_sdxl_ztsnr.main does after start-up (it unfreezes at its end): without it a full garbage
            # collection over the libraries' objects (~0.4 s) lands on a random step of either path.
            gc.collect()
            gc.freeze()
            for index, (batch, random_batch) in enumerate(zip(batches, random_batches, strict=True)):
                reference_times = time_references(references, random_batch, index + round_index)
                start = clock()
                loop.step(batch)
                end = clock()
                if index >= warmup:
                    step_pairs.append((*elapsed(start, end), *reference_times))
            gc.unfreeze()
            reset_accelerate()
            with ReferencesBesideEachTrainerStep(references, random_batches, warmup) as hook:
                train_sdxl_ztsnr.main(
                    trainer_args(model_dir, cache_dir, tmp / f"run-{round_index}", options, total)
                )
            full_pairs += hook.pairs
        threads = torch.get_num_threads()

    def rows_for(name: str, short: str, pairs: list) -> list[tuple]:
        """The reference steps paired with a path, then the path: (name, mean wall s/step, overheads or None)."""
        total = [sum(p[column] for p in pairs) for column in range(6)]
        return [
            (f"bare step, paired with the {short}", total[2] / len(pairs), None, None),
            ("  bare step + clip_grad_norm_(1.0)", total[4] / len(pairs), total[4] / total[2] - 1, None),
            (name, total[0] / len(pairs), total[0] / total[2] - 1, total[1] / total[3] - 1),
        ]

    rows = rows_for("trainer step code, batches in memory", "step code", step_pairs)
    rows += rows_for("full loop (train_sdxl_ztsnr.main)", "full loop", full_pairs)
    where = f"CPU, {threads} torch thread(s)" if device.type == "cpu" else torch.cuda.get_device_name()
    print_overhead_table(
        f"training throughput: tiny SDXL, batch {options.batch_size}, 128² buckets, {options.images} demo "
        f"images, {options.num_workers} DataLoader worker(s), {where}; {options.rounds} x {steps} steps after "
        f"{warmup} warm-up, each beside a bare step with and one without clipping; overhead = sum of path "
        "times / sum of bare times - 1",
        rows,
        options.batch_size,
    )
    for name, pairs in (("trainer step code", step_pairs), ("full loop", full_pairs)):
        for reference, column in (("bare", 2), ("bare + clipping", 4)):
            ratios = sorted(p[0] / p[column] for p in pairs)
            quartiles = [ratios[int(q * (len(ratios) - 1))] for q in (0.25, 0.5, 0.75)]
            low, high = overhead_interval(pairs, column)
            total = sum(p[0] for p in pairs) / sum(p[column] for p in pairs) - 1
            print(
                f"  {name} vs {reference}: overhead {100 * total:+.1f}% (95% interval {100 * low:+.1f}% .. "
                f"{100 * high:+.1f}%, {len(pairs)} pairs); per-step ratio quartiles "
                + " ".join(f"{r:.3f}" for r in quartiles)
            )
    keys = ("s_per_step", "cpu_s_per_step", "bare_s_per_step", "bare_cpu_s_per_step")
    keys += ("bare_clip_s_per_step", "bare_clip_cpu_s_per_step")
    records = [dict(path="step", **dict(zip(keys, p, strict=True))) for p in step_pairs]
    records += [dict(path="full", **dict(zip(keys, p, strict=True))) for p in full_pairs]
    return [
        dict(what="train_step", model="tiny", device=where, batch=options.batch_size, **r) for r in records
    ]


# --- SDXL architecture: synthetic rows, random weights ------------------------------------------------


def synthetic_rows(count: int, resolution: int, embed_dim: int, pooled_dim: int, seed: int = 0):
    """An in-memory cache table of ``count`` rows at resolution² (latents (4, r/8, r/8), one text chunk)."""
    from sdxl_ztsnr.cache import cache_features, rows_to_dataset

    rng = np.random.default_rng(seed)
    side = resolution // 8
    sizes = {name: [resolution, resolution] for name in ("original_size", "target_size", "bucket")}
    rows = [
        dict(
            latents=rng.standard_normal((4, side, side), dtype=np.float32).astype(np.float16),
            prompt_embeds=rng.standard_normal((CHUNK, embed_dim), dtype=np.float32).astype(np.float16),
            pooled_prompt_embeds=rng.standard_normal(pooled_dim, dtype=np.float32).astype(np.float16),
            crop_top_left=[0, 0],
            tags=["1girl", "solo", "outdoors"],
            prompt="1girl, solo, outdoors",
            source=f"synthetic[{index}]",
            flipped=False,
            **sizes,
        )
        for index in range(count)
    ]
    return rows_to_dataset(rows, cache_features(4, embed_dim, pooled_dim))


def build_unet(config: dict, device: torch.device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.train()


def anchor_ref_step(unet, optimizer, dtype: torch.dtype):
    """gpu_anchor.py's "ref" measurement method: MSE against the input, host sync on the loss every step."""

    def step(inputs: dict) -> None:
        x = inputs["latents"]
        with torch.autocast(x.device.type, dtype=dtype):
            prediction = unet(
                x,
                inputs["timesteps"],
                inputs["prompt_embeds"],
                added_cond_kwargs={
                    "text_embeds": inputs["pooled_prompt_embeds"],
                    "time_ids": inputs["time_ids"],
                },
            ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), x.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def attention_backend(name: str):
    """Context forcing one scaled_dot_product_attention backend ("auto": torch's own choice)."""
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(backends[name])


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_sdxl(options: argparse.Namespace) -> list[dict]:
    from accelerate import Accelerator

    from sdxl_ztsnr.train_data import BucketBatchSampler, TrainingRows

    device = torch.device(options.device)
    if options.tiny_unet_config:  # the same code path at toy size: checks this script without a GPU
        from sdxl_ztsnr.tiny import build_tiny_sdxl

        with tempfile.TemporaryDirectory() as tmp:
            config = dict(json.loads((build_tiny_sdxl(Path(tmp)) / "unet" / "config.json").read_text()))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = SDXL_UNET
    resolution, batch_size = options.resolution, options.batch_size
    embed_dim = config["cross_attention_dim"]
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[options.mixed_precision]
    warmup = options.warmup + (1 if options.compile else 0)
    total = warmup + options.steps
    variants = options.variants.split(",")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    unet = build_unet(config, device)
    params = sum(p.numel() for p in unet.parameters())
    alpha_bar = alphas_cumprod().to(device)
    side = resolution // 8
    one = {
        "latents": torch.randn(batch_size, 4, side, side, device=device),
        "timesteps": torch.randint(0, 1000, (batch_size,), device=device),
        "prompt_embeds": torch.randn(batch_size, CHUNK, embed_dim, device=device),
        "pooled_prompt_embeds": torch.randn(batch_size, pooled_dim, device=device),
        "time_ids": torch.tensor(
            [[resolution, resolution, 0.0, 0.0, resolution, resolution]] * batch_size, device=device
        ),
    }
    results: dict[str, float] = {}
    memory: dict[str, float] = {}

    def measure(name: str, run) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with attention_backend("auto" if name == "ref" else options.sdpa_backend):
            results[name] = run()
        if device.type == "cuda":
            memory[name] = torch.cuda.max_memory_allocated() / 2**30
        rate = batch_size / results[name]
        print(f"{name}: {rate:.2f} samples/s ({time.perf_counter() - start:.0f} s with warm-up)", flush=True)

    if "ref" in variants:  # first, before channels_last, as in the anchor; its warm-up is 2 steps
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
        step = anchor_ref_step(unet, optimizer, dtype)
        measure("ref", lambda: seconds_per_step(step, [one] * (2 + options.steps), device, 2))
        del optimizer, step
        free(device)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)  # what the trainer's load_unet does on CUDA
    if "bare" in variants:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, weight_decay=1e-2, fused=True)
        step = bare_step(torch.compile(unet) if options.compile else unet, optimizer, alpha_bar, dtype)
        inputs = dict(one, latents=one["latents"].contiguous(memory_format=torch.channels_last))
        measure("bare", lambda: seconds_per_step(step, [inputs] * total, device, warmup))
        del optimizer, step
        free(device)

    if "step" in variants or "loop" in variants:
        # The trainer's code from here on: accelerate (bf16 autocast), fused AdamW, cache rows, loader.
        reset_accelerate()
        accelerator = Accelerator(
            mixed_precision=options.mixed_precision,
            cpu=device.type == "cpu",
            step_scheduler_with_optimizer=False,
        )
        count = batch_size * total
        data = TrainingRows(
            synthetic_rows(count, resolution, embed_dim, pooled_dim),
            {},
            list(range(count)),
            [],
            torch.ones(count),
            torch.zeros(CHUNK, embed_dim, dtype=torch.float16),
            num_workers=options.num_workers,
        )
        sampler = BucketBatchSampler(data.train_buckets, batch_size, 0, 0, 1)
        loop = prepared_trainer(accelerator, unet, 1e-6, total, 0, options.compile)
        if "step" in variants:
            stream = data.stream(sampler, accelerator.device, 0)
            batches = [batch for _, batch in itertools.islice(stream, len(sampler))]
            measure("step", lambda: seconds_per_step(loop.step, batches, device, warmup))
            del batches
        if "loop" in variants:
            measure("loop", lambda: time_trainer_loop(loop, data, sampler, warmup, options.logging_steps))

    names = {
        "bare": "bare step (fused AdamW)",
        "step": "trainer step code, batches on device",
        "loop": "trainer loop incl. data loading + logging",
        "ref": "ref (gpu_anchor.py's method)",
    }
    suffix = (", compiled" if options.compile else "") + (
        f", SDPA {options.sdpa_backend}" if options.sdpa_backend != "auto" else ""
    )
    names = {k: v + (suffix if k != "ref" else "") for k, v in names.items()}
    base = results.get("bare")
    rows = [
        (names[k], results[k], None if k == "bare" or not base else results[k] / base - 1)
        for k in ("bare", "step", "loop", "ref")
        if k in results
    ]
    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    )
    print_overhead_table(
        f"training throughput: {'tiny' if options.tiny_unet_config else 'SDXL'} UNet ({params / 1e9:.3f}B "
        f"params, random init), {resolution}², batch {batch_size}, {options.mixed_precision} autocast, {where}; "
        f"{options.steps} timed steps after {warmup} warm-up",
        rows,
        batch_size,
        names["ref"] if "ref" in results else None,
    )
    if memory:
        print("peak GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in memory.items()))
    return [
        dict(
            what="train_step",
            model="tiny-config" if options.tiny_unet_config else "sdxl",
            path=k,
            device=where,
            batch=batch_size,
            s_per_step=v,
            peak_GiB=memory.get(k),
        )
        for k, v in results.items()
    ]


def time_trainer_loop(loop: TrainerLoop, data, sampler, warmup: int, logging_steps: int) -> float:
    """One pass of the trainer's loop over ``data`` (loader, step, logging); wall s/step after the warm-up."""
    device = loop.accelerator.device
    sync = synchronize(device)
    count, start = 0, 0.0
    one_epoch = itertools.islice(data.stream(sampler, device, 0), len(sampler))
    for index, (_, batch) in enumerate(one_epoch):
        if index == warmup:
            sync()
            start = time.perf_counter()
        loop.step(batch)
        count = index + 1
        if count % logging_steps == 0 or count == len(sampler):
            loop.log()
    sync()
    return (time.perf_counter() - start) / (count - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sdxl_architecture", action="store_true", help="SDXL UNet path (default with CUDA)")
    parser.add_argument("--tiny", action="store_true", help="tiny model + real trainer path (default on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=None, help="default 10 (tiny) or 3 (SDXL)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps: default 40 (tiny) or 10 (SDXL)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="DataLoader workers: default 2 (the trainer's)"
    )
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    tiny = parser.add_argument_group("tiny model")
    tiny.add_argument("--images", type=int, default=64, help="demo images in the cache")
    tiny.add_argument("--rounds", type=int, default=2, help="times both paths are run (more pairs)")
    tiny.add_argument("--report_to", default="tensorboard", help="the trainer's --report_to")
    sdxl = parser.add_argument_group("SDXL architecture")
    sdxl.add_argument("--resolution", type=int, default=1024)
    sdxl.add_argument("--mixed_precision", choices=["bf16", "fp16"], default="bf16")
    sdxl.add_argument("--compile", action="store_true", help="torch.compile bare and ours (minutes each)")
    sdxl.add_argument("--variants", default="ref,bare,step,loop", help="any of ref,bare,step,loop")
    sdxl.add_argument(
        "--sdpa_backend",
        choices=["auto", "cudnn", "flash", "efficient", "math"],
        default="auto",
        help="force an attention kernel for bare/step/loop (ref keeps torch's choice)",
    )
    sdxl.add_argument(
        "--tiny_unet_config",
        action="store_true",
        help="the SDXL path with the tiny UNet (a check without a GPU)",
    )
    options = parser.parse_args()
    cuda = torch.cuda.is_available()
    options.device = options.device or ("cuda" if cuda else "cpu")
    if options.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_num_threads(options.threads)
    if options.num_workers is None:
        options.num_workers = 2
    if (
        options.sdxl_architecture
        or options.tiny_unet_config
        or (options.device == "cuda" and not options.tiny)
    ):
        options.warmup = 3 if options.warmup is None else options.warmup
        options.steps = options.steps or 10
        records = run_sdxl(options)
    else:
        options.warmup = 10 if options.warmup is None else options.warmup
        options.steps = options.steps or 40
        records = run_tiny(options)
    append_jsonl(options.json, records)


if __name__ == "__main__":
    main()
