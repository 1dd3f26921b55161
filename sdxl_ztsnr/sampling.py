"""The one sampling path: validation, `python -m sdxl_ztsnr.sample` and upscale.py all come through here.

- Schedule: a model whose scheduler config says rescale_betas_zero_snr samples from σ_max (20000, NAI V3
  §2.2) with trailing spacing (Lin et al. 2023, §3.2-3.3) on `sdxl_ztsnr.schedule`'s ladder; any other model
  (plain ε SDXL) samples with its own scheduler settings. Euler and DPM++ 2M are diffusers'
  EulerDiscreteScheduler and DPMSolverMultistepScheduler given that ladder.
- Conditioning: both CLIP encoders through the training chunking (75-token chunks concatenated), A1111
  emphasis (`sdxl_ztsnr.prompt_weighting`), per-sample SDXL micro-conditioning.
- One loop (`denoise`) for text-to-image and image-to-image: the strength picks where on the ladder it starts.
  CFG with rescale φ (Lin et al. 2023, eq. 15-16). Every image or tile has its own seed, and a UNet call batches
  only prompts of one chunk count, so a batch gives the same images as one at a time.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl_ztsnr.console import UserError, loading_model
from sdxl_ztsnr.prompt_weighting import encode_weighted_prompts, prompt_chunk_counts
from sdxl_ztsnr.schedule import (
    NAI_SIGMA_MAX,
    SDXL_BETA_END,
    SDXL_BETA_START,
    alphas_cumprod,
    inference_sigmas,
    inference_timesteps,
    rescale_cfg,
)

Sampler = Literal["euler", "dpmpp_2m"]
SAMPLERS: tuple[str, ...] = ("euler", "dpmpp_2m")
A1111_SAMPLER_NAMES = {"euler": "Euler", "dpmpp_2m": "DPM++ 2M"}  # the names A1111 writes in PNG info


# ---------------------------------------------------------------------------------------------------------------
# Schedule and scheduler


def training_alpha_bar(scheduler_config: Mapping, sigma_max: float = NAI_SIGMA_MAX) -> torch.Tensor | None:
    """ᾱ to sample a ZTSNR model with (terminal σ = sigma_max); None when the model samples on its own settings.

    ZTSNR means rescale_betas_zero_snr in the config on SDXL's scaled_linear betas. diffusers' own schedulers
    stand in σ ≈ 4096 for SNR 0; the returned ᾱ gives the σ_max the model was trained with.
    """
    if not scheduler_config.get("rescale_betas_zero_snr", False):
        return None
    sdxl_betas = (
        scheduler_config.get("beta_schedule", "scaled_linear") == "scaled_linear"
        and math.isclose(scheduler_config.get("beta_start", SDXL_BETA_START), SDXL_BETA_START)
        and math.isclose(scheduler_config.get("beta_end", SDXL_BETA_END), SDXL_BETA_END)
        and scheduler_config.get("trained_betas") is None
    )
    if not sdxl_betas:
        return None
    if not math.isfinite(sigma_max) or sigma_max <= 0:
        raise UserError(f"--sigma_max must be a positive finite number to sample from, got {sigma_max}")
    return alphas_cumprod(True, sigma_max, scheduler_config.get("num_train_timesteps", 1000))


# Config options under which diffusers computes its σ another way and refuses explicit `timesteps=`.
_SIGMA_REWRITES = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
)


def make_scheduler(
    sampler: Sampler,
    scheduler_config: Mapping,
    num_steps: int,
    alpha_bar: torch.Tensor | None = None,
):
    """A diffusers Euler or DPM++ 2M scheduler with its timesteps set for ``num_steps`` steps (`set_ladder`)."""
    scheduler = build_scheduler(sampler, scheduler_config)
    set_ladder(scheduler, num_steps, alpha_bar)
    return scheduler


def build_scheduler(sampler: Sampler, scheduler_config: Mapping):
    """diffusers' EulerDiscreteScheduler or DPMSolverMultistepScheduler (DPM++ 2M) from a model's config, no
    timesteps set yet; the last σ is 0 either way."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config["final_sigmas_type"] = "zero"
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
        )
    raise UserError(f"--sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")


