"""EMA weights: warm-up of the decay, update_every, host-memory averaging, exact resume, swap-in, unet_ema/."""

import pytest
import torch

from sdxl_ztsnr.ema import EMA_STATE_NAME, EmaWeights, ema_update_


def _params(dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _set_weights(params, step: int) -> None:
    """Deterministic stand-in for an optimizer step: the weights at `step` depend only on `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))


def _run(ema: EmaWeights, params, steps: range, weights_at=lambda step: step) -> None:
    for step in steps:
        _set_weights(params, weights_at(step))
        ema.update(step)


@pytest.mark.parametrize(
    ("warmup", "expected"),
    [
        ("power", lambda s: 1 - (1 + (s - 1) / 2.0) ** -0.75),  # inv_gamma 2, power 3/4
        ("tensorflow", lambda s: (1 + (s - 1)) / (10 + (s - 1))),
        ("none", lambda s: 0.999),
    ],
)
def test_decay_warmup_follows_its_formula_and_is_capped(warmup, expected):
    ema = EmaWeights(_params(), decay=0.999, warmup=warmup, inv_gamma=2.0, power=0.75)
    assert ema.decay_at(1) == 0.0  # the first step copies the weights
    for step in (2, 3, 10, 100, 5000, 10**6):
        assert ema.decay_at(step) == pytest.approx(min(expected(step), 0.999), rel=1e-12), step
    assert ema.decay_at(10**6) == pytest.approx(0.999)
    if warmup != "none":
        assert ema.decay_at(10) < ema.decay_at(100) < 0.999


def test_update_every_compounds_the_skipped_steps():
    """Every 4th step with decay ∏ d(s) equals per-step EMA when the weights change only at those steps."""
    every = 4
    params_a, params_b = _params(), _params()
    per_step = EmaWeights(params_a, decay=0.9, warmup="tensorflow")
    strided = EmaWeights(params_b, decay=0.9, warmup="tensorflow", update_every=every)
    block_end = lambda step: -(-step // every) * every  # noqa: E731 - weights constant on (4k-4, 4k]
    _run(per_step, params_a, range(1, 25), block_end)
    updated = []
    for step in range(1, 25):
        _set_weights(params_b, block_end(step))
        updated.append(strided.update(step))
    assert updated == [step % every == 0 for step in range(1, 25)]
    assert strided.step == per_step.step == 24
    for a, b in zip(per_step.shadow, strided.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # The compounded decay of one update is the product of the per-step ones, ≈ decay**every at the cap.
    late = EmaWeights(_params(), decay=0.9, warmup="none", update_every=every)
    assert late.update_decay(every) == 0.0
    late.update(every)
    assert late.update_decay(2 * every) == pytest.approx(0.9**every)


def test_force_folds_in_the_last_steps_and_steps_cannot_go_back():
    params = _params()
    ema = EmaWeights(params, decay=0.5, warmup="none", update_every=10)
    _run(ema, params, range(1, 11))
    assert ema.step == 10
    _set_weights(params, 13)
    assert not ema.update(13)
    assert ema.update(13, force=True) and ema.step == 13
    assert not ema.update(13, force=True)  # the same step again is a no-op
    with pytest.raises(ValueError, match="before the last update"):
        ema.update(12)


def test_ema_update_matches_the_formula_for_mixed_dtypes():
    shadow = [torch.zeros(3), torch.zeros(2)]
    live = [torch.ones(3), torch.full((2,), 2.0, dtype=torch.bfloat16)]
    ema_update_(shadow, live, decay=0.75)
    torch.testing.assert_close(shadow[0], torch.full((3,), 0.25))
    torch.testing.assert_close(shadow[1], torch.full((2,), 0.5))
    ema_update_(shadow, live, decay=0.0)  # decay 0 is an exact copy
    assert torch.equal(shadow[1], live[1].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_memory_average_equals_the_accelerator_one(dtype):
    """device="cpu" (staging buffer, background thread) gives the same fp32 average as averaging in place."""
    params_a, params_b = _params(dtype), _params(dtype)
    on_device = EmaWeights(params_a, decay=0.99, update_every=2)
    on_host = EmaWeights(params_b, decay=0.99, update_every=2, device="cpu")
    _run(on_device, params_a, range(1, 12))
    _run(on_host, params_b, range(1, 12))
    for a, b, p in zip(on_device.shadow, on_host.shadow, params_b, strict=True):
        assert b.device.type == "cpu" and b.dtype == torch.float32 and p.dtype == dtype
        assert torch.equal(a, b)
    assert not torch.equal(on_host.shadow[0], params_b[0].float())  # an average, not the last weights


@pytest.mark.parametrize("device", ["accelerator", "cpu"])
def test_resume_is_bit_exact(device, tmp_path):
    """k updates, save, load into a fresh wrapper, continue: the same shadow as an unbroken run."""
    params = _params()
    unbroken = EmaWeights(params, decay=0.999, update_every=3, device=device)
    _run(unbroken, params, range(1, 20))

    params = _params()
    first = EmaWeights(params, decay=0.999, update_every=3, device=device)
    _run(first, params, range(1, 8))
    first.save_state(tmp_path)
    torch.save(first.state_dict(), tmp_path / "ema.pt")

    for load in ("safetensors", "state_dict"):
        params = _params(seed=5)  # a new process: fresh weights until the optimizer state is loaded
        _set_weights(params, 7)
        resumed = EmaWeights(params, decay=0.999, update_every=3, device=device)
        if load == "safetensors":
            resumed.load_state(tmp_path)
        else:
            resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
        assert resumed.step == first.step == 6  # last update at step 6; 7 is not a multiple of 3
        _run(resumed, params, range(8, 20))
        for a, b in zip(unbroken.shadow, resumed.shadow, strict=True):
            assert torch.equal(a, b), load


def test_resume_through_accelerate_checkpoints(tmp_path):
    """Hooks (safetensors) and register_for_checkpointing both resume a real training run exactly."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def train(accelerator, model, optimizer, ema, steps):
        for step in steps:
            loss = model(torch.linspace(-1, 1, 8).reshape(2, 4) * step).square().mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            ema.update(step)

    def setup(transport):
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        ema = EmaWeights(model.parameters(), decay=0.9, update_every=2, device="cpu")
        if transport == "hooks":
            accelerator.register_save_state_pre_hook(ema.save_state_hook(accelerator.is_main_process))
            accelerator.register_load_state_pre_hook(ema.load_state_hook())
        else:
            accelerator.register_for_checkpointing(ema)
        return accelerator, model, optimizer, ema

    try:
        for transport in ("hooks", "register"):
            run = setup(transport)
            train(*run, range(1, 9))
            expected = [s.clone() for s in run[3].shadow]

            run = setup(transport)
            train(*run, range(1, 4))
            run[0].save_state(str(tmp_path / transport))
            assert (tmp_path / transport / EMA_STATE_NAME).is_file() == (transport == "hooks")
            run = setup(transport)
            run[0].load_state(str(tmp_path / transport))
            train(*run, range(4, 9))
            assert all(torch.equal(a, b) for a, b in zip(expected, run[3].shadow, strict=True)), transport
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("accelerator", torch.float32),
        ("cpu", torch.float32),
        ("accelerator", torch.bfloat16),
        ("cpu", torch.bfloat16),
    ],
)
def test_swapped_in_shows_the_average_and_restores_the_raw_weights(device, dtype):
    params = _params(dtype)
    ema = EmaWeights(params, decay=0.9, device=device, warmup="none")
    _run(ema, params, range(1, 6))
    raw = [p.detach().clone() for p in params]
    pointers = [p.data_ptr() for p in params]
    with ema.swapped_in():
        for p, s in zip(params, ema.shadow, strict=True):
            assert torch.equal(p.detach(), s.to(dtype))
        assert not torch.equal(params[0].detach(), raw[0])
    for p, r, ptr in zip(params, raw, pointers, strict=True):
        assert torch.equal(p.detach(), r) and p.dtype == dtype and p.data_ptr() == ptr
    # An exception inside the block restores the weights too.
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        raise RuntimeError("boom")
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, raw, strict=True))


