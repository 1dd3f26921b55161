"""The sampling module and `python -m sdxl_ztsnr.sample` on the tiny model, against diffusers as a reference."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_ztsnr import sample as sample_command
from sdxl_ztsnr.console import USER_ERROR_EXIT_CODE, UserError
from sdxl_ztsnr.export import save_single_file
from sdxl_ztsnr.prompt_weighting import encode_weighted_prompts, parse_emphasis
from sdxl_ztsnr.sampling import (
    SAMPLERS,
    EntropyScaledAttention,
    attention_scaling,
    batches_by_chunks,
    build_scheduler,
    conditioning_chunks,
    denoise,
    first_step,
    generate,
    load_pipeline,
    make_scheduler,
    micro_conditioning,
    pipeline_conditioning,
    seeded_noise,
    set_ladder,
    training_alpha_bar,
)
from sdxl_ztsnr.schedule import alphas_cumprod, inference_sigmas, inference_timesteps, scheduler_config
from sdxl_ztsnr.schedule import sigmas as sigmas_of
from sdxl_ztsnr.text_encoding import encode_prompts
from sdxl_ztsnr.validation import sample_images

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(height=64, width=64, num_steps=2)
WORDS = "red blue green yellow cat dog tree sky".split()  # one token each in the tiny vocabulary
LONG_PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(100))  # two chunks


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    return load_pipeline(tiny_sdxl)


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------------------------------------------
# Ladder and samplers


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_ztsnr_ladder_starts_at_sigma_max(sampler):
    alpha_bar = training_alpha_bar(scheduler_config())
    scheduler = make_scheduler(sampler, scheduler_config(), 10, alpha_bar)
    torch.testing.assert_close(scheduler.sigmas, inference_sigmas(alphas_cumprod(), 10))
    assert scheduler.timesteps.long().tolist() == inference_timesteps(10).tolist()
    assert float(scheduler.sigmas[0]) == pytest.approx(20000.0, rel=1e-5)
    # σ_max is a flag: a model trained on another terminal σ samples from it.
    other = make_scheduler(sampler, scheduler_config(), 10, training_alpha_bar(scheduler_config(), 4096.0))
    assert float(other.sigmas[0]) == pytest.approx(4096.0, rel=1e-5)


def test_eps_model_keeps_its_own_scheduler_settings():
    sdxl_base = {**scheduler_config(ztsnr=False), "prediction_type": "epsilon", "timestep_spacing": "leading"}
    assert training_alpha_bar(sdxl_base) is None
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    for sampler, own_class in (("euler", EulerDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)):
        ours = make_scheduler(sampler, sdxl_base, 10)
        own = own_class.from_config(sdxl_base)
        own.set_timesteps(10)
        assert ours.timesteps.long().tolist() == own.timesteps.long().tolist()  # "leading", not trailing
        assert int(ours.timesteps[0]) < 999
        assert ours.config.prediction_type == "epsilon"
        assert float(ours.sigmas[0]) < 15.0


class GaussianDenoiser(torch.nn.Module):
    """A stand-in UNet: the exact v prediction for data x₀ ~ N(μ, s²) per element, at each ladder timestep."""

    def __init__(self, sigma_of_t: dict[int, float], mu: float = 0.3, s: float = 0.5):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and a dtype
        self.sigma_of_t, self.mu, self.s = sigma_of_t, mu, s

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def x0(self, x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
        a = 1.0 / (1.0 + sigma**2)  # ᾱ
        return self.mu + math.sqrt(a) * self.s**2 * (x_vp - math.sqrt(a) * self.mu) / (a * self.s**2 + 1 - a)

    def forward(self, x_vp, t, encoder_hidden_states=None, added_cond_kwargs=None):
        sigma = self.sigma_of_t[int(round(float(t)))]
        a = 1.0 / (1.0 + sigma**2)
        v = (math.sqrt(a) * x_vp.double() - self.x0(x_vp.double(), sigma)) / math.sqrt(1 - a)
        return SimpleNamespace(sample=v.float())


class RecordingDenoiser(GaussianDenoiser):
    """`GaussianDenoiser` that records the timesteps it is called at."""

    def __init__(self, sigma_of_t: dict[int, float]):
        super().__init__(sigma_of_t)
        self.seen: list[int] = []

    def forward(self, x_vp, t, **kwargs):
        self.seen.append(int(t))
        return super().forward(x_vp, t)


def reference_dpmpp_2m(denoiser: GaussianDenoiser, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M) in σ space (Lu et al. 2022, Algorithm 2), written out independently of diffusers."""
    old = None
    x = x.double()
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = denoiser.x0(x / math.sqrt(1 + sigma**2), sigma)
        if nxt == 0:
            x = denoised
            break
        h = math.log(sigma / nxt)
        if old is not None:
            r = math.log(sigmas[i - 1] / sigma) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        else:
            denoised_d = denoised
        x = (nxt / sigma) * x - math.expm1(-h) * denoised_d
        old = denoised
    return x.float()


