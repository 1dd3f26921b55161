"""Toy-scale test of NAI V3's "completely black" claim: what schedule, prediction and weighting each buy.

A tiny SDXL-architecture UNet is trained on CPU on synthetic 4-channel latents: mean = brightness along a
fixed latent direction + a tint, plus a zero-mean texture. Half the training captions name the brightness
(then fixing the mean exactly), half leave it open, as real captions mostly do. Every arm sees the same
data, noise, timesteps, initial weights, optimizer and steps; only the schedule, the prediction type and
the loss weighting differ. Each arm samples from N(0, I) with the same 25-step deterministic DDIM ladder
(trailing spacing, Lin et al. 2023, arXiv:2305.08891) and we measure how far the mean of each sample lies
from the requested one. NAI V3 Figure 2 (Ossa et al. 2024, arXiv:2409.15997) predicts that SDXL's schedule
drifts to the mean of its starting noise (medium brightness) on "solid black" / "solid white" and that
ZTSNR does not. Results and discussion: docs/ztsnr_toy.md.

    python benchmarks/ztsnr_toy.py --seed 0 --figure docs/ztsnr_toy.png

``--conversion`` measures something else on the same toy: an ε base (arm a) converted to v-pred ZTSNR (arm c's
settings) with each training timestep distribution (sdxl_ztsnr.timestep_sampling), and the error on "solid
black" after the same number of conversion steps:

    python benchmarks/ztsnr_toy.py --conversion --seed 0 --figure docs/ztsnr_toy_conversion.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as `python benchmarks/ztsnr_toy.py` from a checkout: make the repository's package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_ztsnr.losses import PredictionType, noise_batch, weighted_loss
from sdxl_ztsnr.schedule import (
    LossWeighting,
    alphas_cumprod,
    ddim_step,
    inference_timesteps,
)
from sdxl_ztsnr.timestep_sampling import TimestepSampling

# ---------------------------------------------------------------------------------------------------------
# Synthetic "latent images". Real SDXL latents (scaled by 0.13025) of solid black / white images sit at
# roughly ±1..3 in some channels; we use a synthetic brightness direction of that size instead of a VAE.

# Latent mean at brightness +1 (white); black is its negative, grey is 0. Units: scaled-latent values.
BRIGHTNESS_DIRECTION = (2.5, 1.0, 0.5, -1.5)
BRIGHTNESS_WORDS = {
    "any": 0.0,  # brightness not named: training draws it uniformly from [-1, 1]
    "black": -1.0,
    "very dark grey": -0.75,
    "dark grey": -0.5,
    "dim grey": -0.25,
    "grey": 0.0,
    "silver": 0.25,
    "light grey": 0.5,
    "very light grey": 0.75,
    "white": 1.0,
}
# Tints move the mean off the brightness axis (the other three latent directions).
TINT_WORDS = {
    "neutral": (0.0, 0.0, 0.0, 0.0),
    "red": (0.0, 0.8, -0.6, 0.0),
    "green": (0.0, -0.8, 0.0, 0.6),
    "blue": (0.0, 0.0, 0.8, 0.6),
    "yellow": (0.0, 0.5, -0.5, -0.6),
}
TEXTURE_WORDS = ("solid", "stripes", "checkerboard", "noise")

# Evaluated prompts: the extremes (plain and textured) and the whole brightness range.
EVAL_PROMPTS = (
    ("black", "neutral", "solid"),
    ("white", "neutral", "solid"),
    ("black", "red", "stripes"),
    ("white", "blue", "checkerboard"),
    ("very dark grey", "blue", "noise"),
    ("dark grey", "green", "stripes"),
    ("dim grey", "neutral", "checkerboard"),
    ("grey", "yellow", "solid"),
    ("silver", "red", "noise"),
    ("light grey", "neutral", "stripes"),
    ("very light grey", "green", "checkerboard"),
)


@dataclass(frozen=True)
class Prompt:
    brightness: str
    tint: str
    texture: str

    @property
    def text(self) -> str:
        name = (
            f"{self.brightness} {self.texture}"
            if self.tint == "neutral"
            else f"{self.brightness} {self.tint} {self.texture}"
        )
        return name.replace("black solid", "solid black").replace("white solid", "solid white")

    def mean(self, brightness: float | None = None) -> torch.Tensor:
        """Per-channel latent mean (4,): the requested one, or at ``brightness`` with this prompt's tint."""
        level = BRIGHTNESS_WORDS[self.brightness] if brightness is None else brightness
        return level * torch.tensor(BRIGHTNESS_DIRECTION) + torch.tensor(TINT_WORDS[self.tint])