def test_save_writes_a_unet_that_diffusers_loads(tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    ema = EmaWeights(unet.parameters(), decay=0.5, warmup="none")
    params = list(unet.parameters())
    ema.update(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.25)
    ema.update(2)  # average = raw − 0.125
    raw = {k: v.clone() for k, v in unet.state_dict().items()}
    out = ema.save(unet, tmp_path / "unet_ema")
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet2DConditionModel.from_pretrained(out)
    saved = dict(loaded.named_parameters())
    for (name, p), s in zip(unet.named_parameters(), ema.shadow, strict=True):
        assert torch.equal(saved[name], s), name
        torch.testing.assert_close(saved[name], p.detach() - 0.125)
    assert all(torch.equal(v, raw[k]) for k, v in unet.state_dict().items())


def test_bad_inputs_are_refused(tmp_path):
    for kwargs, match in [
        ({"decay": 1.0}, "ema_decay"),
        ({"decay": -0.1}, "ema_decay"),
        ({"update_every": 0}, "ema_update_every"),
        ({"device": "gpu"}, "ema_device"),
        ({"warmup": "linear"}, "warm-up"),
        ({"power": 0.0}, "power"),
    ]:
        with pytest.raises(ValueError, match=match):
            EmaWeights(_params(), **kwargs)
    with pytest.raises(ValueError, match="no parameters"):
        EmaWeights([])

    ema = EmaWeights(_params())
    state = ema.state_dict()
    with pytest.raises(ValueError, match="holds 2 tensors"):
        ema.load_state_dict({**state, "shadow_params": state["shadow_params"][:2]})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**state, "shadow_params": [torch.zeros(1)] * 3})
    with pytest.raises(FileNotFoundError, match="without EMA"):
        ema.load_state(tmp_path)
    with pytest.raises(ValueError, match="same order|dtypes"), ema.swapped_in(_params()[:2]):
        pass
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not this UNet"):
        ema.save(other, tmp_path / "x")


def test_changed_settings_on_resume_are_reported(caplog):
    ema = EmaWeights(_params(), decay=0.99)
    ema.update(1)
    state = ema.state_dict()
    other = EmaWeights(_params(), decay=0.999)
    other.load_state_dict(state)
    assert "differ" in caplog.text and other.step == 1
    assert other.decay_at(10**6) == pytest.approx(0.999)  # the new run's setting is kept
