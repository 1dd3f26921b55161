"""--attention_backend: the SDPA kernel contexts, the start-up check for kernels this machine lacks, and the
xformers fallback (one warning, PyTorch's SDPA) when xformers is missing or unusable."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdxl_ztsnr.attention import attention_context, check_attention_backend, configure_attention


class RecordOps(TorchDispatchMode):
    """Names of the aten ops run inside the context."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


FUSED_CPU_KERNEL = "aten._scaled_dot_product_flash_attention_for_cpu.default"
FUSED_CPU_BACKWARD = "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"


@pytest.fixture(scope="module")
def unet_and_batch(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    from sdxl_ztsnr.sdxl_architecture import unet_inputs

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    return unet, unet_inputs(config, 1, 64)


def predict(unet, batch) -> torch.Tensor:
    return unet(
        batch["latents"],
        batch["timesteps"],
        batch["prompt_embeds"],
        added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
    ).sample


def test_math_backend_runs_the_unet_without_the_fused_kernel(unet_and_batch):
    unet, batch = unet_and_batch
    with torch.no_grad(), RecordOps() as default_ops:
        expected = predict(unet, batch)
    with torch.no_grad(), attention_context("math"), RecordOps() as math_ops:
        got = predict(unet, batch)
    assert FUSED_CPU_KERNEL in default_ops.names  # torch's own choice on CPU
    assert FUSED_CPU_KERNEL not in math_ops.names
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_checkpoint_recomputation_needs_the_context_around_backward(unet_and_batch):
    """Gradient checkpointing recomputes attention inside backward: outside the context torch picks another
    kernel there, and checkpointing refuses the mismatch. Inside it, backward uses the forced kernel too."""
    from torch.utils.checkpoint import CheckpointError

    unet, batch = unet_and_batch
    unet.enable_gradient_checkpointing()
    try:
        with attention_context("math"):
            prediction = predict(unet, batch)
        with pytest.raises(CheckpointError):
            prediction.mean().backward()
        unet.zero_grad(set_to_none=True)
        with attention_context("math"):
            prediction = predict(unet, batch)
            with RecordOps() as inside:
                prediction.mean().backward()
    finally:
        unet.zero_grad(set_to_none=True)
        unet.disable_gradient_checkpointing()
    assert FUSED_CPU_KERNEL not in inside.names and FUSED_CPU_BACKWARD not in inside.names
    assert "aten._softmax_backward_data.default" in inside.names


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_a_cuda_only_kernel_on_cpu_is_a_clear_startup_error(backend):
    with pytest.raises(ValueError, match=rf"--attention_backend {backend}: .*cpu.*--attention_backend auto"):
        configure_attention(torch.nn.Linear(2, 2), backend, "cpu", torch.bfloat16)


@pytest.mark.parametrize("backend", ["auto", "math", "flash"])
def test_kernels_cpu_has_are_accepted(backend):
    assert configure_attention(torch.nn.Linear(2, 2), backend, "cpu", torch.float32) == backend
    check_attention_backend(backend, "cpu", torch.bfloat16)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        attention_context("sage")
    with pytest.raises(ValueError, match="choose one of"):
        configure_attention(torch.nn.Linear(2, 2), "sage", "cpu", torch.float32)


def test_missing_xformers_warns_once_and_uses_sdpa(unet_and_batch, monkeypatch):
    import diffusers.utils

    unet, _ = unet_and_batch
    monkeypatch.setattr(diffusers.utils, "is_xformers_available", lambda: False)
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    warnings: list[str] = []
    assert configure_attention(unet, "xformers", "cpu", torch.float32, warn=warnings.append) == "auto"
    assert len(warnings) == 1 and "not installed" in warnings[0] and "\n" not in warnings[0]
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors


def test_unusable_xformers_warns_once_and_uses_sdpa(monkeypatch):
    import diffusers.utils

    class NoXformers(torch.nn.Module):
        def enable_xformers_memory_efficient_attention(self):
            raise ValueError("xformers' memory efficient attention is only available for GPU\nmore detail")

    monkeypatch.setattr(diffusers.utils, "is_xformers_available", lambda: True)
    warnings: list[str] = []
    assert configure_attention(NoXformers(), "xformers", "cpu", torch.float32, warn=warnings.append) == "auto"
    assert warnings == [
        "xformers is not usable here (xformers' memory efficient attention is only available for GPU): "
        "using PyTorch's scaled_dot_product_attention"
    ]
