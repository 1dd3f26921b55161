"""Peak accelerator memory of ONE training step of the real SDXL UNet (2.567B parameters, random weights) at
1024², per configuration: estimated without a GPU, and measured with torch.cuda.max_memory_allocated where
CUDA is present. A benchmark, not a test: an estimate of the full UNet takes minutes on a CPU.

    python benchmarks/memory.py                           # estimate every configuration
    python benchmarks/memory.py --configs ref,ref+gc      # some of them (the keys in the table)
    python benchmarks/memory.py --no_estimate             # with CUDA: measure only (benchmarks/gpu_suite.sh)
    python benchmarks/memory.py --tiny                    # a toy UNet at 128²: checks this script in seconds
    python benchmarks/memory.py --check_autocast          # the CPU emulation of CUDA autocast, op by op
    python benchmarks/memory.py --configs full+gc+te,lora+gc+te   # --train_text_encoder (UNet + both encoders)

Estimate. The step runs on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data, no arithmetic)
under torch's MemTracker (torch.distributed._tools.mem_tracker), which adds up the storage of every tensor
alive after each op, rounded up to the CUDA caching allocator's 512 bytes, and keeps the peak — what
max_memory_allocated reports. Parameters, buffers, inputs and optimizer state are registered with it before
the step; the optimizer state is created first by one step on zero gradients, so the tracked step is the
steady state (state, gradients and activations alive together). How the GPU is stood in for:
  - CUDA autocast cannot be switched on without a CUDA runtime, and autograd refuses fake CUDA tensors in
    backward, so the step runs on fake CPU tensors under CPU autocast (bf16). For the ops the UNet uses the
    two policies differ in one way: CUDA autocast runs group_norm, layer_norm and interpolate in fp32 (fp32
    outputs, and fp32 copies of their inputs kept for backward); CPU autocast leaves them in the input's
    dtype. ``cuda_autocast_fp32`` applies CUDA's rule, and ``--check_autocast`` compares the output dtypes
    of every op of a UNet forward under CUDA's own autocast on fake CUDA tensors (forward works there) with
    the emulation: the same for all ops of the toy UNet and of SDXL's.
  - scaled_dot_product_attention on CPU picks PyTorch's fused flash kernel, which keeps for backward what
    CUDA's flash, cuDNN and memory-efficient kernels keep: the output and a log-sum-exp per query row.
  - bitsandbytes' 8-bit AdamW reads values on the host inside its step, so fake tensors cannot run it; its
    state layout stands in for it (``EightBitAdamWLayout``). With CUDA the real one is measured.
  - Not seen: kernel workspaces (cuBLAS, cuDNN convolution), which max_memory_allocated does count.
The ``+te`` rows train both text encoders too (--train_text_encoder): SDXL's CLIP ViT-L and OpenCLIP bigG
(817.7M parameters) encode one 77-token chunk per sample inside the step, as the trainer does; whole encoders
train in fp32 beside the UNet (encoder 1's last layer and final norm frozen, as SDXL never reads them), a
LoRA run puts a LoRA of the same rank on each encoder's linears over a bf16 base.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the UNet is built from its config
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_ztsnr.optimizers import (  # noqa: E402
    FusedBackward,
    PerParameterOptimizer,
    build_training_optimizer,
)
from sdxl_ztsnr.optional_packages import installed  # noqa: E402
from sdxl_ztsnr.sdxl_architecture import (  # noqa: E402
    SDXL_TEXT_ENCODER,
    SDXL_TEXT_ENCODER_2,
    SDXL_UNET,
    build_text_encoders,
    build_unet,
    unet_inputs,
)
from sdxl_ztsnr.training import unet_prediction  # noqa: E402

GIB = 2**30
LEARNING_RATE = 1e-6
# gpu_anchor.py's toy UNet: SDXL's structure at toy widths (used by --tiny and --check_autocast).
TINY_UNET = dict(
    SDXL_UNET,
    block_out_channels=(32, 64, 64),
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 1, 1),
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8,
    norm_num_groups=16,
    sample_size=16,
)
# Toy text encoders for TINY_UNET: hidden states 32 + 32 = its cross_attention_dim, pooled 64.
TINY_TEXT_ENCODERS = (
    dict(SDXL_TEXT_ENCODER, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
         projection_dim=32),
    dict(SDXL_TEXT_ENCODER_2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
         projection_dim=64),
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    key: str
    description: str
    batch_size: int
    weights: str = "fp32"  # "bf16": bf16 weights, updated in fp32 and written back with stochastic rounding
    optimizer: str = "adamw"  # adamw (fused) | adamw_foreach | adamw8bit | adafactor
    gradient_checkpointing: bool = False
    fused_backward: bool = False
    lora_rank: int = 0  # > 0: frozen base weights, the trainer's LoRA (sdxl_ztsnr.lora.add_lora), AdamW
    channels_last: bool = True  # on CUDA, as the trainer does (memory-neutral)
    text_encoders: bool = False  # --train_text_encoder: both encoders train too (a LoRA each with lora_rank)
    anchor_gib: float | None = None  # one H200, gpu_anchor.py, 2026-11-26


CONFIGS = [
    Config("ref", "fp32 weights, AdamW foreach (the anchor's ref)", 4, optimizer="adamw_foreach",
           channels_last=False, anchor_gib=66.4),
    Config("ref+gc", "fp32, fused AdamW, gradient checkpointing (anchor fused+gc)", 4,
           gradient_checkpointing=True, anchor_gib=40.0),
    Config("full", "fp32 weights, fused AdamW", 1),
    Config("full+gc", "fp32, fused AdamW, gradient checkpointing", 1, gradient_checkpointing=True),
    Config("bf16+gc", "bf16 weights (stochastic rounding), AdamW, gc", 1, "bf16", gradient_checkpointing=True),
    Config("bf16+fused", "bf16, AdamW, gc, fused backward", 1, "bf16", "adamw", True, True),
    Config("bf16+8bit+fused", "bf16, 8-bit AdamW, gc, fused backward", 1, "bf16", "adamw8bit", True, True),
    Config("bf16+adafactor", "bf16, Adafactor, gc", 1, "bf16", "adafactor", True),
    Config("lowest", "bf16, Adafactor, gc, fused backward", 1, "bf16", "adafactor", True, True),
    Config("lora", "LoRA r32 (attention projections), bf16 base", 1, "bf16", lora_rank=32),
    Config("lora+gc", "LoRA r32, bf16 base, gc", 1, "bf16", gradient_checkpointing=True, lora_rank=32),
    Config("full+gc+te", "fp32, fused AdamW, gc, + both text encoders (fp32)", 1, gradient_checkpointing=True,
           text_encoders=True),
    Config("lora+gc+te", "LoRA r32, bf16 base, gc, + LoRA r32 on both encoders", 1, "bf16",
           gradient_checkpointing=True, lora_rank=32, text_encoders=True),
]  # fmt: skip


class EightBitAdamWLayout(torch.optim.Optimizer):
    """bitsandbytes AdamW8bit's state, for fake tensors: two uint8 moments and one fp32 absmax per 256-value
    block for tensors of at least 4096 values, two fp32 moments below that; updated in place like its kernel.
    """

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    small = p.numel() < 4096
                    dtype = torch.float32 if small else torch.uint8
                    state["state1"] = torch.zeros_like(p, dtype=dtype)
                    state["state2"] = torch.zeros_like(p, dtype=dtype)
                    if not small:
                        blocks = -(-p.numel() // 256)
                        state["absmax1"] = torch.zeros(blocks, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, device=p.device)
                p.add_(p.grad, alpha=-group["lr"])


# The functions of CUDA autocast's fp32 list that the SDXL UNet calls (--check_autocast finds any other).
CUDA_AUTOCAST_FP32 = ("group_norm", "layer_norm", "interpolate")


@contextlib.contextmanager
def cuda_autocast_fp32():
    """Under CPU autocast, run group_norm, layer_norm and interpolate in fp32, as CUDA autocast does.

    Patches those functions in torch.nn.functional (what nn.GroupNorm, nn.LayerNorm and diffusers' Upsample2D
    call), not a TorchFunctionMode: gradient checkpointing recomputes inside backward, where a mode set
    around the step is no longer active.
    """
    functional = torch.nn.functional
    originals = {name: getattr(functional, name) for name in CUDA_AUTOCAST_FP32}

    def fp32(function):
        @functools.wraps(function)
        def wrapper(input, *args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return function(input, *args, **kwargs)

            def cast(value):
                return (
                    value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                )

            with torch.autocast("cpu", enabled=False):
                return function(cast(input), *map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

        return wrapper

    try:
        for name, function in originals.items():
            setattr(functional, name, fp32(function))
        yield
    finally:
        for name, function in originals.items():
            setattr(functional, name, function)


def peak_tracker():
    """torch's MemTracker keeping only the device-wide peak: its per-module peaks, updated after every op for
    every module seen, make a 2.5B-parameter UNet step ~10x slower and are not used here."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class NoHook:
        def remove(self) -> None:
            pass

    class PeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

        def skip_frozen(self, module: torch.nn.Module) -> None:
            """MemTracker hooks every parameter's gradient and fails on frozen ones (LoRA's base weights):
            mark those as hooked already."""
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles[p] = (NoHook(), NoHook())

    return PeakTracker()