def test_samplers_on_gaussian_data_match_reference_and_exact_solution():
    """From σ = 20000 both samplers follow the exact probability-flow ODE of Gaussian data; DPM++ 2M equals an
    independent DPM-Solver++(2M) step for step, and is the more accurate of the two."""
    alpha_bar = alphas_cumprod()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditioning = SimpleNamespace(tensors=lambda: (torch.zeros(2, 77, 8), torch.zeros(2, 4)) * 2)
    errors = {}
    for steps in (10, 30):
        sigmas = inference_sigmas(alpha_bar, steps).double().tolist()
        denoiser = GaussianDenoiser(dict(zip(inference_timesteps(steps).tolist(), sigmas, strict=False)))
        x_ve = noise.double() * math.sqrt(1 + sigmas[0] ** 2)  # what both samplers start from
        # The exact flow to the last nonzero σ, then the final step's x̂₀ there (every sampler ends on it).
        mu, s, last = denoiser.mu, denoiser.s, sigmas[-2]
        exact = mu + (x_ve - mu) * s**2 / math.sqrt((s**2 + sigmas[0] ** 2) * (s**2 + last**2))
        for sampler in ("euler", "dpmpp_2m"):
            scheduler = make_scheduler(sampler, scheduler_config(), steps, alpha_bar)
            out = denoise(denoiser, scheduler, conditioning, torch.zeros(2, 6), noise, guidance_scale=1.0)
            assert torch.isfinite(out).all()
            errors[sampler, steps] = float((out.double() - exact).abs().max())
            if sampler == "dpmpp_2m":
                torch.testing.assert_close(out, reference_dpmpp_2m(denoiser, x_ve, sigmas), rtol=0, atol=1e-4)
    # Measured: Euler 0.117 (10 steps) and 0.080 (30); DPM++ 2M 0.016 and 0.0085.
    for sampler in ("euler", "dpmpp_2m"):
        assert errors[sampler, 30] < errors[sampler, 10]
    assert errors["dpmpp_2m", 30] < 0.02 and errors["euler", 30] < 0.15
    assert errors["dpmpp_2m", 10] < errors["euler", 10] / 2


def test_img2img_starts_on_the_ladder_point_the_strength_picks():
    alpha_bar = alphas_cumprod()
    steps = 10
    sigmas = inference_sigmas(alpha_bar, steps).double().tolist()
    seen = []

    class Recorder(GaussianDenoiser):
        def forward(self, x_vp, t, **kwargs):
            seen.append(int(t))
            return super().forward(x_vp, t)

    denoiser = Recorder(dict(zip(inference_timesteps(steps).tolist(), sigmas, strict=False)))
    conditioning = SimpleNamespace(tensors=lambda: (torch.zeros(1, 77, 8), torch.zeros(1, 4)) * 2)
    init = torch.full((1, 4, 8, 8), 0.3)
    scheduler = make_scheduler("euler", scheduler_config(), steps, alpha_bar)
    denoise(denoiser, scheduler, conditioning, torch.zeros(1, 6), torch.zeros(1, 4, 8, 8), init, 0.35, 1.0)
    assert seen == inference_timesteps(steps).tolist()[-4:]  # round(10 · 0.35) = 4 steps: t = 299 … 0 + 99


