"""Optimizers: Adafactor settings, bf16 stochastic rounding / compensated updates, the fused backward pass
(same weights as the ordinary step, exact resume, non-finite skips, per-parameter clipping) and its refusals."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.optimizers import (
    FusedBackward,
    PerParameterOptimizer,
    build_optimizer,
    build_training_optimizer,
    check_fused_backward,
    check_optimizer_name,
    check_per_parameter_optimizer,
    compensated_value,
    fused_backward_clipping_note,
    global_grad_norm,
    kahan_update_,
    optimizer_class,
    parse_optimizer_args,
    stochastic_round_,
)
from sdxl_ztsnr.optional_packages import installed

needs_bitsandbytes = pytest.mark.skipif(not installed("bitsandbytes"), reason="bitsandbytes is not installed")
needs_prodigy = pytest.mark.skipif(not installed("prodigyopt"), reason="prodigyopt is not installed")


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second OpenMP thread only adds barrier waits on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A conv (4-D weight: Adafactor factors its last two dims), a norm and two linears."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.GroupNorm(2, 8),
        torch.nn.SiLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 4),
    )
    return model.to(dtype)


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 6, 6, generator=generator), torch.randn(4, 4, generator=generator))
        for _ in range(count)
    ]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data) -> None:
    """Forward, MSE, backward, step, zero_grad: the trainer's order (a fused optimizer steps inside backward)."""
    dtype = next(model.parameters()).dtype
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def make(name: str, lr: float = 1e-2):
    return functools.partial(build_optimizer, name=name, learning_rate=lr, weight_decay=1e-2)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


# --- build_optimizer ------------------------------------------------------------------------------------


def test_adafactor_is_set_up_with_a_fixed_learning_rate():
    optimizer = build_optimizer(small_model().parameters(), "adafactor", 3e-6, weight_decay=0.0)
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == "Adafactor"
    assert group["lr"] == 3e-6
    assert not group["relative_step"] and not group["scale_parameter"] and not group["warmup_init"]
    assert group["beta1"] is None  # no first moment: the memory saving is the point


def test_unknown_optimizer_is_refused():
    with pytest.raises(UserError, match="adafactor") as error:
        build_optimizer(small_model().parameters(), "nosuchoptimizer", 1e-3)
    assert "\n" not in str(error.value)