def set_ladder(scheduler, num_steps: int, alpha_bar: torch.Tensor | None = None) -> None:
    """Set a `build_scheduler` scheduler's timesteps (n) and σ (n + 1) for ``num_steps`` steps; resets its state.

    With ``alpha_bar`` the ladder is `schedule.inference_sigmas(alpha_bar, num_steps)`: trailing timesteps
    from t = T−1, first σ = σ_max, last 0; both schedulers step on exactly those σ. DPM++ 2M takes its
    first step at first order (no history yet), where x̂₀ = √ᾱ·x − √(1−ᾱ)·v̂ is finite at σ = 20000.
    Without ``alpha_bar`` the scheduler keeps the config's own spacing (an ε model's "leading" ladder);
    "trailing" gets its timesteps from `schedule.inference_timesteps`, diffusers' own but always n of them.
    """
    config = scheduler.config
    if alpha_bar is None:
        if config.get("timestep_spacing") == "trailing" and not any(config.get(k) for k in _SIGMA_REWRITES):
            timesteps = inference_timesteps(num_steps, config.num_train_timesteps)
            scheduler.set_timesteps(timesteps=timesteps.tolist())
        else:
            scheduler.set_timesteps(num_steps)
        return
    timesteps = inference_timesteps(num_steps, len(alpha_bar))
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    # Both schedulers read every σ from `sigmas` (step, input scaling, add_noise, init_noise_sigma); diffusers
    # derived them from its own ᾱ_T = 2⁻²⁴, so only the first differs: σ_max replaces 4096.
    scheduler.sigmas = inference_sigmas(alpha_bar, num_steps).to(torch.float32)


