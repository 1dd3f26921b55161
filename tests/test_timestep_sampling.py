"""Training timestep distributions: the draws against their analytic distributions, the bounds, the keyed and
bit-identical uniform path, the resolution shift on top, and the importance weighting's expectation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.keyed_random import keyed_timesteps_and_noise, keyed_timesteps_noise_and_uniform, sample_seeds
from sdxl_ztsnr.schedule import alphas_cumprod, loss_weights, sample_timesteps, shift_timesteps
from sdxl_ztsnr.timestep_sampling import TimestepSampling
from sdxl_ztsnr.training import training_loss

T = 1000
DRAWS = 200_000


def draws(sampling: TimestepSampling, count: int = DRAWS, seed: int = 0) -> torch.Tensor:
    return sampling.draw(count, T, torch.Generator().manual_seed(seed))


def chi_square_p(counts: torch.Tensor, expected_probabilities: torch.Tensor, bins: int = 25) -> float:
    """p-value of Pearson's χ² for per-timestep counts against probabilities, pooled into ``bins`` equal groups
    of timesteps (each group expects many draws)."""
    counts = counts.double().reshape(bins, -1).sum(1)
    expected = expected_probabilities.double().reshape(bins, -1).sum(1) * counts.sum()
    keep = expected > 0
    statistic = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return float(stats.chi2.sf(statistic, int(keep.sum()) - 1))


# --- the distributions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [
        TimestepSampling(),
        TimestepSampling("uniform", min_timestep=200, max_timestep=800),
        TimestepSampling("logit_normal", logit_mean=0.5, logit_std=0.8),
        TimestepSampling("high_noise", high_noise_bias=2.0),
    ],
    ids=["uniform", "uniform-bounded", "logit_normal", "high_noise"],
)
def test_probabilities_sum_to_one_inside_the_bounds(sampling):
    p = sampling.probabilities(T)
    low, high = sampling.bounds(T)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (p[:low] == 0).all() and (p[high:] == 0).all() and (p[low:high] > 0).all()


def test_logit_normal_probabilities_match_scipys_distribution():
    sampling = TimestepSampling("logit_normal", logit_mean=-0.3, logit_std=1.4)
    edges = torch.linspace(0, 1, T + 1, dtype=torch.float64)[1:-1]
    cdf = stats.norm.cdf(torch.logit(edges).numpy(), loc=-0.3, scale=1.4)
    expected = torch.diff(torch.tensor([0.0, *cdf, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sampling.probabilities(T), expected, atol=1e-12, rtol=0)


def test_logit_normal_draws_follow_sigmoid_of_a_normal():
    """Histogram of the inverse-CDF draws against the definition: t = floor(T·sigmoid(μ + s·z))."""
    sampling = TimestepSampling("logit_normal", logit_mean=0.4, logit_std=1.2)
    counts = torch.bincount(draws(sampling), minlength=T)
    p = sampling.probabilities(T)
    assert chi_square_p(counts, p) > 1e-3
    z = torch.randn(DRAWS, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    direct = torch.bincount((T * torch.sigmoid(0.4 + 1.2 * z)).floor().long().clamp(max=T - 1), minlength=T)
    assert chi_square_p(direct, p) > 1e-3
    # The mode sits where logit(x) = μ (a mean of logit(x) 0.4 puts the median at t ≈ 599).
    median = draws(sampling).median().item()
    assert abs(median - T * torch.sigmoid(torch.tensor(0.4)).item()) < 5


@pytest.mark.parametrize("bias", [0.5, 1.0, 3.0])
def test_high_noise_draws_follow_the_power_law_and_hit_the_terminal_step_often(bias):
    sampling = TimestepSampling("high_noise", high_noise_bias=bias)
    drawn = draws(sampling)
    counts = torch.bincount(drawn, minlength=T)
    # Independent reference: the continuous inverse CDF x = 1 − (1 − u)^(1+b), binned.
    u = torch.rand(DRAWS, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    direct = torch.bincount((T * (1 - (1 - u) ** (1 + bias))).floor().long().clamp(max=T - 1), minlength=T)
    assert chi_square_p(counts, sampling.probabilities(T)) > 1e-3
    assert chi_square_p(direct, sampling.probabilities(T)) > 1e-3
    terminal = (drawn == T - 1).double().mean().item()
    assert terminal == pytest.approx((1 / T) ** (1 / (1 + bias)), rel=0.05)
    assert terminal > 10 / T  # ≥ 10× the uniform rate: the pure-noise step trains often
    # The low-noise end keeps 1/(1+b) of the uniform rate.
    assert sampling.probabilities(T)[0].item() * T == pytest.approx(1 / (1 + bias), rel=0.01)


def test_uniform_draws_are_flat_and_high_noise_bias_zero_is_uniform():
    counts = torch.bincount(draws(TimestepSampling()), minlength=T)
    assert chi_square_p(counts, torch.full((T,), 1 / T)) > 1e-3
    torch.testing.assert_close(
        TimestepSampling("high_noise", high_noise_bias=0.0).probabilities(T),
        torch.full((T,), 1 / T, dtype=torch.float64),
    )
    assert (draws(TimestepSampling(), 100_000) == T - 1).double().mean().item() < 2 / T


@pytest.mark.parametrize("mode", ["uniform", "logit_normal", "high_noise"])
def test_bounds_are_kohyas_min_inclusive_max_exclusive(mode):
    sampling = TimestepSampling(mode, min_timestep=250, max_timestep=750)
    drawn = draws(sampling, 50_000)
    assert drawn.min().item() >= 250 and drawn.max().item() <= 749
    assert sampling.probabilities(T)[250:750].sum().item() == pytest.approx(1.0, abs=1e-12)
    if mode == "uniform":  # kohya's torch.randint(min, max): both ends drawn
        assert drawn.min().item() == 250 and drawn.max().item() == 749
    if mode == "high_noise":  # the top of the range plays the terminal step's part
        assert (drawn == 749).double().mean().item() > 10 / 500


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"min_timestep": 500, "max_timestep": 500}, "--min_timestep"),
        ({"max_timestep": 1001}, "--max_timestep"),
        ({"min_timestep": -1}, "--min_timestep"),
        ({"mode": "logit_normal", "logit_std": 0.0}, "--logit_std"),
        ({"mode": "high_noise", "high_noise_bias": -1.0}, "--high_noise_bias"),
        ({"mode": "cosine"}, "--timestep_sampling"),
        # logit-normal with std 1 draws t = 0 with P ≈ 2.6e-12: an importance weight of ~4e8
        ({"mode": "logit_normal", "importance_weighting": True}, "--timestep_importance_weighting"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        TimestepSampling(**kwargs).check(T)


def test_sane_importance_weights_are_accepted():
    TimestepSampling("logit_normal", logit_std=2.0, importance_weighting=True).check(T)
    TimestepSampling("high_noise", high_noise_bias=5.0, importance_weighting=True).check(T)


def test_describe_says_how_often_the_top_step_is_drawn():
    line = TimestepSampling("high_noise", high_noise_bias=1.0).describe(T)
    assert "high_noise (bias 1)" in line and "t = 999 drawn 3.2%" in line and "uniform: 0.1%" in line


# --- keyed draws and the uniform path ---------------------------------------------------------------------


def test_the_uniform_path_draws_what_it_always_drew():
    seeds = sample_seeds(7, 3, range(6), "noise")
    t_old, noise_old = keyed_timesteps_and_noise(seeds, (4, 2, 2), T)
    t_new, noise_new, u = keyed_timesteps_noise_and_uniform(seeds, (4, 2, 2), T)
    assert torch.equal(t_old, t_new) and torch.equal(noise_old, noise_new)
    # Same generator seeds: TimestepSampling's default draw is sample_timesteps' draw, value for value.
    alpha_bar = alphas_cumprod()
    expected = sample_timesteps(64, alpha_bar, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(TimestepSampling().draw(64, T, torch.Generator().manual_seed(3)), expected)
    assert ((u >= 0) & (u < 1)).all() and u.dtype == torch.float64


def test_non_uniform_keyed_draws_do_not_depend_on_the_batch_split():
    sampling = TimestepSampling("high_noise", high_noise_bias=2.0)
    seeds = sample_seeds(0, 11, range(8), "noise")
    whole = sampling.from_uniform(keyed_timesteps_noise_and_uniform(seeds, (4, 2, 2), T)[2], T)
    halves = [
        sampling.from_uniform(keyed_timesteps_noise_and_uniform(s, (4, 2, 2), T)[2], T)
        for s in (seeds[:4], seeds[4:])
    ]
    assert torch.equal(whole, torch.cat(halves))


# --- through training_loss: shift, bounds, importance weights ------------------------------------------------


class RecordingUNet(torch.nn.Module):
    """Predicts zeros and records the timesteps it was called with."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.timesteps: torch.Tensor | None = None

    def forward(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs, return_dict):
        self.timesteps = timesteps
        return (torch.zeros_like(sample) + 0 * self.dummy,)