# --- bf16 rounding --------------------------------------------------------------------------------------


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each fp32 value (towards -inf and +inf)."""
    nearest = x.to(torch.bfloat16).float()
    up = torch.nextafter(nearest.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16)).float()
    down = torch.nextafter(
        nearest.to(torch.bfloat16), torch.tensor(float("-inf"), dtype=torch.bfloat16)
    ).float()
    low = torch.where(nearest <= x, nearest, down)
    high = torch.where(nearest >= x, nearest, up)
    return low, high


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    generator = torch.Generator().manual_seed(0)
    source = torch.cat([torch.randn(64) * 10 ** torch.linspace(-3, 3, 64), -torch.rand(64), torch.rand(64)])
    draws = 20000
    repeated = source.repeat(draws, 1)
    rounded = torch.empty_like(repeated, dtype=torch.bfloat16)
    stochastic_round_(rounded, repeated, generator)
    low, high = bf16_neighbours(source)
    values = rounded.float()
    assert bool(((values == low) | (values == high)).all())
    # Mean of the draws converges to the fp32 value: within 5 standard errors of a two-point distribution.
    p = ((source - low) / (high - low)).nan_to_num(0.0)
    standard_error = (high - low) * (p * (1 - p)).sqrt() / draws**0.5
    assert bool(((values.mean(0) - source).abs() <= 5 * standard_error + 1e-12).all())
    # Exactly representable values never move.
    exact = source.to(torch.bfloat16).float()
    again = torch.empty_like(exact, dtype=torch.bfloat16)
    assert torch.equal(stochastic_round_(again, exact, generator).float(), exact)


def test_stochastic_rounding_rejects_wrong_dtypes():
    with pytest.raises(ValueError, match="bfloat16"):
        stochastic_round_(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="float32"):
        stochastic_round_(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.float64))


def test_a_tiny_update_survives_stochastic_rounding_and_compensation_but_not_nearest():
    """1e-4 per step on weights of 1.0: below half a bf16 step (2**-8), so round-to-nearest never moves."""
    generator = torch.Generator().manual_seed(0)
    steps, step_size = 200, 1e-4
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    stochastic = torch.ones(4096, dtype=torch.bfloat16)
    kahan, compensation = torch.ones(4096, dtype=torch.bfloat16), torch.zeros(4096, dtype=torch.bfloat16)
    for _ in range(steps):
        nearest.copy_(nearest.float() + step_size)
        stochastic_round_(stochastic, stochastic.float() + step_size, generator)
        kahan_update_(kahan, compensation, compensated_value(kahan, compensation) + step_size)
    total = steps * step_size  # 0.02
    assert bool((nearest == 1.0).all())  # the whole update lost
    assert abs(stochastic.float().mean().item() - 1.0 - total) < 0.05 * total  # on average
    # Each element keeps the update to ~16 bits (the bf16 compensation rounds too).
    assert float((compensated_value(kahan, compensation) - 1.0 - total).abs().max()) < 0.05 * total


# --- fused backward pass ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "adafactor", "adamw8bit"])
def test_fused_backward_trains_the_same_weights_as_the_ordinary_step(name):
    if name == "adamw8bit" and not installed("bitsandbytes"):
        pytest.skip("bitsandbytes is not installed")
    reference, fused_model = small_model(), small_model()
    data = batches(5)
    train(reference, make(name)(reference.parameters()), data)
    fused = FusedBackward(fused_model.parameters(), make(name)).attach()
    train(fused_model, fused, data)
    assert_same_weights(reference, fused_model, atol=1e-5)
    assert not any(p.grad is not None for p in fused_model.parameters())  # freed inside backward
    assert not torch.equal(reference[0].weight, small_model()[0].weight)  # it did train


def test_fused_backward_on_the_tiny_sdxl_unet_matches_the_ordinary_step(tiny_sdxl):
    """With gradient checkpointing on the fused side: the lowest-memory combination."""
    from diffusers import UNet2DConditionModel

    from sdxl_ztsnr.sdxl_architecture import unet_inputs

    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    fused_unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    fused_unet.enable_gradient_checkpointing()  # the hooks also fire for gradients of recomputed blocks
    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    inputs = [unet_inputs(config, 1, 64) for _ in range(2)]

    def run(unet, optimizer):
        for batch in inputs:
            prediction = unet(
                batch["latents"],
                batch["timesteps"],
                batch["prompt_embeds"],
                added_cond_kwargs={
                    "text_embeds": batch["pooled_prompt_embeds"],
                    "time_ids": batch["time_ids"],
                },
            ).sample
            torch.nn.functional.mse_loss(prediction, batch["latents"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    run(reference, build_optimizer(reference.parameters(), "adamw", 1e-3))
    run(
        fused_unet,
        build_training_optimizer(fused_unet.parameters(), "adamw", 1e-3, fused_backward=True).attach(),
    )
    assert_same_weights(reference, fused_unet, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "dtype", "bf16_update"),
    [
        ("adamw", torch.float32, None),
        ("adafactor", torch.float32, None),
        ("adafactor", torch.bfloat16, "stochastic"),
        ("adamw", torch.bfloat16, "kahan"),
    ],
)
def test_fused_backward_resumes_exactly(name, dtype, bf16_update):
    data = batches(6)
    model = small_model(dtype=dtype)
    optimizer = FusedBackward(model.parameters(), make(name), bf16_update=bf16_update, seed=3).attach()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for batch in data[:3]:
        train(model, optimizer, [batch])
        scheduler.step()
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    saved_scheduler = scheduler.state_dict()
    for batch in data[3:]:
        train(model, optimizer, [batch])
        scheduler.step()

    resumed = small_model(seed=9, dtype=dtype)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = FusedBackward(resumed.parameters(), make(name), bf16_update=bf16_update, seed=3)
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda step: 1.0 / (1 + step))
    resumed_optimizer.load_state_dict(saved_optimizer)
    resumed_scheduler.load_state_dict(saved_scheduler)
    resumed_optimizer.attach()
    for batch in data[3:]:
        train(resumed, resumed_optimizer, [batch])
        resumed_scheduler.step()
    assert_same_weights(model, resumed, atol=0.0)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 7)


def test_scheduler_drives_every_parameters_learning_rate():
    optimizer = FusedBackward(small_model().parameters(), make("adafactor", lr=1.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert [inner.param_groups[0]["lr"] for inner in optimizer.optimizers] == [0.125] * len(
        optimizer.optimizers
    )


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_a_nonfinite_gradient_skips_that_parameter_and_is_counted(name):
    model = small_model()
    optimizer = FusedBackward(model.parameters(), make(name)).attach()
    train(model, optimizer, batches(2))  # state exists from here
    assert optimizer.pop_nonfinite_flag().item() == 0.0
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(optimizer.optimizers[0].state_dict())
    poison = model[0].weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    train(model, optimizer, batches(1, seed=5))
    poison.remove()
    assert torch.equal(model[0].weight, before["0.weight"])  # skipped, state too
    inner_state = optimizer.optimizers[0].state_dict()["state"][0]
    for key, value in state_before["state"][0].items():
        if torch.is_tensor(value):
            assert torch.equal(inner_state[key], value), key
    assert not torch.equal(model[4].weight, before["4.weight"])  # the others trained
    assert optimizer.skipped_updates.item() == 1
    assert optimizer.pop_nonfinite_flag().item() == 1.0
    assert optimizer.pop_nonfinite_flag().item() == 0.0
    train(model, optimizer, batches(1, seed=6))
    assert bool(torch.isfinite(model[0].weight).all())


def test_a_nonfinite_first_update_leaves_no_state():
    model = small_model()
    optimizer = FusedBackward(model.parameters(), make("adafactor")).attach()
    before = model[0].weight.detach().clone()
    poison = model[0].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    train(model, optimizer, batches(1))
    poison.remove()
    assert torch.equal(model[0].weight, before)
    assert not optimizer.optimizers[0].state
    train(model, optimizer, batches(1, seed=3))
    assert bool(torch.isfinite(model[0].weight).all()) and not torch.equal(model[0].weight, before)


def test_per_parameter_clipping_bounds_each_update():
    model = small_model()
    start = copy.deepcopy(model.state_dict())
    sgd = functools.partial(torch.optim.SGD, lr=1.0)  # the update is the clipped gradient itself
    FusedBackward(model.parameters(), sgd, max_grad_norm_per_param=1e-3).attach()
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x * 100), y).backward()  # large gradients
    for name, p in model.named_parameters():
        assert (p.detach() - start[name]).norm().item() <= 1e-3 * (1 + 1e-4), name
    assert fused_backward_clipping_note(1.0) is not None and "each parameter" in fused_backward_clipping_note(
        1.0
    )
    assert fused_backward_clipping_note(0.0) is None


def test_bf16_weights_train_with_the_ordinary_step():
    model = small_model(dtype=torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    optimizer = build_training_optimizer(model.parameters(), "adafactor", 1e-2, bf16_update="stochastic")
    assert isinstance(optimizer, PerParameterOptimizer) and not isinstance(optimizer, FusedBackward)
    train(model, optimizer, batches(2))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # Inner state stays fp32 although the weights are bf16.
    state = optimizer.optimizers[-2].state[optimizer.shadows[-2]]
    assert state["exp_avg_sq_row"].dtype == torch.float32


def test_plain_optimizer_when_no_thrift_is_asked_for():
    optimizer = build_training_optimizer(small_model().parameters(), "adamw", 1e-3)
    assert type(optimizer) is torch.optim.AdamW


@pytest.mark.parametrize(
    ("accumulation", "processes", "precision", "match"),
    [(4, 1, "bf16", "gradient_accumulation_steps 1"), (1, 2, "bf16", "DDP"), (1, 1, "fp16", "bf16")],
)
def test_fused_backward_refuses_what_it_cannot_do(accumulation, processes, precision, match):
    with pytest.raises(ValueError, match=match):
        check_fused_backward(accumulation, processes, precision)


def test_fused_backward_accepts_one_process_without_accumulation():
    check_fused_backward(1, 1, "bf16")
    check_fused_backward(1, 1, "no")


def test_resume_with_other_trainable_parameters_is_refused():
    optimizer = FusedBackward(small_model().parameters(), make("adamw"))
    smaller = FusedBackward(list(small_model().parameters())[:2], make("adamw"))
    with pytest.raises(ValueError, match="same trainable parameters"):
        smaller.load_state_dict(optimizer.state_dict())


def test_fused_backward_under_accelerate_resumes_from_save_state(tmp_path):
    """The trainer's path: accelerate.prepare(model, optimizer, scheduler), save_state, load_state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def run(resume_from=None, save_to=None):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        model = small_model(dtype=torch.bfloat16)
        optimizer = build_training_optimizer(
            model.parameters(), "adafactor", 1e-2, fused_backward=True, bf16_update="stochastic", seed=1
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        optimizer.optimizer.attach()
        data = batches(4)
        if resume_from:
            accelerator.load_state(resume_from)
            data = data[2:]
        for index, batch in enumerate(data):
            train(model, optimizer, [batch])
            scheduler.step()
            if save_to and index == 1:
                accelerator.save_state(save_to)
        return model, optimizer

    unbroken, optimizer = run(save_to=tmp_path / "state")
    resumed, resumed_optimizer = run(resume_from=tmp_path / "state")
    assert_same_weights(unbroken, resumed, atol=0.0)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    assert optimizer.optimizer.skipped_updates.item() == 0


def test_global_grad_norm_equals_torchs_total_norm_over_small_large_and_mixed_dtype_gradients():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3,), (64, 64, 3, 3), (4096,), (4097,), (320,), (77, 2048), (1,)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16] * 3  # bf16 weights have bf16 gradients
    parameters = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in zip(shapes, dtypes, strict=False)]
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape, generator=generator).to(parameter.dtype)
    parameters.append(torch.nn.Parameter(torch.zeros(5)))  # no gradient: left out
    parameters[1].grad = parameters[1].grad.transpose(0, 1)  # not contiguous
    expected = torch.nn.utils.get_total_norm([p.grad.float() for p in parameters if p.grad is not None])
    norm = global_grad_norm(parameters)
    assert norm.dtype == torch.float32 and norm.shape == ()
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("where", [0, 1])  # a small gradient (flattened with others) or a large one
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_global_grad_norm_is_not_finite_when_one_gradient_is_not(where, bad):
    parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(16,), (128, 128), (8,)]]
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    parameters[where].grad[3] = bad
    assert not torch.isfinite(global_grad_norm(parameters))