ALL_PROMPTS = [
    Prompt(b, c, t) for b in BRIGHTNESS_WORDS if b != "any" for c in TINT_WORDS for t in TEXTURE_WORDS
]


def texture_pattern(kind: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """A zero-mean, unit-std (size, size) pattern with a random scale and phase; zeros for "solid"."""
    if kind == "solid":
        return torch.zeros(size, size)
    coords = torch.arange(size, dtype=torch.float32)
    if kind == "stripes":
        period = 2 + 6 * torch.rand((), generator=generator)
        phase = 2 * math.pi * torch.rand((), generator=generator)
        pattern = torch.sin(2 * math.pi * coords / period + phase).expand(size, size)
        if torch.rand((), generator=generator) < 0.5:
            pattern = pattern.T
    elif kind == "checkerboard":
        cell = int(torch.randint(1, 5, (), generator=generator))
        shift = torch.randint(0, 2 * cell, (2,), generator=generator)
        rows = ((coords + shift[0]) // cell) % 2
        cols = ((coords + shift[1]) // cell) % 2
        pattern = (rows[:, None] + cols[None, :]) % 2
    elif kind == "noise":
        pattern = torch.randn(size, size, generator=generator)
    else:
        raise ValueError(f"unknown texture {kind!r}; choose one of {TEXTURE_WORDS}")
    pattern = pattern - pattern.mean()
    return pattern / pattern.std().clamp_min(1e-6)


def make_latents(
    prompts: list[Prompt], size: int, generator: torch.Generator, brightness: torch.Tensor | None = None
) -> torch.Tensor:
    """x₀ = mean (at the prompt's or the given brightness (B,)) + zero-mean texture: (B, 4, size, size)."""
    out = torch.empty(len(prompts), 4, size, size)
    for i, prompt in enumerate(prompts):
        # Texture colour: a random unit vector over the 4 channels, i.e. ~0.5 std per channel.
        mix = torch.randn(4, generator=generator)
        mix = mix / mix.norm()
        mean = prompt.mean(None if brightness is None else brightness[i].item())
        out[i] = mean[:, None, None] + mix[:, None, None] * texture_pattern(prompt.texture, size, generator)
    return out


def training_batch(
    batch_size: int, unnamed_fraction: float, generator: torch.Generator
) -> tuple[list[Prompt], torch.Tensor]:
    """Captions and their brightness (B,). A fraction of captions do not name the brightness ("any"),
    like real captions, and get a uniform brightness in [-1, 1]; the others get their word's level."""
    index = torch.randint(0, len(ALL_PROMPTS), (batch_size,), generator=generator)
    prompts = [ALL_PROMPTS[i] for i in index.tolist()]
    brightness = torch.tensor([BRIGHTNESS_WORDS[p.brightness] for p in prompts])
    unnamed = torch.rand(batch_size, generator=generator) < unnamed_fraction
    brightness = torch.where(unnamed, 2 * torch.rand(batch_size, generator=generator) - 1, brightness)
    prompts = [
        Prompt("any", p.tint, p.texture) if u else p for p, u in zip(prompts, unnamed.tolist(), strict=True)
    ]
    return prompts, brightness


# ---------------------------------------------------------------------------------------------------------
# Captions -> SDXL conditioning. No CLIP: a fixed, seeded random embedding per word stands in for it.


@dataclass
class CaptionEncoder:
    """Seeded word tables: token embeddings (cross-attention) and pooled embeddings (text_embeds)."""

    token_table: dict[str, torch.Tensor]  # word -> (D,)
    pooled_table: dict[str, torch.Tensor]  # word -> (P,)

    @classmethod
    def seeded(cls, token_dim: int, pooled_dim: int, seed: int) -> CaptionEncoder:
        generator = torch.Generator().manual_seed(seed + 1000)
        words = [*BRIGHTNESS_WORDS, *TINT_WORDS, *TEXTURE_WORDS]
        tokens = {w: torch.randn(token_dim, generator=generator) for w in words}
        pooled = {w: torch.randn(pooled_dim, generator=generator) for w in words}
        return cls(tokens, pooled)

    def __call__(self, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, D) encoder_hidden_states (one token per word) and (B, P) pooled embeddings."""
        words = [(p.brightness, p.tint, p.texture) for p in prompts]
        hidden = torch.stack([torch.stack([self.token_table[w] for w in ws]) for ws in words])
        pooled = torch.stack([sum(self.pooled_table[w] for w in ws) / math.sqrt(3) for ws in words])
        return hidden, pooled


def time_ids(batch_size: int, latent_size: int) -> torch.Tensor:
    """SDXL micro-conditioning (original H, W, crop top, left, target H, W) in pixels: (B, 6)."""
    side = 8.0 * latent_size
    return torch.tensor([[side, side, 0.0, 0.0, side, side]]).repeat(batch_size, 1)


# ---------------------------------------------------------------------------------------------------------
# Model: SDXL's UNet layout (DownBlock2D, 2x CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, text_time
# added conditioning, linear projections) at toy width.

TOKEN_DIM = 32
POOLED_DIM = 32
ADDITION_TIME_EMBED_DIM = 8


def tiny_unet(latent_size: int, seed: int):
    """A UNet2DConditionModel with SDXL's block structure and conditioning inputs, ~1.7 M parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 64),  # SDXL: (320, 640, 1280)
        layers_per_block=1,  # SDXL: 2
        norm_num_groups=8,
        attention_head_dim=(2, 4, 4),  # heads per block, as SDXL's config counts them
        transformer_layers_per_block=(1, 1, 1),  # SDXL: (1, 2, 10)
        cross_attention_dim=TOKEN_DIM,  # SDXL: 2048
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,  # SDXL: 256
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * ADDITION_TIME_EMBED_DIM,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


# ---------------------------------------------------------------------------------------------------------
# Arms.


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    ztsnr: bool
    sigma_max: float  # terminal σ of the ZTSNR schedule (unused for SDXL's, whose σ_999 is 14.6)
    prediction_type: PredictionType
    weighting: LossWeighting  # ignored for ε-prediction (uniform ε-MSE, as SDXL was trained)

    def alpha_bar(self) -> torch.Tensor:
        return alphas_cumprod(ztsnr=self.ztsnr, sigma_max=self.sigma_max)


ARMS = {
    arm.name: arm
    for arm in (
        Arm("a", "SDXL ε-pred", False, 0.0, "epsilon", "uniform"),
        Arm("b", "SDXL v-pred", False, 0.0, "v_prediction", "min_snr"),
        Arm("c", "ZTSNR σ20000 v (default)", True, 20000.0, "v_prediction", "min_snr"),
        Arm("d", "ZTSNR σ20000 v, unguarded MinSNR", True, 20000.0, "v_prediction", "min_snr_unguarded"),
        Arm("e", "ZTSNR σ4096 v (diffusers)", True, 4096.0, "v_prediction", "min_snr"),
    )
}


def train_arm(
    arm: Arm,
    steps: int,
    batch_size: int,
    latent_size: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    encoder: CaptionEncoder,
    unnamed_fraction: float = 0.5,
    timestep_sampling: TimestepSampling | None = None,
    init_state: dict | None = None,
    constant_lr: bool = False,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Train one arm; data, noise, timesteps and initial weights depend only on ``seed``.

    ``init_state`` starts from trained weights (a conversion); ``constant_lr`` keeps the peak lr after the
    warm-up; ``on_step(step, model)`` is called after each update (evaluations mid-run).
    """
    model = tiny_unet(latent_size, seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    sampling = timestep_sampling or TimestepSampling()  # uniform: the draw sample_timesteps makes
    # Fused: one kernel per parameter instead of ~8 small ops, each a thread-pool round trip on CPU.
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, fused=True)

    def lr_factor(step: int) -> float:
        # Linear warmup, then cosine decay to 10%: lets every arm settle by the last step.
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if constant_lr:
            return 1.0
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    alpha_bar = arm.alpha_bar()
    data_rng = torch.Generator().manual_seed(seed)
    noise_rng = torch.Generator().manual_seed(seed + 1)
    ids = time_ids(batch_size, latent_size)
    losses = []
    model.train()
    for step in range(steps):
        prompts, brightness = training_batch(batch_size, unnamed_fraction, data_rng)
        latents = make_latents(prompts, latent_size, data_rng, brightness)
        hidden, pooled = encoder(prompts)
        noise = torch.randn(latents.shape, generator=noise_rng)
        timesteps = sampling.draw(batch_size, len(alpha_bar), noise_rng)
        batch = noise_batch(latents, noise, timesteps, alpha_bar, arm.prediction_type)
        prediction = model(
            batch.noisy_latents, timesteps, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample
        loss, _ = weighted_loss(
            prediction,
            batch,
            arm.weighting,
            sample_weights=sampling.importance_weights(timesteps, len(alpha_bar)),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, model)
    model.eval()
    return model, losses


def ddim_step_epsilon(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_next: torch.Tensor
) -> torch.Tensor:
    """DDIM step from an ε prediction (Song et al. 2021, eq. 12); needs ᾱ_t > 0, true for SDXL's schedule."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    x0 = (x_t - s * eps) / a
    return alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next).sqrt() * eps


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    arm: Arm,
    prompts: list[Prompt],
    num_steps: int,
    latent_size: int,
    seed: int,
    encoder: CaptionEncoder,
    chunk: int = 128,
) -> torch.Tensor:
    """Deterministic DDIM from x_T ~ N(0, I) at t = 999, trailing spacing, ending at ᾱ = 1: (B, 4, h, w).

    N(0, I) is the correct start for every arm in this VP form (Var x_T = ᾱ_T·Var x₀ + 1 − ᾱ_T ≈ 1; with
    ZTSNR it is exactly the σ_max-scaled Euler start). The last step returns the model's x̂₀.
    """
    alpha_bar = arm.alpha_bar()
    timesteps = inference_timesteps(num_steps, len(alpha_bar))
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(len(prompts), 4, latent_size, latent_size, generator=generator)
    hidden, pooled = encoder(prompts)
    out = []
    for start in range(0, len(prompts), chunk):
        xs, hs, ps = x[start : start + chunk], hidden[start : start + chunk], pooled[start : start + chunk]
        ids = time_ids(len(xs), latent_size)
        for i, t in enumerate(timesteps.tolist()):
            a_t = alpha_bar[t].expand(len(xs))
            a_next = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
            a_next = a_next.expand(len(xs))
            t_batch = torch.full((len(xs),), t, dtype=torch.long)
            pred = model(xs, t_batch, hs, added_cond_kwargs={"text_embeds": ps, "time_ids": ids}).sample
            if arm.prediction_type == "v_prediction":
                xs = ddim_step(xs, pred, a_t, a_next)
            else:
                view = (-1, 1, 1, 1)
                xs = ddim_step_epsilon(xs, pred, a_t.view(view), a_next.view(view))
        out.append(xs)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# Metrics.


def brightness_of(means: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """Project (N, 4) latent means (tint removed) onto the brightness direction: -1 black, +1 white."""
    direction = torch.tensor(BRIGHTNESS_DIRECTION)
    return ((means - torch.tensor(TINT_WORDS[prompt.tint])) @ direction) / direction.dot(direction)


def evaluate(samples: torch.Tensor, prompts: list[Prompt], num_samples: int) -> list[dict]:
    """Per prompt: mean |generated − requested| latent mean (channel-averaged), spread, brightness."""
    rows = []
    means = samples.mean(dim=(2, 3))  # (B, 4)
    for j, prompt in enumerate(prompts):
        m = means[j * num_samples : (j + 1) * num_samples]  # (N, 4)
        error = (m - prompt.mean()).abs().mean(dim=1)  # (N,)
        b = brightness_of(m, prompt)
        rows.append(
            {
                "prompt": prompt.text,
                "requested_brightness": BRIGHTNESS_WORDS[prompt.brightness],
                "error": error.mean().item(),
                "spread": m.std(dim=0).mean().item(),
                "brightness": b.mean().item(),
                "brightness_values": b.tolist(),
            }
        )
    return rows


def summarize(arm: Arm, rows: list[dict], train_loss: float, seconds: float) -> dict:
    """One table row per arm: overall error, black and white error and brightness, spread."""
    by_prompt = {r["prompt"]: r for r in rows}
    return {
        "arm": arm.name,
        "label": arm.label,
        "mae": sum(r["error"] for r in rows) / len(rows),
        "black_error": by_prompt["solid black"]["error"],
        "white_error": by_prompt["solid white"]["error"],
        "black_brightness": by_prompt["solid black"]["brightness"],
        "white_brightness": by_prompt["solid white"]["brightness"],
        "spread": sum(r["spread"] for r in rows) / len(rows),
        "train_loss": train_loss,
        "seconds": seconds,
    }


def format_tables(summaries: list[dict], per_prompt: dict[str, list[dict]]) -> str:
    """Markdown tables: one row per arm, then the per-prompt error for every arm."""
    lines = [
        "| arm | schedule / prediction / weighting | mean-error (all) | black error | white error "
        "| black → brightness | white → brightness | spread | final loss | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['arm']} | {s['label']} | {s['mae']:.3f} | {s['black_error']:.3f} | {s['white_error']:.3f} "
            f"| {s['black_brightness']:+.2f} | {s['white_brightness']:+.2f} | {s['spread']:.3f} "
            f"| {s['train_loss']:.4f} | {s['seconds']:.0f} |"
        )
    arms = [s["arm"] for s in summaries]
    lines += [
        "",
        "| prompt | requested brightness | " + " | ".join(f"{a}: error (brightness)" for a in arms) + " |",
    ]
    lines.append("|---|---|" + "---|" * len(arms))
    for j, row in enumerate(per_prompt[arms[0]]):
        cells = [f"{per_prompt[a][j]['error']:.3f} ({per_prompt[a][j]['brightness']:+.2f})" for a in arms]
        lines.append(f"| {row['prompt']} | {row['requested_brightness']:+.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_figure(path: Path, summaries: list[dict], per_prompt: dict[str, list[dict]], grids: dict) -> None:
    """Bars of black/white/overall error per arm, requested vs generated brightness, and sample strips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [s["arm"] for s in summaries]
    fig = plt.figure(figsize=(15, 4.8))
    grid_spec = fig.add_gridspec(1, 3, width_ratios=(1.1, 1.0, 1.0))
    ax_bars = fig.add_subplot(grid_spec[0])
    width = 0.27
    for k, (key, name) in enumerate(
        (("black_error", "solid black"), ("white_error", "solid white"), ("mae", "all prompts"))
    ):
        ax_bars.bar(
            [i + (k - 1) * width for i in range(len(arms))], [s[key] for s in summaries], width, label=name
        )
    ax_bars.set_xticks(
        range(len(arms)), [textwrap.fill(f"({s['arm']}) {s['label']}", 11) for s in summaries], fontsize=7
    )
    ax_bars.set(ylabel="|generated − requested| latent mean", title="error of the generated mean")
    ax_bars.legend(fontsize=8)
    ax_bars.grid(axis="y", alpha=0.3)

    ax_scatter = fig.add_subplot(grid_spec[1])
    # Distinct markers: arms that agree (c and e) stay visible on top of each other.
    for s, marker in zip(summaries, "osD^vx", strict=False):
        rows = per_prompt[s["arm"]]
        requested = [r["requested_brightness"] for r in rows]
        generated = [r["brightness"] for r in rows]
        ax_scatter.scatter(
            requested, generated, marker=marker, s=36, alpha=0.7, label=f"({s['arm']}) {s['label']}"
        )
    ax_scatter.plot([-1, 1], [-1, 1], "k--", lw=1, label="ideal")
    ax_scatter.axhline(0, color="grey", lw=0.5)
    ax_scatter.set(
        xlabel="requested brightness (−1 black, +1 white)",
        ylabel="generated brightness",
        title="brightness per prompt (mean of samples)",
    )
    ax_scatter.legend(fontsize=7)
    ax_scatter.grid(alpha=0.3)

    # Samples rendered as grey images: each latent pixel projected on the brightness axis, −1 black, +1 white.
    ax_grid = fig.add_subplot(grid_spec[2])
    direction = torch.tensor(BRIGHTNESS_DIRECTION)
    rows = []
    for arm in arms:
        tiles = [
            (torch.einsum("nchw,c->nhw", grids[arm][key], direction) / direction.dot(direction))
            for key in ("black", "white")
        ]
        row = torch.cat([torch.cat(list(t), dim=1) for t in tiles], dim=1)  # (h, 2·n·w)
        rows.append(row)
    image = ((torch.cat(rows, dim=0) + 1) / 2).clamp(0, 1)
    ax_grid.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    height = rows[0].shape[0]
    ax_grid.set_yticks([height * (i + 0.5) for i in range(len(arms))], [f"({a})" for a in arms])
    ax_grid.set_xticks([image.shape[1] * 0.25, image.shape[1] * 0.75], ["solid black", "solid white"])
    ax_grid.set_title("samples (brightness axis; grey = the noise mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# ε → v-prediction ZTSNR: an ε base (arm a) converted, the training timestep distribution the only difference.


@dataclass(frozen=True)
class Conversion:
    name: str
    label: str
    sampling: TimestepSampling


CONVERSIONS = {
    c.name: c
    for c in (
        Conversion("u", "uniform", TimestepSampling()),
        Conversion("h1", "high_noise, bias 1", TimestepSampling("high_noise", high_noise_bias=1.0)),
        Conversion("h2", "high_noise, bias 2", TimestepSampling("high_noise", high_noise_bias=2.0)),
        Conversion(
            "h1w",
            "high_noise, bias 1, importance-weighted",
            TimestepSampling("high_noise", high_noise_bias=1.0, importance_weighting=True),
        ),
        Conversion("ln", "logit_normal (0, 1)", TimestepSampling("logit_normal")),
    )
}


def run_conversions(args: argparse.Namespace, encoder: CaptionEncoder) -> dict:
    """Train the ε base, then convert a copy of it per timestep distribution; evaluate at each checkpoint."""
    base_arm, target = ARMS["a"], ARMS["c"]
    started = time.perf_counter()
    base, _ = train_arm(
        base_arm, args.steps, args.batch_size, args.latent_size, args.learning_rate, args.warmup_steps,
        args.seed, encoder, args.unnamed_fraction,
    )  # fmt: skip
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    prompts = [Prompt(*p) for p in EVAL_PROMPTS]
    repeated = [p for p in prompts for _ in range(args.num_samples)]

    def measure(model: torch.nn.Module, arm: Arm) -> dict:
        model.eval()
        rows = evaluate(
            sample(model, arm, repeated, args.sample_steps, args.latent_size, args.seed, encoder),
            prompts,
            args.num_samples,
        )
        model.train()
        return summarize(arm, rows, math.nan, 0.0)

    base_summary = measure(base, base_arm)
    print(
        f"ε base ({args.steps} steps, {time.perf_counter() - started:.0f} s): solid black error "
        f"{base_summary['black_error']:.3f} (brightness {base_summary['black_brightness']:+.2f})",
        flush=True,
    )
    checkpoints = sorted(args.conversion_steps)
    results = []
    for name in args.conversions:
        conversion = CONVERSIONS[name]
        at: dict[int, dict] = {}
        started = time.perf_counter()

        def on_step(step: int, model: torch.nn.Module, at=at) -> None:
            if step in checkpoints:
                at[step] = measure(model, target)

        _, losses = train_arm(
            target, checkpoints[-1], args.batch_size, args.latent_size, args.conversion_lr, args.warmup_steps,
            args.seed + 7, encoder, args.unnamed_fraction, conversion.sampling, base_state, True, on_step,
        )  # fmt: skip
        terminal = conversion.sampling.probabilities(len(target.alpha_bar()))[-1].item()
        results.append(
            {
                "conversion": name,
                "label": conversion.label,
                "terminal_probability": terminal,
                "at": {str(k): v for k, v in at.items()},
                "seconds": time.perf_counter() - started,
            }
        )
        last = at[checkpoints[-1]]
        print(
            f"{name} ({conversion.label}): {results[-1]['seconds']:.0f} s, black error "
            + ", ".join(f"{at[k]['black_error']:.3f}@{k}" for k in checkpoints)
            + f"; all prompts {last['mae']:.3f}@{checkpoints[-1]}",
            flush=True,
        )
    return {"base": base_summary, "conversions": results, "checkpoints": checkpoints}


def format_conversion_table(result: dict) -> str:
    """One row per timestep distribution: solid black error (brightness) at each checkpoint, then the rest."""
    checkpoints, last = result["checkpoints"], str(result["checkpoints"][-1])
    lines = [
        "| timestep sampling | P(t = 999) | "
        + " | ".join(f"solid black after {k} steps" for k in checkpoints)
        + f" | solid white after {last} | all prompts after {last} |",
        "|---|---|" + "---|" * (len(checkpoints) + 2),
    ]
    for r in result["conversions"]:
        cells = [
            f"{r['at'][str(k)]['black_error']:.3f} ({r['at'][str(k)]['black_brightness']:+.2f})"
            for k in checkpoints
        ]
        end = r["at"][last]
        lines.append(
            f"| {r['conversion']}: {r['label']} | {100 * r['terminal_probability']:.2g}% | "
            + " | ".join(cells)
            + f" | {end['white_error']:.3f} ({end['white_brightness']:+.2f}) | {end['mae']:.3f} |"
        )
    base = result["base"]
    lines.append(
        f"\nε base before conversion (sampled as ε on SDXL's schedule): solid black {base['black_error']:.3f} "
        f"({base['black_brightness']:+.2f}), solid white {base['white_error']:.3f} "
        f"({base['white_brightness']:+.2f}), all prompts {base['mae']:.3f}"
    )
    return "\n".join(lines)


def plot_conversions(path: Path, result: dict) -> None:
    """Solid-black error against conversion steps, one line per timestep distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_black, ax_all) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r, marker in zip(result["conversions"], "osD^vx", strict=False):
        steps = result["checkpoints"]
        for ax, key in ((ax_black, "black_error"), (ax_all, "mae")):
            ax.plot(steps, [r["at"][str(k)][key] for k in steps], marker=marker, label=r["label"])
    for ax, title in ((ax_black, "solid black"), (ax_all, "all prompts")):
        ax.set(xlabel="conversion steps", ylabel="|generated − requested| latent mean", title=title)
        ax.grid(alpha=0.3)
    ax_black.legend(fontsize=8)
    fig.suptitle("ε base → v-pred ZTSNR: error after the same steps, by training timestep distribution")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps per arm")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument(
        "--warmup_steps", type=int, default=20, help="linear warmup, then cosine decay to 10%%"
    )
    parser.add_argument("--latent_size", type=int, default=16, help="latent side (16 = a 128 px image)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds data, noise, timesteps, weights and sampling"
    )
    parser.add_argument("--arms", default="abcde", help=f"subset of {''.join(ARMS)} to run, e.g. 'bc'")
    parser.add_argument("--sample_steps", type=int, default=25, help="DDIM steps, the same for every arm")
    parser.add_argument("--num_samples", type=int, default=16, help="samples (seeds) per evaluated prompt")
    parser.add_argument(
        "--unnamed_fraction",
        type=float,
        default=0.5,
        help="fraction of training captions that do not name the brightness (0: every caption fixes it)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; a model this small gains little from 2 and loses much on a busy machine",
    )
    parser.add_argument("--figure", type=Path, default=None, help="write the figure (PNG) here")
    parser.add_argument(
        "--out_dir", type=Path, default=None, help="write results.json (options + numbers) here"
    )
    parser.add_argument("--smoke", action="store_true", help="3 steps on 8x8 latents: a plumbing check")
    conversion = parser.add_argument_group("ε → v-pred ZTSNR conversion (instead of the arms)")
    conversion.add_argument(
        "--conversion",
        action="store_true",
        help="train arm a's ε base (--steps), then convert a copy to v-pred ZTSNR (arm c's settings) per "
        "timestep distribution",
    )
    conversion.add_argument(
        "--conversions", default="u,h1,h2,h1w,ln", help=f"comma-separated subset of {','.join(CONVERSIONS)}"
    )
    conversion.add_argument(
        "--conversion_steps",
        default="25,75,150",
        help="evaluate after these conversion steps (the last: length)",
    )
    conversion.add_argument(
        "--conversion_lr", type=float, default=5e-4, help="constant after the warm-up (a fine-tune)"
    )
    args = parser.parse_args(argv)
    args.conversions = [c for c in args.conversions.split(",") if c]
    if not args.conversions or set(args.conversions) - set(CONVERSIONS):
        parser.error(f"--conversions {','.join(args.conversions)}: use names from {','.join(CONVERSIONS)}")
    try:
        args.conversion_steps = sorted({int(k) for k in args.conversion_steps.split(",")})
    except ValueError:
        parser.error(
            f"--conversion_steps {args.conversion_steps!r}: comma-separated step counts, e.g. 25,75,150"
        )
    if args.conversion_steps[0] < 1:
        parser.error("--conversion_steps must be positive")
    if not args.arms or set(args.arms) - set(ARMS):
        parser.error(f"--arms {args.arms!r}: use letters from {''.join(ARMS)}, e.g. --arms bc")
    if args.smoke:
        args.steps, args.warmup_steps, args.batch_size, args.latent_size = 3, 1, 4, 8
        args.num_samples, args.sample_steps = 2, 2
        args.conversion_steps = [1, 2]
    if args.num_samples < 2:
        parser.error("--num_samples must be at least 2 (the spread is a std over samples)")
    if args.latent_size % 4:
        parser.error(f"--latent_size {args.latent_size}: the UNet downsamples twice; use a multiple of 4")
    if not 0.0 <= args.unnamed_fraction < 1.0:
        parser.error("--unnamed_fraction must be in [0, 1)")
    return args


def run_arm(
    arm: Arm, args: argparse.Namespace, encoder: CaptionEncoder
) -> tuple[dict, list[dict], torch.Tensor]:
    """Train and sample one arm: (summary row, per-prompt rows, samples (P·N, 4, h, w))."""
    started = time.perf_counter()
    model, losses = train_arm(
        arm,
        args.steps,
        args.batch_size,
        args.latent_size,
        args.learning_rate,
        args.warmup_steps,
        args.seed,
        encoder,
        args.unnamed_fraction,
    )
    prompts = [Prompt(*p) for p in EVAL_PROMPTS]
    repeated = [p for p in prompts for _ in range(args.num_samples)]
    samples = sample(model, arm, repeated, args.sample_steps, args.latent_size, args.seed, encoder)
    rows = evaluate(samples, prompts, args.num_samples)
    tail = losses[-max(1, len(losses) // 10) :]  # last 10% of steps
    summary = summarize(arm, rows, sum(tail) / len(tail), time.perf_counter() - started)
    return summary, rows, samples


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    encoder = CaptionEncoder.seeded(TOKEN_DIM, POOLED_DIM, args.seed)
    if args.conversion:
        return conversion_main(args, encoder, started, cpu_started)
    summaries, per_prompt, grids = [], {}, {}
    shown = min(4, args.num_samples)  # samples per extreme in the figure
    for name in args.arms:
        arm = ARMS[name]
        summary, rows, samples = run_arm(arm, args, encoder)
        summaries.append(summary)
        per_prompt[name] = rows
        # EVAL_PROMPTS starts with solid black, then solid white.
        grids[name] = {
            "black": samples[:shown],
            "white": samples[args.num_samples : args.num_samples + shown],
        }
        print(
            f"arm {name} ({arm.label}): {summary['seconds']:.0f} s, loss {summary['train_loss']:.4f}, "
            f"error {summary['mae']:.3f}, black -> {summary['black_brightness']:+.2f}, "
            f"white -> {summary['white_brightness']:+.2f}",
            flush=True,
        )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print()
    print(format_tables(summaries, per_prompt))
    print(
        f"\nseed {args.seed}; {args.steps} steps x batch {args.batch_size} per arm on {args.latent_size}x"
        f"{args.latent_size} latents; {args.sample_steps} DDIM steps; {args.num_samples} samples per prompt; "
        f"unnamed_fraction {args.unnamed_fraction}; {args.threads} threads: wall time {wall:.0f} s, "
        f"CPU time {cpu:.0f} s"
    )
    result = {"summaries": summaries, "per_prompt": per_prompt, "wall_seconds": wall, "cpu_seconds": cpu}
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.out_dir / "results.json").write_text(json.dumps({"options": options, **result}, indent=1))
        print(f"wrote {args.out_dir / 'results.json'}")
    if args.figure:
        plot_figure(args.figure, summaries, per_prompt, grids)
        print(f"wrote {args.figure}")
    return result


def conversion_main(
    args: argparse.Namespace, encoder: CaptionEncoder, started: float, cpu_started: float
) -> dict:
    result = run_conversions(args, encoder)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print()
    print(format_conversion_table(result))
    print(
        f"\nseed {args.seed}; ε base {args.steps} steps, conversions to v-pred ZTSNR σ20000 (guarded MinSNR) at lr "
        f"{args.conversion_lr:g}, batch {args.batch_size}, {args.latent_size}x{args.latent_size} latents; "
        f"{args.sample_steps} DDIM steps; {args.num_samples} samples per prompt; {args.threads} threads: "
        f"wall time {wall:.0f} s, CPU time {cpu:.0f} s"
    )
    result.update(wall_seconds=wall, cpu_seconds=cpu)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.out_dir / "conversion.json").write_text(json.dumps({"options": options, **result}, indent=1))
    if args.figure:
        plot_conversions(args.figure, result)
        print(f"wrote {args.figure}")
    return result


if __name__ == "__main__":
    main()
