"""The training loss against a hand computation, the weighting guard, and the non-finite step skip."""

import math

import pytest
import torch

from sdxl_ztsnr.losses import noise_batch, weighted_loss
from sdxl_ztsnr.optimizers import (
    build_optimizer,
    clear_nonfinite_mark,
    clip_and_check_gradients,
    mark_nonfinite_step,
)
from sdxl_ztsnr.schedule import alphas_cumprod, loss_weights


def test_loss_equals_hand_computed_value():
    # Two 1×1×1×2 "latents" at t = 0 and t = 999 under ZTSNR σ_max = 20000.
    alpha_bar = alphas_cumprod()
    x0 = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 2.0]]]])
    noise = torch.tensor([[[[0.0, 1.0]]], [[[1.0, -1.0]]]])
    timesteps = torch.tensor([0, 999])
    prediction = torch.zeros_like(x0)
    batch = noise_batch(x0, noise, timesteps, alpha_bar)
    sample_weights = torch.tensor([2.0, 0.5])
    loss, mse = weighted_loss(prediction, batch, "min_snr", 5.0, sample_weights)

    a0, a1 = alpha_bar[0].item(), alpha_bar[999].item()
    v0 = [math.sqrt(a0) * n - math.sqrt(1 - a0) * x for x, n in ((1.0, 0.0), (-1.0, 1.0))]
    v1 = [math.sqrt(a1) * n - math.sqrt(1 - a1) * x for x, n in ((0.5, 1.0), (2.0, -1.0))]
    mse0 = (v0[0] ** 2 + v0[1] ** 2) / 2
    mse1 = (v1[0] ** 2 + v1[1] ** 2) / 2
    w0 = min(1.0, 5.0 * (1 - a0))  # t=0: SNR ≈ 1175 → 5/(SNR+1) ≈ 0.00425
    w1 = 1.0  # pure noise: guarded weight 1
    expected = (mse0 * w0 * 2.0 + mse1 * w1 * 0.5) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert mse.tolist() == pytest.approx([mse0, mse1], rel=1e-5)
    # at the pure-noise step the target is −x₀, so the MSE of a zero prediction is mean(x₀²)
    assert mse1 == pytest.approx((0.25 + 4.0) / 2, rel=1e-4)


def test_default_weighting_trains_the_pure_noise_step():
    alpha_bar = alphas_cumprod(sigma_max=20000.0)
    terminal = alpha_bar[-1:]
    assert 0.5 < loss_weights(terminal).item() <= 1.0  # default: order 1
    assert loss_weights(terminal, "min_snr_unguarded").item() < 1e-8  # textbook: ~2.5e-9


def test_epsilon_ablation_uses_noise_target_and_uniform_weights():
    alpha_bar = alphas_cumprod(ztsnr=False)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    batch = noise_batch(x0, noise, torch.tensor([0, 500, 999]), alpha_bar, "epsilon")
    torch.testing.assert_close(batch.target, noise)
    loss, mse = weighted_loss(torch.zeros_like(x0), batch)
    assert loss.item() == pytest.approx(mse.mean().item(), rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_step_is_skipped_on_device(bad):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model.parameters(), "adamw", 1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}

    (model(torch.randn(2, 4)).sum() * bad).backward()
    flag = mark_nonfinite_step(optimizer, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    assert optimizer.found_inf.item() == 1.0  # the kernel skips it
    optimizer.step()
    clear_nonfinite_mark(optimizer)
    optimizer.zero_grad()
    assert flag.item() == 1.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in optimizer.state[model.weight].items():
        assert torch.equal(value, moments[key]), key

    model(torch.randn(2, 4)).sum().backward()
    flag = mark_nonfinite_step(optimizer, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    # On the CPU a good step does not hand the kernel a found_inf of 0 (nor its per-tensor step rollback).
    assert not hasattr(optimizer, "found_inf")
    optimizer.step()
    assert flag.item() == 0.0
    assert not torch.equal(model.weight, before["weight"])
    assert optimizer.state[model.weight]["step"].item() == 2


@pytest.mark.parametrize("max_norm", [0.05, 1e6, math.inf])
def test_clip_factor_in_the_fused_kernel_equals_clipping_first(max_norm):
    from accelerate import Accelerator

    def trained(clip_in_kernel: bool) -> dict:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
        parameters = list(model.parameters())
        optimizer = build_optimizer(parameters, "adamw", 1e-2)
        accelerator = Accelerator(cpu=True)
        for step in range(3):
            (model(torch.randn(5, 8, generator=torch.Generator().manual_seed(step))) ** 2).sum().backward()
            if clip_in_kernel:
                flag = clip_and_check_gradients(accelerator, optimizer, parameters, max_norm)
                assert flag.item() == 0.0
                assert hasattr(optimizer, "grad_scale") == math.isfinite(max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            optimizer.step()
            clear_nonfinite_mark(optimizer)
            optimizer.zero_grad()
        assert not hasattr(optimizer, "grad_scale")
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, in_kernel = trained(False), trained(True)
    for key in first:
        torch.testing.assert_close(in_kernel[key], first[key], rtol=1e-6, atol=1e-7)


def test_clip_and_check_skips_a_non_finite_step():
    from accelerate import Accelerator

    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model.parameters(), "adamw", 1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (model(torch.randn(2, 4)).sum() * float("nan")).backward()
    flag = clip_and_check_gradients(Accelerator(cpu=True), optimizer, list(model.parameters()), 1.0)
    optimizer.step()
    clear_nonfinite_mark(optimizer)
    assert flag.item() == 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