# --- any optimizer by name, --optimizer_args, Prodigy -----------------------------------------------------


def test_optimizer_args_are_python_literals():
    parsed = parse_optimizer_args(
        ["weight_decay=0.01", "d_coef=2", "decouple=True", "safeguard_warmup=false", "betas=0.9,0.99"]
        + ["beta3=None", "mode=cosine", "eps='1e-8'"]
    )
    assert parsed == {
        "weight_decay": 0.01,
        "d_coef": 2,
        "decouple": True,
        "safeguard_warmup": False,
        "betas": (0.9, 0.99),
        "beta3": None,
        "mode": "cosine",
        "eps": "1e-8",
    }
    assert type(parsed["d_coef"]) is int and type(parsed["weight_decay"]) is float
    with pytest.raises(UserError, match="key=value"):
        parse_optimizer_args(["weight_decay"])
    with pytest.raises(UserError, match="key=value"):
        parse_optimizer_args(["=3"])


@pytest.mark.parametrize("name", ["SGD", "sgd", "torch.optim.SGD"])
def test_torch_optimizers_by_name_take_lr_and_optimizer_args(name):
    optimizer = build_optimizer(
        small_model().parameters(), name, 0.05, optimizer_args={"momentum": 0.9, "nesterov": True}
    )
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0.9 and group["nesterov"]
    assert group["weight_decay"] == 0  # SGD's own default: --adam_weight_decay is AdamW's, not SGD's