# --- one configuration ---------------------------------------------------------------------------------


def fake_parameters_(module: torch.nn.Module, device: torch.device) -> None:
    """Replace every parameter and buffer by an uninitialised one of the same shape, dtype and requires_grad on
    ``device``: fake tensors, called under FakeTensorMode. The model is set up on the meta device before, out
    of fake mode: Module.to (and peft's adapter moves with it) cannot convert fake parameters in place."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                sub._parameters[name] = torch.nn.Parameter(empty, requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def setup_unet(config: Config, unet_config: dict, device: torch.device | str):
    """The UNet as ``config`` sets it up: dtype, LoRA, gradient checkpointing, channels_last on CUDA."""
    unet = build_unet(unet_config, device)
    if config.lora_rank:
        from sdxl_ztsnr.lora import add_lora

        if config.weights == "bf16":  # the trainer's LoRA: fp32 adapter over a bf16 base, under bf16 autocast
            unet.to(torch.bfloat16)
        add_lora(unet, config.lora_rank, under_autocast=True)  # default targets: attention projections
    elif config.weights == "bf16":
        unet.to(torch.bfloat16)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.channels_last and torch.device(device).type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return unet


def setup_text_encoders(config: Config, text_configs: tuple, device: torch.device | str) -> list:
    """Both text encoders as --train_text_encoder trains them (none unless ``config.text_encoders``)."""
    if not config.text_encoders:
        return []
    from sdxl_ztsnr.text_encoder_training import add_text_encoder_lora, unread_modules

    encoders = build_text_encoders(text_configs, device)
    for index, encoder in enumerate(encoders):
        skip = unread_modules(encoder) if index == 0 else []
        if config.lora_rank:
            encoder.to(torch.bfloat16)  # the frozen base in the autocast dtype, the adapter fp32
            add_text_encoder_lora(encoder, config.lora_rank, None, 0.0, skip)
        else:
            for name in skip:
                encoder.get_submodule(name).requires_grad_(False)
        encoder.train()
        if config.gradient_checkpointing:
            encoder.activation_checkpointing_enable({"use_reentrant": False})
    return encoders


def text_conditioning(encoders: list, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77, C1+C2), pooled (B, P)) of one chunk, as sdxl_ztsnr.text_encoding computes them."""
    first = encoders[0](token_ids, output_hidden_states=True)
    second = encoders[1](token_ids, output_hidden_states=True)
    hidden = [first.hidden_states[-2], second.hidden_states[-2]]
    return torch.cat([h.to(hidden[0].dtype) for h in hidden], dim=-1), second.text_embeds