def toy_batch(size: int, x0: float = 0.0, seeds=None) -> dict:
    batch = {
        "latents": torch.full((size, 4, 1, 1), x0),
        "prompt_embeds": torch.zeros(size, 1, 8),
        "pooled_prompt_embeds": torch.zeros(size, 8),
        "time_ids": torch.zeros(size, 6),
    }
    if seeds is not None:
        batch["noise_seeds"] = seeds
    return batch


def test_shift_composes_with_the_draw_and_the_bounds_hold_after_it():
    alpha_bar = alphas_cumprod()
    sampling = TimestepSampling("high_noise", high_noise_bias=1.0, min_timestep=100, max_timestep=900)
    seeds = sample_seeds(1, 0, range(256), "noise")
    unet = RecordingUNet()
    training_loss(
        unet, toy_batch(256, seeds=seeds), alpha_bar, timestep_shift=2.0, timestep_sampling=sampling
    )
    u = keyed_timesteps_noise_and_uniform(seeds, (4, 1, 1), T)[2]
    drawn = sampling.from_uniform(u, T)
    expected = shift_timesteps(drawn, alpha_bar, 2.0).clamp(100, 899)
    assert torch.equal(unet.timesteps, expected)
    assert unet.timesteps.min() >= 100 and unet.timesteps.max() <= 899
    assert (shift_timesteps(drawn, alpha_bar, 2.0) > 899).any()  # the clamp had something to do