def test_kohya_spellings_of_the_built_ins_keep_their_settings():
    optimizer = build_optimizer(small_model().parameters(), "AdamW", 1e-3, betas=(0.8, 0.9), weight_decay=0.1)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["weight_decay"] == 0.1
    # --optimizer_args override the flags' values
    optimizer = build_optimizer(
        small_model().parameters(), "adamw", 1e-3, optimizer_args={"betas": (0.9, 0.99)}
    )
    assert optimizer.defaults["betas"] == (0.9, 0.99)
    adafactor = build_optimizer(small_model().parameters(), "Adafactor", 1e-4, optimizer_args={"beta1": 0.9})
    assert adafactor.defaults["beta1"] == 0.9 and not adafactor.defaults["relative_step"]


def test_an_argument_the_class_does_not_take_is_one_line():
    with pytest.raises(UserError, match="--optimizer_args.*betas") as error:
        build_optimizer(small_model().parameters(), "SGD", 1e-3, optimizer_args={"betas": (0.9, 0.99)})
    assert "\n" not in str(error.value)


@needs_bitsandbytes
@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "bitsandbytes.optim.Lion8bit", "PagedAdamW8bit"])
def test_bitsandbytes_optimizers_by_name(name):
    model = small_model()
    optimizer = build_optimizer(model.parameters(), name, 1e-3, optimizer_args={"betas": (0.9, 0.99)})
    assert type(optimizer).__module__.startswith("bitsandbytes")
    assert type(optimizer).__name__.lower() == name.rpartition(".")[2].lower()
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)