def build_optimizer_for(config: Config, unet: torch.nn.Module, device: torch.device, fake: bool, encoders=()):
    """The optimizer ``config`` names, over the trainable parameters (a FusedBackward comes not yet attached)."""
    params = [p for model in (unet, *encoders) for p in model.parameters() if p.requires_grad]
    bf16_update = "stochastic" if config.weights == "bf16" and not config.lora_rank else None
    if config.optimizer == "adamw_foreach":
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, foreach=True)
    elif config.optimizer == "adamw8bit" and fake:
        layout = functools.partial(EightBitAdamWLayout, lr=LEARNING_RATE)
        kind = FusedBackward if config.fused_backward else PerParameterOptimizer
        optimizer = kind(params, layout, None, bf16_update)
    else:
        optimizer = build_training_optimizer(
            params,
            config.optimizer,
            LEARNING_RATE,
            device_type=device.type,
            fused_backward=config.fused_backward,
            bf16_update=bf16_update,
        )
    return optimizer


def training_step(unet, optimizer, inputs: dict, autocast_device: str, encoders=()) -> None:
    """bf16 autocast forward (inputs cast to the UNet's dtype, as the trainer does), MSE, backward, step; with
    ``encoders`` the text is encoded inside the step, with gradients."""
    with torch.autocast(autocast_device, dtype=torch.bfloat16):
        embeds, pooled = inputs["prompt_embeds"], inputs["pooled_prompt_embeds"]
        if encoders:
            embeds, pooled = text_conditioning(encoders, inputs["token_ids"])
        prediction = unet_prediction(
            unet, inputs["latents"], inputs["timesteps"], embeds.float(), pooled.float(), inputs["time_ids"]
        )
    loss = torch.nn.functional.mse_loss(prediction.float(), inputs["latents"].float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "optimizers", [optimizer]))


