"""Schedule math against independent references (diffusers' own functions) and the known limits."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from sdxl_ztsnr import schedule as S


def ddpm(rescale: bool) -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=S.SDXL_BETA_START,
        beta_end=S.SDXL_BETA_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        rescale_betas_zero_snr=rescale,
    )


def test_plain_sdxl_matches_diffusers_and_known_values():
    alpha_bar = S.alphas_cumprod(ztsnr=False)
    torch.testing.assert_close(alpha_bar, ddpm(False).alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    sigma = S.sigmas(alpha_bar)
    assert abs(sigma[0].item() - 0.0292) < 1e-4
    assert abs(sigma[-1].item() - 14.61) < 0.01
    assert abs(S.snr(alpha_bar)[-1].item() - 0.0047) < 1e-4


def test_rescale_matches_diffusers_rescale_zero_terminal_snr():
    betas = S.scaled_linear_betas().float()
    reference = torch.cumprod(1.0 - diffusers_rescale(betas.clone()), dim=0)
    ours = S.alphas_cumprod(ztsnr=True, sigma_max=math.inf)
    assert ours[-1].item() == 0.0
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-6)
    # the first value is unchanged by the rescale
    assert abs(ours[0].item() - S.alphas_cumprod(ztsnr=False)[0].item()) < 1e-7


def test_ztsnr_terminal_sigma_and_anchor_values():
    alpha_bar = S.alphas_cumprod(sigma_max=20000.0)
    sigma = S.sigmas(alpha_bar)
    assert abs(sigma[-1].item() - 20000.0) / 20000.0 < 1e-3
    assert abs(S.snr(alpha_bar)[-1].item() - 2.5e-9) < 1e-11
    assert abs(sigma[0].item() - 0.0292) < 1e-4
    for t, expected, tol in ((900, 18.4, 0.1), (950, 41.0, 0.5), (990, 246.0, 1.0), (998, 2254.0, 5.0)):
        assert abs(sigma[t].item() - expected) < tol, (t, sigma[t].item())
    assert torch.all(sigma[1:] > sigma[:-1]), "σ must increase with t"
    assert alpha_bar.dtype == torch.float32


@pytest.mark.parametrize("sigma_max", [20000.0, 4096.0, math.inf])
def test_monotone_and_finite_weights(sigma_max):
    alpha_bar = S.alphas_cumprod(sigma_max=sigma_max)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    for mode in S.LOSS_WEIGHTINGS:
        w = S.loss_weights(alpha_bar, mode)
        assert torch.isfinite(w).all(), mode
        assert (w >= 0).all(), mode


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noising_and_velocity_match_diffusers(seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    t[0] = 999
    reference = ddpm(True)
    alpha_bar = S.alphas_cumprod(sigma_max=math.inf)
    torch.testing.assert_close(
        S.add_noise(x0, noise, alpha_bar[t]), reference.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        S.v_target(x0, noise, alpha_bar[t]), reference.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5
    )


def test_pure_noise_limits_at_sigma_max_20000():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 16, 16, generator=g)  # unit scale, as scaled SDXL latents
    noise = torch.randn(4, 4, 16, 16, generator=g)
    alpha_bar_t = S.alphas_cumprod()[torch.full((4,), 999)]
    x_t = S.add_noise(x0, noise, alpha_bar_t)
    v = S.v_target(x0, noise, alpha_bar_t)
    # the residual is √ᾱ_T·x₀ = 5e-5·x₀: within 1e-4 per unit of input
    assert (x_t - noise).abs().mean() < 1e-4
    assert torch.all((x_t - noise).abs() <= 1e-4 * x0.abs().clamp_min(1.0))
    assert (v + x0).abs().mean() < 1e-4
    assert torch.all((v + x0).abs() <= 1e-4 * noise.abs().clamp_min(1.0))


@pytest.mark.parametrize("sigma_max", [20000.0, math.inf])
def test_x0_and_eps_recovered_from_v(sigma_max):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 500, 998, 999])
    alpha_bar_t = S.alphas_cumprod(sigma_max=sigma_max)[t]
    x_t = S.add_noise(x0, noise, alpha_bar_t)
    v = S.v_target(x0, noise, alpha_bar_t)
    torch.testing.assert_close(S.x0_from_v(x_t, v, alpha_bar_t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S.eps_from_v(x_t, v, alpha_bar_t), noise, rtol=1e-4, atol=1e-4)
    # a DDIM step to the same ᾱ is the identity; to ᾱ=1 it returns x̂₀
    torch.testing.assert_close(S.ddim_step(x_t, v, alpha_bar_t, alpha_bar_t), x_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S.ddim_step(x_t, v, alpha_bar_t, torch.ones(5)), x0, rtol=1e-4, atol=1e-4)


def test_min_snr_guard_keeps_pure_noise_step_trained():
    alpha_bar = S.alphas_cumprod()
    guarded = S.loss_weights(alpha_bar, "min_snr", gamma=5.0)
    unguarded = S.loss_weights(alpha_bar, "min_snr_unguarded", gamma=5.0)
    assert guarded[-1].item() == pytest.approx(1.0)
    assert unguarded[-1].item() < 1e-8
    # both agree with the textbook formula where SNR ≥ γ (the low-noise steps MinSNR exists to tame)
    snr = S.snr(alpha_bar).double()
    textbook = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    torch.testing.assert_close(unguarded.double(), textbook, rtol=1e-4, atol=1e-7)
    high = snr >= 5.0
    torch.testing.assert_close(guarded[high].double(), textbook[high], rtol=1e-4, atol=1e-7)
    # the guard is the same formula with SNR+1 in place of SNR
    torch.testing.assert_close(
        guarded.double(),
        torch.minimum(snr + 1, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1),
        rtol=1e-4,
        atol=1e-7,
    )
    assert torch.all(guarded >= unguarded - 1e-7)


def test_debiased_and_uniform_weights():
    alpha_bar = S.alphas_cumprod()
    snr = S.snr(alpha_bar).double()
    torch.testing.assert_close(
        S.loss_weights(alpha_bar, "debiased").double(), 1 / (snr + 1).sqrt(), rtol=1e-4, atol=1e-6
    )
    assert torch.all(S.loss_weights(alpha_bar, "uniform") == 1)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        S.loss_weights(alpha_bar, "nope")


def test_resolution_shift():
    alpha_bar = S.alphas_cumprod()
    assert S.resolution_shift(1024, 1024) == 1.0
    assert S.resolution_shift(2048, 2048) == 2.0
    t = torch.arange(0, 999, 7)
    torch.testing.assert_close(S.shift_timesteps(t, alpha_bar, 1.0), t)
    shifted = S.shift_timesteps(t, alpha_bar, 2.0)
    assert torch.all(shifted >= t) and torch.all(shifted <= 999)
    sigma = S.sigmas(alpha_bar)
    # the shifted timestep's σ is close to 2σ (within one step of the discrete ladder)
    mid = (t > 5) & (t < 900)
    ratio = sigma[shifted[mid]] / (2 * sigma[t[mid]])
    assert torch.all((ratio > 0.97) & (ratio < 1.03)), ratio
    g = torch.Generator().manual_seed(0)
    drawn = S.sample_timesteps(4096, alpha_bar, shift=2.0, generator=g)
    assert drawn.float().mean() > 510  # uniform would average 499.5


def test_inference_ladder_trailing_and_matches_diffusers_scheduler():
    t = S.inference_timesteps(10)
    assert t.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    ladder = S.inference_sigmas(S.alphas_cumprod(), 10)
    assert ladder[0].item() == pytest.approx(20000.0, rel=1e-3)
    assert ladder[-1].item() == 0.0
    assert torch.all(ladder[1:] < ladder[:-1])
    assert 17 < ladder[1].item() < 19
    scheduler = S.make_scheduler()
    assert isinstance(scheduler, EulerDiscreteScheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is True
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.long().tolist() == t.tolist()
    # diffusers swaps the exact zero for ᾱ_T = 2^-24 (σ ≈ 4096); the rest of the ladder is ours
    torch.testing.assert_close(scheduler.sigmas[1:].float(), ladder[1:], rtol=1e-3, atol=1e-4)
    assert scheduler.sigmas[0].item() == pytest.approx(4096, rel=1e-3)


def test_ten_step_ladder_is_the_design_one():
    ladder = S.inference_sigmas(S.alphas_cumprod(), 10).tolist()
    design = [20000, 18.1, 7.41, 4.11, 2.6, 1.77, 1.24, 0.875, 0.595, 0.355, 0]  # DESIGN.md, 3 digits
    assert ladder == pytest.approx(design, rel=2e-3, abs=0)


def test_trailing_ladder_for_every_step_count():
    """Issue 16: every n in 1..T gives n distinct timesteps from T−1 down to ≥ 0 (diffusers' own trailing rule
    gives n + 1 with a final −1 for some n) and a σ ladder from σ_max falling to 0."""
    T = S.NUM_TRAIN_TIMESTEPS
    alpha_bar = S.alphas_cumprod()
    diffusers_own = S.make_scheduler()  # trailing spacing, as diffusers computes it
    for n in range(1, T + 1):
        t = S.inference_timesteps(n)
        assert len(t) == n and t[0] == T - 1 and t[-1] >= 0, n
        assert torch.all(t[1:] < t[:-1]), n
        # t_i + 1 is T·(n−i)/n rounded, in integers: |2n(t_i+1) − 2T(n−i)| ≤ n (a tie may round either way).
        i = torch.arange(n)
        assert torch.all((2 * n * (t + 1) - 2 * T * (n - i)).abs() <= n), n
        # Where diffusers gets the count right its values are ours; where not, its first n are.
        diffusers_own.set_timesteps(n)
        assert diffusers_own.timesteps[:n].long().tolist() == t.tolist(), n
        for shift in (1.0, 2.0):
            ladder = S.inference_sigmas(alpha_bar, n, shift=shift)
            assert len(ladder) == n + 1 and ladder[-1] == 0.0, n
            assert ladder[0] == pytest.approx(S.NAI_SIGMA_MAX, rel=1e-6), n
            assert torch.all(ladder[1:] <= ladder[:-1]), (n, shift)
    # n = 61 ended [..., 15, -1], and σ at index -1 is σ_{T-1}: the ladder went back to σ_max for its last step.
    assert S.inference_timesteps(61).tolist()[-2:] == [32, 15]


def test_rescale_cfg_matches_diffusers():
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 4, 8, 8, generator=g)
    guided = cond * 3 + torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(
        S.rescale_cfg(guided, cond, 0.7),
        rescale_noise_cfg(guided, cond, guidance_rescale=0.7),
        rtol=1e-4,
        atol=1e-5,
    )


def test_plot_cli_writes_png(tmp_path):
    out = tmp_path / "schedule.png"
    S.main(["--plot", str(out)])
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