def test_a_missing_package_is_refused_in_one_line(monkeypatch):
    import sys

    import sdxl_ztsnr.optimizers as optimizers

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what `import prodigyopt` sees when it is missing
    with pytest.raises(UserError, match="pip install prodigyopt") as error:
        check_optimizer_name("Prodigy")
    assert "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    with pytest.raises(UserError, match="pip install lion_pytorch"):
        optimizer_class("lion_pytorch.Lion")
    monkeypatch.setattr(optimizers, "installed", lambda name: False)
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        optimizer_class("Lion8bit")


def test_bitsandbytes_is_not_imported_for_a_torch_optimizer():
    """The trainer parses and builds --optimizer SGD without importing bitsandbytes (its import is slow and
    looks up kernels on the Hub)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch, train_sdxl_ztsnr\n"
        "from sdxl_ztsnr.optimizers import build_training_optimizer, check_optimizer_name\n"
        "check_optimizer_name('SGD'); check_optimizer_name('adamw')\n"
        "build_training_optimizer(torch.nn.Linear(2, 2).parameters(), 'SGD', 0.1)\n"
        "print(sys.modules.get('bitsandbytes', 'absent'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] in ("None", "absent")


def test_an_optimizer_with_one_step_size_for_all_parameters_is_refused_per_parameter():
    for name in ("Prodigy", "prodigyopt.Prodigy", "dadaptation.DAdaptAdam", "LBFGS"):
        with pytest.raises(UserError, match="one step size from all parameters"):
            check_per_parameter_optimizer(name, "--fused_backward_pass", "drop --fused_backward_pass")
    check_per_parameter_optimizer("SGD", "--fused_backward_pass", "drop it")
    check_per_parameter_optimizer("Lion8bit", "--fused_backward_pass", "drop it")


@pytest.mark.parametrize("name", ["SGD", "RAdam"])
def test_a_torch_optimizer_by_name_works_with_the_fused_backward_pass(name):
    reference, fused_model = small_model(), small_model()
    data = batches(4)
    make_named = functools.partial(
        build_optimizer, name=name, learning_rate=1e-2, optimizer_args={"weight_decay": 0.01}
    )
    train(reference, make_named(reference.parameters()), data)
    train(
        fused_model,
        build_training_optimizer(
            fused_model.parameters(), name, 1e-2, fused_backward=True, optimizer_args={"weight_decay": 0.01}
        ).attach(),
        data,
    )
    assert_same_weights(reference, fused_model, atol=1e-6)
    assert not torch.equal(reference[0].weight, small_model()[0].weight)


@needs_prodigy
def test_prodigy_is_refused_with_the_fused_backward_pass_and_bf16_weights():
    with pytest.raises(UserError, match="drop --fused_backward_pass"):
        build_training_optimizer(small_model().parameters(), "prodigy", 1.0, fused_backward=True)
    with pytest.raises(UserError, match="--weights_dtype fp32"):
        build_training_optimizer(
            small_model(dtype=torch.bfloat16).parameters(), "Prodigy", 1.0, bf16_update="stochastic"
        )


@needs_prodigy
def test_prodigy_trains_and_its_state_round_trips_exactly():
    """Prodigy's step-size estimate d lives in its param groups, its moments in the state: both must survive
    a checkpoint for a resumed run to continue the unbroken one."""
    import io

    import prodigyopt

    args = parse_optimizer_args(
        ["decouple=True", "weight_decay=0.01", "betas=0.9,0.99", "d0=1e-4", "d_coef=2"]
    )
    data = batches(10)
    model = small_model()
    optimizer = build_training_optimizer(model.parameters(), "Prodigy", 1.0, optimizer_args=args)
    assert type(optimizer) is prodigyopt.Prodigy and optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    d0 = optimizer.param_groups[0]["d"]
    train(model, optimizer, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, data[4:])
    assert optimizer.param_groups[0]["d"] > d0  # it adapted its step size after the checkpoint

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = small_model(seed=5)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = build_training_optimizer(resumed.parameters(), "Prodigy", 1.0, optimizer_args=args)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed, resumed_optimizer, data[4:])
    assert_same_weights(model, resumed, atol=0.0)
    assert resumed_optimizer.param_groups[0]["d"] == optimizer.param_groups[0]["d"]


@needs_prodigy
def test_prodigy_resumes_from_accelerates_save_state(tmp_path):
    """The trainer's path: accelerate.prepare, save_state mid-run, load_state in a new process state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def run(resume_from=None, save_to=None):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        model = small_model()
        optimizer = build_training_optimizer(model.parameters(), "prodigy", 1.0, optimizer_args={"d_coef": 2})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        data = batches(4)
        if resume_from:
            accelerator.load_state(resume_from)
            data = data[2:]
        for index, batch in enumerate(data):
            train(model, optimizer, [batch])
            scheduler.step()
            if save_to and index == 1:
                accelerator.save_state(save_to)
        return model, optimizer

    unbroken, optimizer = run(save_to=tmp_path / "state")
    resumed, resumed_optimizer = run(resume_from=tmp_path / "state")
    assert_same_weights(unbroken, resumed, atol=0.0)
    assert resumed_optimizer.param_groups[0]["d"] == optimizer.param_groups[0]["d"]
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1.0 / 5)