STRENGTHS = (0.05, 0.35, 0.5, 1.0)  # 1.0 is text-to-image's whole ladder


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scheduler_ladder_for_every_step_count(sampler):
    """Issue 16: for every n in 1..1000 the scheduler holds n timesteps and the n + 1 σ of inference_sigmas, and
    image-to-image runs max(1, round(n·strength)) of them, noising the image to the σ of the first it runs."""
    config = scheduler_config()
    alpha_bar = training_alpha_bar(config)
    sigma_of_t = sigmas_of(alpha_bar)
    scheduler = build_scheduler(sampler, config)  # what make_scheduler builds, reused: building costs ~1 ms
    for n in range(1, 1001):
        set_ladder(scheduler, n, alpha_bar)
        timesteps = scheduler.timesteps.long()
        assert timesteps.tolist() == inference_timesteps(n).tolist(), n
        assert torch.equal(scheduler.sigmas, inference_sigmas(alpha_bar, n)), n
        for strength in STRENGTHS:
            start = first_step(len(timesteps), strength)
            assert len(timesteps[start:]) == max(1, round(n * strength)), (n, strength)
            sigma = float(scheduler.sigmas[start])
            assert sigma == pytest.approx(float(sigma_of_t[timesteps[start]]), rel=1e-6)
            scheduler.set_begin_index(start)
            noised = float(scheduler.add_noise(torch.zeros(1), torch.ones(1), timesteps[start : start + 1]))
            # Euler steps on x₀ + σ·ε, DPM++ on its variance-preserving form (x₀ + σ·ε)/√(1+σ²).
            expected = sigma if sampler == "euler" else sigma / math.sqrt(1 + sigma**2)
            assert noised == pytest.approx(expected, rel=1e-5), (n, strength)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_denoise_runs_the_whole_ladder_for_step_counts_diffusers_got_wrong(sampler):
    """The loop itself, on n where diffusers' trailing rule gave n + 1 timesteps: it calls the model on exactly
    the ladder's last max(1, round(n·strength)) timesteps and ends on σ = 0."""
    alpha_bar = alphas_cumprod()
    conditioning = SimpleNamespace(tensors=lambda: (torch.zeros(1, 77, 8), torch.zeros(1, 4)) * 2)
    for n in (61, 103, 121):
        ladder = inference_timesteps(n).tolist()
        denoiser = RecordingDenoiser(dict(zip(ladder, inference_sigmas(alpha_bar, n).tolist(), strict=False)))
        for strength in (1.0, 0.35):
            denoiser.seen.clear()
            scheduler = make_scheduler(sampler, scheduler_config(), n, alpha_bar)
            init = None if strength == 1.0 else torch.full((1, 4, 8, 8), 0.3)
            noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(n))
            out = denoise(denoiser, scheduler, conditioning, torch.zeros(1, 6), noise, init, strength, 1.0)
            assert denoiser.seen == ladder[n - max(1, round(n * strength)) :], (n, strength)
            assert scheduler.step_index == n and float(scheduler.sigmas[scheduler.step_index]) == 0.0
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_own_trailing_spacing_gets_n_timesteps(sampler):
    """A model without ZTSNR whose config says "trailing" samples on diffusers' own ladder, n timesteps long."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = scheduler_config(ztsnr=False)
    assert training_alpha_bar(config) is None and config["timestep_spacing"] == "trailing"
    own_class = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[sampler]
    own = own_class.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    wrong = [n for n in range(1, 1001) if len(np.arange(1000, 0, -1000 / n)) != n]  # 61, 103, 121, ...
    assert wrong[:3] == [61, 103, 121]
    ours = build_scheduler(sampler, config)
    for n in [1, 10, 28, 1000, *wrong]:
        set_ladder(ours, n)
        own.set_timesteps(n)
        assert ours.timesteps.long().tolist() == own.timesteps[:n].long().tolist(), n
        torch.testing.assert_close(ours.sigmas[:n], own.sigmas[:n])
        assert len(ours.sigmas) == n + 1 and ours.sigmas[-1] == 0 and ours.timesteps.min() >= 0, n


# ---------------------------------------------------------------------------------------------------------------
# Against diffusers' own pipeline


def test_generate_matches_diffusers_pipeline_with_our_sigmas(pipe):
    """Our loop and StableDiffusionXLPipeline(sigmas=…) agree on the same embeddings, seed and ladder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    prompt, negative = "1girl, solo, red hair", "worst quality"
    cond = pipeline_conditioning(pipe, [prompt], [negative])
    # Short prompts are encoded as diffusers encodes them (penultimate states, pooled from encoder 2).
    reference = pipe.encode_prompt(prompt, negative_prompt=negative, do_classifier_free_guidance=True)
    for ours, theirs in zip(
        cond.tensors(), (reference[0], reference[2], reference[1], reference[3]), strict=True
    ):
        torch.testing.assert_close(ours, theirs)

    ours = generate(pipe, [prompt], [negative], [3], guidance_scale=4.0, **SMALL)[0]
    ladder = inference_sigmas(alphas_cumprod(), 2).tolist()
    reference_pipe = StableDiffusionXLPipeline(**pipe.components)
    reference_pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference_pipe.set_progress_bar_config(disable=True)
    theirs = reference_pipe(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled,
        negative_prompt_embeds=cond.negative_prompt_embeds,
        negative_pooled_prompt_embeds=cond.negative_pooled,
        sigmas=ladder,
        guidance_scale=4.0,
        guidance_rescale=0.7,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    assert np.abs(as_array(ours) - as_array(theirs)).max() <= 1


def test_batched_images_equal_one_by_one(pipe):
    prompts, negatives, seeds = ["1girl, solo", "blue sky"], ["", "low quality"], [5, 6]
    together = generate(pipe, prompts, negatives, seeds, batch_size=2, **SMALL)
    alone = [
        generate(pipe, [p], [n], [s], **SMALL)[0] for p, n, s in zip(prompts, negatives, seeds, strict=True)
    ]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(as_array(a) - as_array(b)).max() <= 1
    assert np.abs(as_array(together[0]) - as_array(together[1])).mean() > 1


def test_batches_by_chunks_groups_rows_of_one_count_in_order():
    assert batches_by_chunks([1, 2, 1, 1, 2, 3], 2) == [[0, 2], [3], [1, 4], [5]]
    assert batches_by_chunks([2, 2, 2], 1) == [[0], [1], [2]]
    assert batches_by_chunks([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        batches_by_chunks([1], 0)


def test_conditioning_chunks_are_what_a_row_alone_is_encoded_with(pipe):
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    prompts = ["cat", LONG_PROMPT, "cat", f"({LONG_PROMPT}:1.2)", "(" * 80 + "cat"]
    negatives = ["", "", LONG_PROMPT, "", ""]
    counts = conditioning_chunks(tokenizers, prompts, negatives)
    assert counts == [1, 2, 2, 2, 1]  # emphasis markup is not text; without emphasis the 80 "(" are
    assert conditioning_chunks(tokenizers, prompts, negatives, emphasis=False)[3:] == [2, 2]
    for prompt, negative, count in zip(prompts, negatives, counts, strict=True):
        alone = pipeline_conditioning(pipe, [prompt], [negative])
        assert alone.prompt_embeds.shape[1] == alone.negative_prompt_embeds.shape[1] == 77 * count


# How close a batched image's latents come to the one sampled alone. Not bitwise: CPU matmuls of batches of 2 and
# 1 round differently (measured ≤ 5e-6 with DPM++). Euler's first step from σ = 20000 sums terms of ~20000·ε in
# fp32 (ulp ~2e-3), which turns such a difference into a rounding step of its result now and then (measured
# 2.5e-4 on one row); both stay far below what padding with empty chunks changes (0.09).
BATCH_TOLERANCE = {"dpmpp_2m": 2e-5, "euler": 1e-3}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_mixed_length_batch_gives_each_image_as_alone(pipe, sampler):
    """Issue 16: short and > 75-token prompts and negatives in one batch; each image equals the one sampled
    alone with its seed, where one UNet call for the batch padded the short rows with empty chunks."""
    prompts = ["1girl, solo", LONG_PROMPT, "blue sky", "red hair"]
    negatives = ["", "low quality", LONG_PROMPT, "worst quality"]  # row 2: short prompt, long negative
    seeds = [5, 6, 7, 8]
    options = dict(SMALL, sampler=sampler, output_type="latent")
    together = generate(pipe, prompts, negatives, seeds, batch_size=4, **options)
    for prompt, negative, seed, batched in zip(prompts, negatives, seeds, together, strict=True):
        alone = generate(pipe, [prompt], [negative], [seed], **options)[0]
        assert batched.shape == alone.shape == (4, 8, 8)
        torch.testing.assert_close(batched, alone, rtol=0, atol=BATCH_TOLERANCE[sampler])
    # The tolerance tells the two apart: the short prompt padded to two chunks, as one UNet call for rows 0
    # and 1 pads it, samples latents far from its own.
    padded = pipeline_conditioning(pipe, prompts[:2], negatives[:2])
    assert padded.prompt_embeds.shape[1] == 2 * 77
    alpha_bar = training_alpha_bar(pipe.scheduler.config)
    latents = denoise(
        pipe.unet,
        make_scheduler(sampler, pipe.scheduler.config, SMALL["num_steps"], alpha_bar),
        padded,
        micro_conditioning((64, 64), (0, 0), (64, 64)).expand(2, -1),
        seeded_noise((4, 8, 8), seeds[:2]),
    )
    assert (latents[0] - together[0]).abs().max() > 50 * BATCH_TOLERANCE[sampler]


def test_generate_returns_images_in_prompt_order_across_chunk_groups(pipe):
    prompts, seeds = ["cat", LONG_PROMPT, "cat"], [1, 2, 1]
    advanced = []
    images = generate(pipe, prompts, [""] * 3, seeds, batch_size=3, on_step=advanced.append, **SMALL)
    # Two UNet batches (two chunk counts); each step reports its images: a bar of images × steps ends full.
    assert sorted(set(advanced)) == [1, 2] and sum(advanced) == 3 * SMALL["num_steps"]
    assert [image.size for image in images] == [(64, 64)] * 3
    assert np.array_equal(as_array(images[0]), as_array(images[2]))  # rows 0 and 2 share a UNet call
    assert np.abs(as_array(images[0]) - as_array(images[1])).mean() > 0.5


def test_prompt_over_75_tokens_changes_the_image(pipe):
    words = "red blue green yellow cat dog tree sky".split()
    tokens = [words[i % len(words)] for i in range(100)]  # one token per word in the tiny vocabulary
    long_prompt, first_75 = " ".join(tokens), " ".join(tokens[:75])
    embeds, _ = encode_prompts(
        [long_prompt], (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    )
    assert embeds.shape[1] == 2 * 77  # two chunks, as in training
    long_image, short_image = (generate(pipe, [p], [""], [0], **SMALL)[0] for p in (long_prompt, first_75))
    assert np.abs(as_array(long_image) - as_array(short_image)).mean() > 0.5


def test_empty_negative_follows_force_zeros_for_empty_prompt(pipe):
    cond = pipeline_conditioning(pipe, ["cat", "cat"], ["", "dog"])
    assert pipe.config.force_zeros_for_empty_prompt
    assert cond.negative_prompt_embeds[0].abs().max() == 0 and cond.negative_pooled[0].abs().max() == 0
    assert cond.negative_prompt_embeds[1].abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# Emphasis


def test_parse_emphasis_reads_a1111_syntax():
    assert parse_emphasis("1girl, solo") == [("1girl, solo", 1.0)]
    parsed = parse_emphasis("a (b) [c] (d:1.5) ((e))")
    assert [text for text, _ in parsed] == ["a ", "b", " ", "c", " ", "d", " ", "e"]
    assert [w for _, w in parsed] == pytest.approx([1.0, 1.1, 1.0, 1 / 1.1, 1.0, 1.5, 1.0, 1.21])
    assert parse_emphasis(r"smile \(expression\)") == [("smile (expression)", 1.0)]
    # A weight needs ")": "[c:0.5]" is text divided by 1.1, and the "(" that never closes applies to the rest.
    parsed = parse_emphasis("a (b [c:0.5] d")
    assert [text for text, _ in parsed] == ["a ", "b ", "c:0.5", " d"]
    assert [w for _, w in parsed] == pytest.approx([1.0, 1.1, 1.0, 1.1])
    assert parse_emphasis("x) y:2") == [("x) y:2", 1.0)]  # unmatched closers and colons stay text
    assert parse_emphasis("") == [("", 1.0)]
    # A backslash that escapes nothing is dropped, as A1111 drops it; one that escapes a backslash is kept.
    assert parse_emphasis(r"a\b") == [("ab", 1.0)]
    assert parse_emphasis("a\\") == [("a", 1.0)]
    assert parse_emphasis(r"a\\b (c\d)") == [("a\\b ", 1.0), ("cd", 1.1)]


def test_emphasis_weights_tokens_and_keeps_each_chunk_mean(pipe):
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    plain, plain_pooled = encode_prompts(["red cat, blue sky"], tokenizers, encoders)
    same, same_pooled = encode_weighted_prompts(["red cat, blue sky"], tokenizers, encoders)
    assert torch.equal(plain, same) and torch.equal(plain_pooled, same_pooled)  # no markup: training path
    weighted, weighted_pooled = encode_weighted_prompts(["red (cat:1.5), blue sky"], tokenizers, encoders)
    assert torch.equal(weighted_pooled, plain_pooled)
    width_1 = encoders[0].config.hidden_size
    for part in (slice(0, width_1), slice(width_1, None)):
        a, b = plain[0, :, part], weighted[0, :, part]
        assert a.mean().item() == pytest.approx(b.mean().item(), rel=1e-4, abs=1e-6)
        changed = (a - b).abs().amax(dim=-1) > 1e-6
        assert changed.any()
    # Brackets read as text with emphasis off: the tokens differ from the weighted prompt's.
    verbatim, _ = encode_weighted_prompts(["red (cat:1.5), blue sky"], tokenizers, encoders, emphasis=False)
    torch.testing.assert_close(verbatim, encode_prompts(["red (cat:1.5), blue sky"], tokenizers, encoders)[0])


# ---------------------------------------------------------------------------------------------------------------
# Attention scaling


def test_entropy_scaled_attention_against_explicit_softmax(pipe):
    attention = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(2, 64, attention.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = attention(x)
        same = EntropyScaledAttention(1.0)(attention, x)
        torch.testing.assert_close(same, default, rtol=1e-5, atol=1e-6)
        processor = EntropyScaledAttention(0.25)  # the canvas has 4× the trained area
        factor = math.sqrt(math.log(64) / math.log(16))
        assert processor.factor(64) == pytest.approx(factor)
        q, k, v = (
            layer(x).view(2, 64, attention.heads, -1).transpose(1, 2)
            for layer in (attention.to_q, attention.to_k, attention.to_v)
        )
        logits = q @ k.transpose(-1, -2) * factor / math.sqrt(q.shape[-1])
        expected = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 64, -1)
        expected = attention.to_out[0](expected)
        torch.testing.assert_close(processor(attention, x), expected, rtol=1e-4, atol=1e-5)


def test_attention_scaling_changes_only_large_canvases(pipe):
    before = dict(pipe.unet.attn_processors)
    with attention_scaling(pipe.unet, 0.25):
        scaled = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, EntropyScaledAttention)]
        assert scaled and all(n.endswith("attn1.processor") for n in scaled)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {
        k: type(v) for k, v in before.items()
    }
    at_base = generate(pipe, ["cat"], [""], [1], base_resolution=64, **SMALL)[0]
    assert np.array_equal(as_array(at_base), as_array(generate(pipe, ["cat"], [""], [1], **SMALL)[0]))
    large = dict(SMALL, height=128, width=128)
    plain = generate(pipe, ["cat"], [""], [1], **large)[0]
    scaled = generate(pipe, ["cat"], [""], [1], base_resolution=64, **large)[0]
    assert np.abs(as_array(plain) - as_array(scaled)).mean() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Validation delegates here


def test_validation_sample_images_keeps_its_parameters(pipe):
    images = sample_images(pipe, ["cat", "dog"], 2, 2, 5.0, 0.7, alphas_cumprod(), 64, 64, seed=4)
    assert len(images) == 4 and all(image.size == (64, 64) for image in images)
    again = sample_images(pipe, ["cat", "dog"], 2, 2, 5.0, 0.7, alphas_cumprod(), 64, 64, seed=4)
    assert all(np.array_equal(as_array(a), as_array(b)) for a, b in zip(images, again, strict=True))
    assert np.abs(as_array(images[0]) - as_array(images[1])).mean() > 1  # each image its own seed


# ---------------------------------------------------------------------------------------------------------------
# The command


def parse_parameters(text: str) -> dict:
    """Read A1111's PNG ``parameters`` text back (written here independently of the writer)."""
    lines = text.split("\n")
    result = {"prompt": lines[0], "negative_prompt": ""}
    for line in lines[1:-1]:
        if line.startswith("Negative prompt: "):
            result["negative_prompt"] = line[len("Negative prompt: ") :]
    for match in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', lines[-1]):
        key, value = match.group(1).strip(), match.group(2).strip()
        result[key] = json.loads(value) if value.startswith('"') else value
    return result


def run_sample(*argv: str) -> list[Path]:
    return sample_command.main(sample_command.parse_args(list(argv)))


@pytest.fixture(scope="module")
def single_file(tiny_sdxl, pipe, tmp_path_factory):
    """The tiny model as one fp32 .safetensors, and a config directory whose scheduler says plain ε SDXL:
    the file's v_pred/ztsnr markers must win over it."""
    out = tmp_path_factory.mktemp("single")
    path = save_single_file(
        out / "tiny.safetensors",
        *(getattr(pipe, n).state_dict() for n in ("unet", "vae", "text_encoder", "text_encoder_2")),
        dtype=None,
    )
    config = out / "config"
    shutil.copytree(tiny_sdxl, config)
    scheduler_file = config / "scheduler" / "scheduler_config.json"
    eps = {
        **json.loads(scheduler_file.read_text()),
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
    }
    scheduler_file.write_text(json.dumps({**eps, "timestep_spacing": "leading"}))
    return path, config


def test_sample_command_directory_and_single_file_give_the_same_image(tiny_sdxl, single_file, tmp_path):
    path, config = single_file
    common = ["--prompt", "1girl, (solo:1.2), red hair", "--negative_prompt", "worst quality, low: 2", "--seed", "11",
              "--steps", "2", "--width", "64", "--height", "64", "--num_images", "2", "--sampler", "dpmpp_2m"]  # fmt: skip
    from_dir = run_sample(
        "--model", str(tiny_sdxl), "--out", str(tmp_path / "dir"), "--grid", str(tmp_path / "g.png"), *common
    )
    from_file = run_sample(
        "--model", str(path), "--config", str(config), "--out", str(tmp_path / "file"), *common
    )
    assert [p.name for p in from_dir] == ["00000-11.png", "00001-12.png"]
    assert Image.open(tmp_path / "g.png").size == (128, 64)
    for a, b in zip(from_dir, from_file, strict=True):
        assert np.array_equal(as_array(Image.open(a)), as_array(Image.open(b)))

    info = parse_parameters(Image.open(from_file[1]).text["parameters"])
    assert info["prompt"] == "1girl, (solo:1.2), red hair"
    assert info["negative_prompt"] == "worst quality, low: 2"
    assert info["Steps"] == "2" and info["Sampler"] == "DPM++ 2M" and info["CFG scale"] == "5.0"
    assert info["Seed"] == "12" and info["Size"] == "64x64" and info["Model"] == "tiny"
    assert info["Noise Schedule"] == "Zero Terminal SNR" and info["CFG Rescale phi"] == "0.7"
    assert re.fullmatch(r"[0-9a-f]{10}", info["Model hash"])
    assert list(info)[2:7] == ["Steps", "Sampler", "CFG scale", "Seed", "Size"]  # A1111's order


def test_parameters_quote_values_with_commas():
    from sdxl_ztsnr.sampling import a1111_parameters

    text = a1111_parameters("a, b", "", {"Steps": 3, "Model": "x, y: z", "Skipped": None})
    assert text == 'a, b\nSteps: 3, Model: "x, y: z"'
    assert parse_parameters(text)["Model"] == "x, y: z"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{tmp}/missing"], "--model .*missing: no such file or directory"),
        (["--model", "{tmp}/model.ckpt"], r"--model .*model.ckpt: a single file must be .safetensors"),
        (["--model", "{tiny}", "--width", "60"], "--width/--height must be positive multiples of 32"),
        (["--model", "{tiny}", "--steps", "0"], "--steps must be at least 1"),
        (["--model", "{tiny}", "--out", "{tmp}/model.ckpt"], "--out .*: exists and is not a directory"),
    ],
)
def test_sample_command_user_errors_are_one_line(tiny_sdxl, tmp_path, argv, message):
    (tmp_path / "model.ckpt").write_bytes(b"not a model")
    argv = [a.format(tmp=tmp_path, tiny=tiny_sdxl) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(UserError) as raised:
        run_sample("--prompt", "cat", "--width", "64", "--height", "64", *argv)
    text = str(raised.value)
    assert re.search(message, text) and "\n" not in text


@pytest.mark.slow
def test_single_file_without_config_offline_says_to_pass_config(single_file, tmp_path):
    """In a fresh process (offline, as on an air-gapped machine): one line, no traceback, non-zero exit."""
    path, _ = single_file
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_ztsnr.sample", "--model", str(path), "--prompt", "cat", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == USER_ERROR_EXIT_CODE
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --model") and "--config DIR" in last


def test_micro_conditioning_and_noise_are_per_row():
    assert micro_conditioning((96, 128), (32, 0), (64, 64)).tolist() == [96, 128, 32, 0, 64, 64]
    both = seeded_noise((4, 8, 8), [1, 2])
    assert torch.equal(both[1], seeded_noise((4, 8, 8), [2])[0])
