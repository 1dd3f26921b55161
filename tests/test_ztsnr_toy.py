"""Smoke run of the toy ZTSNR benchmark and checks of its data and sampler plumbing."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from sdxl_ztsnr.schedule import alphas_cumprod

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ztsnr_toy.py"


@pytest.fixture(scope="module")
def toy():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ztsnr_toy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ztsnr_toy"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("ztsnr_toy", None)


def test_latents_have_the_requested_mean(toy):
    generator = torch.Generator().manual_seed(0)
    prompts = [toy.Prompt("black", "neutral", "solid"), toy.Prompt("white", "red", "stripes")]
    prompts += [toy.Prompt("grey", "blue", t) for t in ("checkerboard", "noise")]
    latents = toy.make_latents(prompts, 16, generator)
    assert latents.shape == (4, 4, 16, 16)
    for x, prompt in zip(latents, prompts, strict=True):
        torch.testing.assert_close(x.mean(dim=(1, 2)), prompt.mean(), atol=1e-5, rtol=0)
    # Black and white sit at the ends of the brightness axis; textures add spatial variation, solid none.
    assert toy.brightness_of(latents[:1].mean(dim=(2, 3)), prompts[0]).item() == pytest.approx(-1.0)
    assert latents[0].std(dim=(1, 2)).max() < 1e-6
    # The texture's channel mix has unit norm and its pattern unit std: total std over channels ≈ 1.
    texture_std = latents[1:].var(dim=(2, 3)).sum(dim=1).sqrt()
    torch.testing.assert_close(texture_std, torch.ones(3), atol=0.05, rtol=0)


def test_epsilon_ddim_step_matches_the_v_form(toy):
    # The ε sampler of arm (a) and the v sampler of the others are the same DDIM step on SDXL's schedule.
    from sdxl_ztsnr.schedule import ddim_step, eps_from_v

    alpha_bar = alphas_cumprod(ztsnr=False)
    x_t, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a_t, a_next = alpha_bar[[999, 500]], alpha_bar[[959, 460]]
    eps = eps_from_v(x_t, v, a_t)
    from_eps = toy.ddim_step_epsilon(x_t, eps, a_t.view(-1, 1, 1, 1), a_next.view(-1, 1, 1, 1))
    torch.testing.assert_close(from_eps, ddim_step(x_t, v, a_t, a_next), atol=1e-4, rtol=1e-4)


def test_smoke_run_prints_a_table_and_writes_the_figure(toy, tmp_path, capsys):
    figure = tmp_path / "toy.png"
    result = toy.main(["--smoke", "--arms", "bc", "--seed", "3", "--figure", str(figure)])
    out = capsys.readouterr().out
    assert [s["arm"] for s in result["summaries"]] == ["b", "c"]
    for summary in result["summaries"]:
        for key in ("mae", "black_error", "white_error", "black_brightness", "white_brightness", "spread"):
            assert math.isfinite(summary[key]), (summary["arm"], key)
    rows = result["per_prompt"]["c"]
    assert {r["prompt"] for r in rows} >= {"solid black", "solid white"}
    assert len(rows) == len(toy.EVAL_PROMPTS)
    assert "| b | SDXL v-pred |" in out and "| c | ZTSNR σ20000 v (default) |" in out
    assert "| solid black | -1.00 |" in out
    assert figure.stat().st_size > 10_000


def test_rejects_unknown_arms(toy):
    with pytest.raises(SystemExit):
        toy.parse_args(["--arms", "bz"])


def test_conversion_smoke_run_converts_the_epsilon_base_per_timestep_distribution(toy, tmp_path, capsys):
    figure = tmp_path / "conversion.png"
    result = toy.main(["--smoke", "--conversion", "--conversions", "u,h2", "--figure", str(figure)])
    out = capsys.readouterr().out
    assert [r["conversion"] for r in result["conversions"]] == ["u", "h2"]
    assert result["checkpoints"] == [1, 2]
    for r in result["conversions"]:
        assert set(r["at"]) == {"1", "2"} and math.isfinite(r["at"]["2"]["black_error"])
    assert result["conversions"][1]["terminal_probability"] == pytest.approx(0.1, rel=1e-6)  # (1/1000)^(1/3)
    assert "| u: uniform | 0.1% |" in out and "| h2: high_noise, bias 2 | 10% |" in out
    assert figure.stat().st_size > 10_000


def test_uniform_arms_draw_the_timesteps_they_always_drew(toy):
    # train_arm now draws through TimestepSampling; its default must be sample_timesteps' draw, so the
    # published arm tables stay reproducible.
    from sdxl_ztsnr.schedule import sample_timesteps
    from sdxl_ztsnr.timestep_sampling import TimestepSampling

    expected = sample_timesteps(32, alphas_cumprod(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(TimestepSampling().draw(32, 1000, torch.Generator().manual_seed(1)), expected)


def test_rejects_unknown_conversions(toy):
    with pytest.raises(SystemExit):
        toy.parse_args(["--conversion", "--conversions", "u,zz"])