def test_the_trainer_parses_kohyas_optimizer_flags(tiny_sdxl, trainer_args, tmp_path, capsys):
    args = trainer_args(
        tiny_sdxl, tmp_path, "--precomputed_dir", "x", "--optimizer_type", "SGD", "--optimizer_args",
        "momentum=0.9", "nesterov=True",
    )  # fmt: skip
    assert args.optimizer == "SGD" and parse_optimizer_args(args.optimizer_args) == {
        "momentum": 0.9,
        "nesterov": True,
    }
    with pytest.raises(SystemExit):
        trainer_args(tiny_sdxl, tmp_path, "--precomputed_dir", "x", "--optimizer", "AdamWW")
    assert "--optimizer AdamWW: not one of" in capsys.readouterr().err
    if installed("prodigyopt"):
        with pytest.raises(SystemExit):
            trainer_args(
                tiny_sdxl,
                tmp_path,
                "--precomputed_dir",
                "x",
                "--optimizer",
                "prodigy",
                "--fused_backward_pass",
            )
        assert "one step size from all parameters" in capsys.readouterr().err


def test_kohyas_toml_form_of_the_optimizer_flags_reads(tmp_path):
    import train_sdxl_ztsnr

    config = tmp_path / "run.toml"
    config.write_text(
        'pretrained_model_name_or_path = "x"\nprecomputed_dir = "cache"\n[optimizer_arguments]\n'
        'optimizer_type = "SGD"\noptimizer_args = ["momentum=0.9", "nesterov=True"]\n'
    )
    args = train_sdxl_ztsnr.parse_args(["--config_file", str(config)])
    assert args.optimizer == "SGD" and parse_optimizer_args(args.optimizer_args) == {
        "momentum": 0.9,
        "nesterov": True,
    }


def test_a_named_optimizer_takes_parameter_groups_with_their_learning_rates():
    """The UNet and each trained text encoder are groups with their own lr (--text_encoder_lr)."""
    name = "SGD"
    unet, encoder = [torch.nn.Parameter(torch.ones(3))], [torch.nn.Parameter(torch.ones(4))]
    optimizer = build_training_optimizer(
        [{"params": unet, "lr": 0.5}, {"params": encoder, "lr": 0.25}], name, 1.0
    )
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]
    for p in unet + encoder:
        p.grad = torch.ones_like(p)
    optimizer.step()  # plain SGD moves by lr × gradient
    assert torch.allclose(unet[0].detach(), torch.full((3,), 0.5))
    assert torch.allclose(encoder[0].detach(), torch.full((4,), 0.75))


@needs_prodigy
def test_prodigy_refuses_groups_with_different_learning_rates_in_one_line():
    """Prodigy itself raises at the first step for them; we say so before the run, naming the flags."""
    groups = [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 1.0}]
    with pytest.raises(UserError, match="--text_encoder_lr"):
        build_training_optimizer(
            [*groups, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.5}], "prodigy", 1.0
        )
    optimizer = build_training_optimizer(
        [*groups, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1.0}], "Prodigy", 1.0
    )
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0]