def first_step(num_steps: int, strength: float) -> int:
    """Index on an n-step ladder where image-to-image starts: the last max(1, round(n·strength)) steps run."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"the denoising strength must be in (0, 1], got {strength}")
    return num_steps - max(1, round(num_steps * strength))


# ---------------------------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Conditioning:
    """Text conditioning of a batch: (B, 77·k, C) hidden states and (B, P) pooled, prompt and negative."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled: torch.Tensor

    def select(self, rows: Sequence[int] | torch.Tensor) -> Conditioning:
        """The rows ``rows`` of every tensor (repeat a row by naming it several times)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Conditioning(*(t[rows.to(t.device)] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.prompt_embeds, self.pooled, self.negative_prompt_embeds, self.negative_pooled


@torch.no_grad()
def encode_conditioning(
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    force_zeros_for_empty_prompt: bool = True,
    emphasis: bool = True,
    max_chunks: int = 3,
) -> Conditioning:
    """Encode prompts and negatives together so both get the same number of chunks (the shorter are padded
    with empty chunks, which is what encoding them with more chunks gives). An empty negative is all zeros
    when the model says ``force_zeros_for_empty_prompt`` (SDXL's choice), else the encoded empty prompt.

    Padding is not neutral: cross-attention spreads its softmax over the padding tokens too, so a row's image
    depends on the batch's chunk count. Batch only rows of equal `conditioning_chunks` for images that do not."""
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    embeds, pooled = encode_weighted_prompts(
        list(prompts) + list(negative_prompts), tokenizers, text_encoders, max_chunks, emphasis
    )
    count = len(prompts)
    negative_embeds, negative_pooled = embeds[count:].clone(), pooled[count:].clone()
    if force_zeros_for_empty_prompt:
        empty = torch.tensor([not negative for negative in negative_prompts], device=embeds.device)
        negative_embeds[empty] = 0.0
        negative_pooled[empty] = 0.0
    return Conditioning(embeds[:count], pooled[:count], negative_embeds, negative_pooled)


def conditioning_chunks(
    tokenizers: Sequence,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    emphasis: bool = True,
    max_chunks: int = 3,
) -> list[int]:
    """Chunks `encode_conditioning` gives row i alone: its prompt's or its negative's count, the larger."""
    counts = prompt_chunk_counts([*prompts, *negative_prompts], tokenizers, max_chunks, emphasis)
    return [max(pair) for pair in zip(counts[: len(prompts)], counts[len(prompts) :], strict=True)]


def batches_by_chunks(chunk_counts: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of at most ``batch_size`` rows of one chunk count; rows keep their order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[int, list[int]] = {}
    for row, count in enumerate(chunk_counts):
        groups.setdefault(count, []).append(row)
    return [rows[i : i + batch_size] for rows in groups.values() for i in range(0, len(rows), batch_size)]


def pipeline_conditioning(pipeline, prompts, negative_prompts, emphasis: bool = True) -> Conditioning:
    """`encode_conditioning` with a StableDiffusionXLPipeline's tokenizers, encoders and empty-prompt rule."""
    return encode_conditioning(
        (pipeline.tokenizer, pipeline.tokenizer_2),
        (pipeline.text_encoder, pipeline.text_encoder_2),
        prompts,
        negative_prompts,
        force_zeros_for_empty_prompt=bool(pipeline.config.get("force_zeros_for_empty_prompt", True)),
        emphasis=emphasis,
    )


def micro_conditioning(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's six size numbers (Podell et al. 2023, §2.2), height first: (6,) fp32."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i from a CPU generator seeded with seeds[i] (device-independent)."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def denoise(
    unet: torch.nn.Module,
    scheduler,
    conditioning: Conditioning,
    time_ids: torch.Tensor,
    noise: torch.Tensor,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.7,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample (B, 4, h, w) latents: from pure noise, or from ``init_latents`` noised to the ladder point that
    ``strength`` picks (image-to-image). Returns fp32 latents in the UNet's (normalised) latent space.

    ``scheduler`` comes from `make_scheduler` (timesteps set; it is consumed). ``time_ids`` is (B, 6).
    CFG runs the negative and the prompt as one batch of 2B; with guidance_scale ≤ 1 only the prompt runs.
    Latents and the scheduler's arithmetic stay fp32 whatever the UNet's dtype (σ reaches 20000).
    """
    device, dtype = unet.device, unet.dtype
    noise = noise.to(device=device, dtype=torch.float32)
    start = 0 if init_latents is None else first_step(len(scheduler.timesteps), strength)
    timesteps = scheduler.timesteps[start:]
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        scheduler.set_begin_index(start)
        latents = scheduler.add_noise(init_latents.to(device, torch.float32), noise, timesteps[:1])
    cfg = guidance_scale > 1.0
    cond = [t.to(device=device, dtype=dtype) for t in conditioning.tensors()]
    embeds, pooled = (torch.cat([cond[2], cond[0]]), torch.cat([cond[3], cond[1]])) if cfg else cond[:2]
    time_ids = time_ids.to(device=device, dtype=dtype)
    added = {"text_embeds": pooled, "time_ids": torch.cat([time_ids, time_ids]) if cfg else time_ids}
    for t in timesteps:
        model_input = torch.cat([latents, latents]) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t).to(dtype)
        output = unet(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.float()
        if cfg:
            uncond, text = output.chunk(2)
            output = uncond + guidance_scale * (text - uncond)
            if guidance_rescale > 0.0:
                output = rescale_cfg(output, text, guidance_rescale)
        latents = scheduler.step(output, t, latents).prev_sample
        if on_step is not None:
            on_step()
    return latents


# ---------------------------------------------------------------------------------------------------------------
# VAE


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, -1, 1, 1)
    return (
        torch.tensor(mean, device=like.device).view(shape),
        torch.tensor(std, device=like.device).view(shape),
    )


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, 4, H/8, W/8) fp32 latents as the UNet sees them: the posterior
    mean, scaled by scaling_factor, or normalised by latents_mean/std when the VAE config has them (as
    diffusers' SDXL img2img pipeline does)."""
    vae_dtype = next(vae.parameters()).dtype
    latents = vae.encode(pixels.to(vae.device, vae_dtype)).latent_dist.mean.float()
    stats = _latent_stats(vae, latents)
    if stats is None:
        return latents * vae.config.scaling_factor
    mean, std = stats
    return (latents - mean) * vae.config.scaling_factor / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) UNet-space latents -> (B, 3, 8h, 8w) fp32 pixels in [0, 1]; the inverse of encode_images."""
    latents = latents.float()
    stats = _latent_stats(vae, latents)
    if stats is None:
        latents = latents / vae.config.scaling_factor
    else:
        mean, std = stats
        latents = latents * std / vae.config.scaling_factor + mean
    vae_dtype = next(vae.parameters()).dtype
    pixels = vae.decode(latents.to(vae.device, vae_dtype)).sample.float()
    return (pixels / 2 + 0.5).clamp(0, 1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB images (rounded to 8 bits)."""
    array = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(row) for row in array]


# ---------------------------------------------------------------------------------------------------------------
# Attention scaling for canvases above the trained resolution


class EntropyScaledAttention:
    """Self-attention whose logits are multiplied by √(log n / log n_train) (Jin et al. 2023, arXiv:2306.08645).

    n is the number of tokens the layer attends over; n_train = n · token_ratio is what the same layer saw at
    the trained resolution (token_ratio = trained area / sampled area, the same at every UNet level). Keeps
    the attention entropy of the trained resolution; the factor is 1 at the trained size.
    """

    def __init__(self, token_ratio: float):
        self.token_ratio = float(token_ratio)

    def factor(self, tokens: int) -> float:
        trained = tokens * self.token_ratio
        if tokens <= 1 or trained <= 1:
            return 1.0
        return math.sqrt(math.log(tokens) / math.log(trained))

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(
                "EntropyScaledAttention handles unmasked self-attention on (B, N, C) tokens only"
            )
        batch, tokens, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, N, heads·d) -> (B, heads, N, d)
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale * self.factor(tokens))
        out = out.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def attention_scaling(unet: torch.nn.Module, token_ratio: float | None) -> Iterator[None]:
    """Within the block, the UNet's self-attention layers (attn1) use `EntropyScaledAttention`; None: no change."""
    if token_ratio is None:
        yield
        return
    before = unet.attn_processors
    scaled = EntropyScaledAttention(token_ratio)
    unusual = [name for name, module in unet.named_modules() if name.endswith("attn1") and _unusual(module)]
    if unusual:
        raise ValueError(f"attention scaling: {unusual[0]} has normalisation layers this processor lacks")
    unet.set_attn_processor(
        {name: scaled if name.endswith("attn1.processor") else p for name, p in before.items()}
    )
    try:
        yield
    finally:
        unet.set_attn_processor(before)