def token_ids(batch_size: int, device: torch.device | str) -> torch.Tensor:
    """(B, 77) token ids of one prompt chunk."""
    return torch.randint(0, 49408, (batch_size, 77), device=device)


def estimate(
    config: Config,
    unet_config: dict,
    resolution: int,
    text_configs: tuple = (SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2),
) -> dict[str, float]:
    """Peak GiB of one steady-state step on fake tensors, total and by MemTracker's categories."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device("cpu")
    unet = setup_unet(config, unet_config, "meta")  # set up outside fake mode: see fake_parameters_
    encoders = setup_text_encoders(config, text_configs, "meta")
    with FakeTensorMode():
        fake_parameters_(unet, device)
        for encoder in encoders:
            fake_parameters_(encoder, device)
        optimizer = build_optimizer_for(config, unet, device, fake=True, encoders=encoders)
        inputs = unet_inputs(unet_config, config.batch_size, resolution, device)
        if encoders:
            inputs["token_ids"] = token_ids(config.batch_size, device)
        params = [p for model in (unet, *encoders) for p in model.parameters() if p.requires_grad]
        for p in params:  # create the optimizer state: the tracked step is then the steady state
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(optimizer, FusedBackward):
            optimizer.attach()
        tracker = peak_tracker()
        for model in (unet, *encoders):
            tracker.skip_frozen(model)
        compensation = [c for c in getattr(optimizer, "compensation", []) if c is not None]
        tracker.track_external(unet, *encoders, *inner_optimizers(optimizer), *inputs.values(), *compensation)
        with tracker, cuda_autocast_fp32():
            training_step(unet, optimizer, inputs, "cpu", encoders)
        snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {(k if isinstance(k, str) else k.value): v / GIB for k, v in snapshot.items()}


def measure(
    config: Config,
    unet_config: dict,
    resolution: int,
    steps: int = 3,
    text_configs: tuple = (SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2),
) -> float:
    """torch.cuda.max_memory_allocated over ``steps`` real steps (from before the first), in GiB."""
    device = torch.device("cuda")
    unet = setup_unet(config, unet_config, device)
    encoders = setup_text_encoders(config, text_configs, device)
    optimizer = build_optimizer_for(config, unet, device, fake=False, encoders=encoders)
    if isinstance(optimizer, FusedBackward):
        optimizer.attach()
    inputs = unet_inputs(unet_config, config.batch_size, resolution, device)
    if encoders:
        inputs["token_ids"] = token_ids(config.batch_size, device)
    if config.channels_last:
        inputs["latents"] = inputs["latents"].contiguous(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        training_step(unet, optimizer, inputs, "cuda", encoders)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    if isinstance(optimizer, FusedBackward):
        optimizer.detach()
    del unet, optimizer, inputs, encoders
    gc.collect()
    torch.cuda.empty_cache()
    return peak


# --- the autocast emulation, checked op by op ------------------------------------------------------------


class RecordDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """(op, output dtypes) of every aten op, attention kernels and device queries left out."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "attention" not in name and not name.startswith("prim."):
            flat = out if isinstance(out, (tuple, list)) else (out,)
            self.ops.append((name, tuple(t.dtype for t in flat if isinstance(t, torch.Tensor))))
        return out