def expected_weighted_v_mse(alpha_bar: torch.Tensor, x0: float) -> torch.Tensor:
    """E over the noise of w_minsnr(t)·|v_t − 0|² per timestep, for x₀ = x0 everywhere: ᾱ + (1−ᾱ)·x0²."""
    a = alpha_bar.double()
    return loss_weights(alpha_bar).double() * (a + (1 - a) * x0**2)


@pytest.mark.parametrize(
    "sampling",
    [
        TimestepSampling("high_noise", high_noise_bias=2.0, importance_weighting=True),
        TimestepSampling(
            "logit_normal", logit_mean=1.0, logit_std=1.5, min_timestep=100, importance_weighting=True
        ),
    ],
    ids=["high_noise", "logit_normal-bounded"],
)
def test_importance_weights_make_the_expected_loss_the_uniform_one(sampling):
    alpha_bar = alphas_cumprod()
    low, high = sampling.bounds(T)
    loss_t = expected_weighted_v_mse(alpha_bar, 3.0)
    p = sampling.probabilities(T)
    t = torch.arange(low, high)
    weights = sampling.importance_weights(t, T).double()
    uniform = loss_t[low:high].mean()
    corrected = (p[low:high] * weights * loss_t[low:high]).sum()
    uncorrected = (p[low:high] * loss_t[low:high]).sum()
    assert corrected.item() == pytest.approx(uniform.item(), rel=1e-9)
    assert abs(uncorrected.item() - uniform.item()) > 0.05 * uniform.item()  # the correction does something