def _unusual(attention) -> bool:
    return any(
        getattr(attention, name, None) is not None for name in ("spatial_norm", "group_norm", "norm_q")
    )


# ---------------------------------------------------------------------------------------------------------------
# Text to image


def generate(
    pipeline,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    seeds: Sequence[int],
    height: int = 1024,
    width: int = 1024,
    num_steps: int = 28,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.7,
    sampler: Sampler = "euler",
    alpha_bar: torch.Tensor | None = None,
    sigma_max: float = NAI_SIGMA_MAX,
    emphasis: bool = True,
    batch_size: int = 1,
    base_resolution: int | None = None,
    on_step: Callable[[int], object] | None = None,
    output_type: Literal["pil", "latent"] = "pil",
) -> list[Image.Image] | list[torch.Tensor]:
    """One image per (prompt, negative, seed) from a StableDiffusionXLPipeline's components.

    ``alpha_bar`` fixes the schedule (validation passes the training one); None reads it from the pipeline's
    scheduler config (`training_alpha_bar`); the prediction type always comes from that config. ``base_resolution`` turns on
    attention scaling for canvases larger than base_resolution². Image i depends only on its own prompt,
    negative and seed, not on ``batch_size`` or the other prompts: a UNet call batches only rows of one chunk
    count (`batches_by_chunks`). ``output_type="latent"`` returns the (4, h, w) fp32 latents instead of images.
    ``on_step(n)`` is called after each sampler step with the number of images that step advanced (a progress
    bar of images × steps, such as tqdm's ``update``).
    """
    if not len(prompts) == len(negative_prompts) == len(seeds):
        raise ValueError("generate: prompts, negative_prompts and seeds must have the same length")
    if output_type not in ("pil", "latent"):
        raise ValueError(f"generate: output_type must be 'pil' or 'latent', got {output_type!r}")
    multiple = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise UserError(
            f"--width/--height must be positive multiples of {multiple} for this model, got {width}x{height}"
        )
    config = dict(pipeline.scheduler.config)
    if alpha_bar is None:
        alpha_bar = training_alpha_bar(config, sigma_max)
    ratio = None if base_resolution is None else base_resolution**2 / (height * width)
    time_ids = micro_conditioning((height, width), (0, 0), (height, width))
    latent_shape = (
        pipeline.unet.config.in_channels,
        height // pipeline.vae_scale_factor,
        width // pipeline.vae_scale_factor,
    )
    tokenizers = (pipeline.tokenizer, pipeline.tokenizer_2)
    chunks = conditioning_chunks(tokenizers, prompts, negative_prompts, emphasis)
    outputs: list = [None] * len(prompts)
    with attention_scaling(pipeline.unet, ratio):
        for rows in batches_by_chunks(chunks, batch_size):
            conditioning = pipeline_conditioning(
                pipeline, [prompts[i] for i in rows], [negative_prompts[i] for i in rows], emphasis
            )
            latents = denoise(
                pipeline.unet,
                make_scheduler(sampler, config, num_steps, alpha_bar),
                conditioning,
                time_ids.expand(len(rows), -1),
                seeded_noise(latent_shape, [seeds[i] for i in rows]),
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
                on_step=None if on_step is None else functools.partial(on_step, len(rows)),
            )
            done = (
                list(latents.cpu())
                if output_type == "latent"
                else to_pil(decode_latents(pipeline.vae, latents))
            )
            for row, output in zip(rows, done, strict=True):
                outputs[row] = output
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Loading a model and describing an image