def forward_dtypes(unet_config: dict, device: str) -> list[tuple[str, tuple]]:
    """Op dtypes of one bf16-autocast forward on fake tensors: CUDA's own autocast on "cuda" (switched on
    below the Python API, which refuses without a CUDA runtime), the emulation on "cpu"."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        # Fake CUDA tensors cannot ask the device which kernel fits; name one (dtypes are all this compares).
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, scale=scale)[0]

    with FakeTensorMode():
        unet = build_unet(unet_config, device)
        inputs = unet_inputs(unet_config, 1, 128, device)
        recorder = RecordDtypes()
        if device == "cuda":
            original = torch.nn.functional.scaled_dot_product_attention
            torch.nn.functional.scaled_dot_product_attention = flash
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            torch.set_autocast_enabled("cuda", True)
            torch.autocast_increment_nesting()
            try:
                with recorder:
                    unet_prediction(unet, *(inputs[k] for k in ("latents", "timesteps", "prompt_embeds")),
                                    inputs["pooled_prompt_embeds"], inputs["time_ids"])  # fmt: skip
            finally:
                torch.autocast_decrement_nesting()
                torch.set_autocast_enabled("cuda", False)
                torch.clear_autocast_cache()
                torch.nn.functional.scaled_dot_product_attention = original
        else:
            with cuda_autocast_fp32(), torch.autocast("cpu", dtype=torch.bfloat16), recorder:
                unet_prediction(unet, *(inputs[k] for k in ("latents", "timesteps", "prompt_embeds")),
                                inputs["pooled_prompt_embeds"], inputs["time_ids"])  # fmt: skip
    return recorder.ops


def check_autocast(unet_config: dict) -> bool:
    """Print whether every op of a UNet forward gets the same output dtypes under the emulation as under CUDA."""
    cuda, cpu = forward_dtypes(unet_config, "cuda"), forward_dtypes(unet_config, "cpu")
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(cuda, cpu, strict=False)) if a != b]
    print(
        f"autocast emulation: {len(cpu)} ops on CPU, {len(cuda)} under CUDA autocast, {len(mismatches)} differ"
    )
    for index, a, b in mismatches[:10]:
        print(f"  op {index}: CUDA {a}  emulated {b}")
    return not mismatches and len(cuda) == len(cpu)


# --- table -----------------------------------------------------------------------------------------------


def print_table(rows: list[dict], title: str, unit: str = "GiB") -> None:
    """est/meas uses the measured column, or (marked *) the H200 anchor where this call measured nothing."""
    scale = 1024 if unit == "MiB" else 1
    rows = [
        {
            k: (v * scale if k in ("estimate_GiB", "measured_GiB", "anchor_GiB") and v else v)
            for k, v in r.items()
        }
        for r in rows
    ]
    print(f"\n{title}\n")
    width = max(len(r["description"]) for r in rows)
    print(
        f"| key             | {'configuration':<{width}} | batch | estimate GiB | measured GiB | est/meas |"
    )
    print(f"|-----------------|{'-' * (width + 2)}|-------|--------------|--------------|----------|")
    for r in rows:
        est, meas = r.get("estimate_GiB"), r.get("measured_GiB")
        if meas is None and r.get("anchor_GiB") is not None:
            meas, note = r["anchor_GiB"], "*"
        else:
            note = " "
        ratio = f"{est / meas:8.3f}" if est is not None and meas else "       —"
        shown_est = f"{est:12.1f}" if est is not None else "           —"
        shown_meas = f"{meas:11.1f}{note}" if meas is not None else "           —"
        print(
            f"| {r['key']:<15} | {r['description']:<{width}} | {r['batch']:5d} | {shown_est} | {shown_meas} | {ratio} |"
        )
    if any(r.get("measured_GiB") is None and r.get("anchor_GiB") is not None for r in rows):
        print("\n* measured: the H200 anchor (gpu_anchor.py, 2026-11-26), not this call")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="all", help="comma-separated keys, or 'all'")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (128 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="toy UNet (checks this script; not SDXL figures)")
    parser.add_argument("--no_estimate", action="store_true", help="skip the fake-tensor estimate")
    parser.add_argument("--no_measure", action="store_true", help="skip the CUDA measurement")
    parser.add_argument(
        "--estimates", default=None, help="with --no_estimate: take the estimates from this --json file"
    )
    parser.add_argument(
        "--check_autocast", action="store_true", help="compare the emulation with CUDA's autocast"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="append one JSON line per configuration to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet_config = TINY_UNET if args.tiny else SDXL_UNET
    text_configs = TINY_TEXT_ENCODERS if args.tiny else (SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2)
    resolution = args.resolution or (128 if args.tiny else 1024)
    if args.check_autocast:
        raise SystemExit(0 if check_autocast(unet_config) else 1)
    keys = [c.key for c in CONFIGS] if args.configs == "all" else args.configs.split(",")
    unknown = sorted(set(keys) - {c.key for c in CONFIGS})
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {[c.key for c in CONFIGS]}")
    measure_here = torch.cuda.is_available() and not args.no_measure
    earlier = {}
    if args.estimates and args.no_estimate:
        for line in Path(args.estimates).read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("resolution") == resolution and "estimate_GiB" in record:
                earlier[record["key"]] = record["estimate_GiB"]
    rows = []
    for config in (c for c in CONFIGS if c.key in keys):
        row = dict(key=config.key, description=config.description, batch=config.batch_size)
        if not args.tiny:
            row["anchor_GiB"] = config.anchor_gib
        if config.key in earlier:
            row["estimate_GiB"] = earlier[config.key]
        if not args.no_estimate:
            start = time.perf_counter()
            breakdown = estimate(config, unet_config, resolution, text_configs)
            row["estimate_GiB"] = breakdown["Total"]
            row["estimate_breakdown_GiB"] = {k: round(v, 3) for k, v in breakdown.items() if v}
            row["estimate_s"] = round(time.perf_counter() - start, 1)
        if measure_here and config.optimizer == "adamw8bit" and not installed("bitsandbytes"):
            print(f"{config.key}: not measured (bitsandbytes is not installed)")
        elif measure_here:
            row["measured_GiB"] = measure(config, unet_config, resolution, text_configs=text_configs)
        rows.append(row)
        shown = {
            k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "description"
        }
        print(json.dumps(shown), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(
                    json.dumps(dict(row, what="memory", resolution=resolution, config=asdict(config))) + "\n"
                )
    model = "toy UNet" if args.tiny else "SDXL UNet (2.567B params, random init)"
    where = torch.cuda.get_device_name() if measure_here else "no GPU: measured column empty"
    title = f"peak memory of one training step: {model}, {resolution}², bf16 autocast; {where}"
    print_table(rows, title, "MiB" if args.tiny else "GiB")
    errors = [
        r["estimate_GiB"] / r["anchor_GiB"] - 1 for r in rows if r.get("anchor_GiB") and "estimate_GiB" in r
    ]
    if errors:
        print("estimator error against the H200 anchors: " + ", ".join(f"{100 * e:+.1f}%" for e in errors))


if __name__ == "__main__":
    main()