def test_importance_weighted_training_loss_estimates_the_uniform_objective():
    """Monte Carlo through training_loss: corrected high-noise draws estimate the uniform-draw loss, uncorrected
    ones a larger one (they draw the high-noise steps, where |v|² ≈ x0², more often)."""
    alpha_bar = alphas_cumprod()
    size = 40_000
    exact_uniform = expected_weighted_v_mse(alpha_bar, 3.0).mean().item()

    def estimate(sampling):
        loss, _ = training_loss(
            RecordingUNet(),
            toy_batch(size, 3.0),
            alpha_bar,
            torch.Generator().manual_seed(2),
            timestep_sampling=sampling,
        )
        return loss.item()

    corrected = estimate(TimestepSampling("high_noise", high_noise_bias=1.0, importance_weighting=True))
    uncorrected = estimate(TimestepSampling("high_noise", high_noise_bias=1.0))
    assert corrected == pytest.approx(exact_uniform, rel=0.02)
    assert uncorrected > 1.05 * exact_uniform
    assert estimate(TimestepSampling()) == pytest.approx(exact_uniform, rel=0.02)


def test_importance_weights_multiply_the_tag_weights():
    alpha_bar = alphas_cumprod()
    sampling = TimestepSampling("high_noise", high_noise_bias=1.0, importance_weighting=True)
    batch = toy_batch(64, 1.0, seeds=sample_seeds(4, 0, range(64), "noise"))
    batch["sample_weights"] = torch.linspace(0.5, 2.0, 64)
    unet = RecordingUNet()
    loss, mse = training_loss(unet, batch, alpha_bar, timestep_sampling=sampling)
    drawn = sampling.from_uniform(keyed_timesteps_noise_and_uniform(batch["noise_seeds"], (4, 1, 1), T)[2], T)
    weights = (
        loss_weights(alpha_bar[unet.timesteps])
        * batch["sample_weights"]
        * sampling.importance_weights(drawn, T)
    )
    assert loss.item() == pytest.approx((mse * weights).mean().item(), rel=1e-6)
    assert TimestepSampling("high_noise").importance_weights(drawn, T) is None
    assert math.isfinite(loss.item())


# --- the trainer's flags -------------------------------------------------------------------------------------


def test_the_trainer_refuses_bad_bounds_when_it_parses(tiny_sdxl, trainer_args, tmp_path, capsys):
    with pytest.raises(SystemExit):
        trainer_args(
            tiny_sdxl, tmp_path, "--precomputed_dir", "x", "--min_timestep", "900", "--max_timestep", "900"
        )
    assert "--min_timestep 900 / --max_timestep 900" in capsys.readouterr().err


def test_a_high_noise_run_trains_says_how_it_draws_and_resumes_exactly(
    tiny_sdxl, train_cache, trainer_args, tmp_path, fresh_accelerate_state, caplog
):
    import shutil

    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    import train_sdxl_ztsnr

    flags = [
        "--precomputed_dir", str(train_cache), "--max_train_steps", "4", "--no_single_file",
        "--timestep_sampling", "high_noise", "--high_noise_bias", "2", "--timestep_importance_weighting",
        "--resolution_shift", "--min_timestep", "1",
    ]  # fmt: skip
    args = trainer_args(tiny_sdxl, tmp_path / "whole", *flags)
    assert unet_options_sampling(args) == TimestepSampling("high_noise", 0.0, 1.0, 2.0, 1, 1000, True)
    with caplog.at_level("INFO"):
        result = train_sdxl_ztsnr.main(args)
    assert result["step"] == 4 and math.isfinite(result["val_loss"])
    assert "timesteps: high_noise (bias 2) over [1, 1000); t = 999 drawn 10% of the time" in caplog.text
    # A run killed after step 2 and resumed draws what the unbroken run drew: the same weights.
    AcceleratorState._reset_state(reset_partial_state=True)
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = trainer_args(tiny_sdxl, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert train_sdxl_ztsnr.main(resumed)["step"] == 4
    name = "unet/diffusion_pytorch_model.safetensors"
    whole, again = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "resumed" / name))
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], atol=1e-6, rtol=0)


def unet_options_sampling(args):
    from sdxl_ztsnr.unet_options import timestep_sampling

    return timestep_sampling(args)