def load_pipeline(
    model: str | os.PathLike,
    config: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A StableDiffusionXLPipeline from a diffusers directory or a single .safetensors file.

    A single file (`sdxl_ztsnr.single_file`) takes its configs from ``config`` (a diffusers SDXL directory;
    without it SDXL base's from the Hub) and its prediction type and schedule from its ``v_pred`` / ``ztsnr``
    markers, as ComfyUI does, else its metadata. A VAE
    whose config asks for upcasting (SDXL's overflows in fp16) is kept in fp32.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {path}: not a diffusers pipeline directory (no model_index.json)")
        with loading_model(path):
            pipeline = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype)
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"--model {path}: a single file must be .safetensors (pickles are not loaded)")
        pipeline = _load_single_file(path, config, dtype)
    else:
        raise UserError(f"--model {path}: no such file or directory")
    if getattr(pipeline.vae.config, "force_upcast", False) and pipeline.vae.dtype != torch.float32:
        pipeline.vae.to(torch.float32)
    return pipeline.to(device)


def _load_single_file(path: Path, config, dtype: torch.dtype):
    """An SDXL single file through `sdxl_ztsnr.single_file` (configs from ``config`` or the Hub), with the
    prediction type and schedule its v_pred / ztsnr markers or metadata give."""
    from sdxl_ztsnr.single_file import load_single_file

    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise UserError(f"--config {config}: not a diffusers SDXL directory (no model_index.json)")
    try:
        return load_single_file(path, config, dtype).pipeline()
    except UserError as error:
        raise UserError(f"--model {error}") from None


def model_hash(path: str | os.PathLike) -> str:
    """A1111's "Model hash" (AutoV2): the first 10 hex digits of the file's sha256."""
    from sdxl_ztsnr.single_file import file_sha256

    return file_sha256(path)[:10]


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """The PNG ``parameters`` text A1111 writes and A1111, Civitai and image browsers read:

    prompt, then "Negative prompt: ..." (only when there is one), then "Key: value, ..." with values that
    hold a comma, colon or newline JSON-quoted. Settings whose value is None are left out.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write ``image`` as PNG with the A1111 ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path
