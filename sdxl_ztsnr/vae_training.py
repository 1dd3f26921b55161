"""VAE decoder fine-tuning: losses, the PatchGAN discriminator, LPIPS loading and one training micro-batch.

The recipe of Stability's sd-vae-ft-mse (decoder only, MSE + 0.1·LPIPS) with the optional adversarial term of
taming-transformers / latent-diffusion (PatchGAN, hinge loss, adaptive weight λ = ‖∇L_rec‖ / ‖∇L_GAN‖ at the
decoder's last layer, from a start step). By default only the decoder side (post_quant_conv + decoder) trains:
the encoder and quant_conv stay bit-identical, so every cached latent and every trained UNet stays valid.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from sdxl_ztsnr.optimizers import clear_nonfinite_mark, clip_and_check_gradients

logger = logging.getLogger(__name__)

ReconstructionLoss = Literal["mse", "l1"]
LpipsNet = Literal["vgg", "alex"]
# torchvision's ImageNet weights the LPIPS backbones are built from (the linear heads ship inside lpips).
LPIPS_BACKBONE_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}
ADAPTIVE_WEIGHT_MAX = 1e4  # taming-transformers' clamp of λ


# -- losses: pure functions, fp32, per-sample (B,) ---------------------------------------------------------------


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, kind: ReconstructionLoss = "mse"
) -> torch.Tensor:
    """Per-sample mean squared (or absolute) error (B,) of (B, 3, H, W) images in [-1, 1]."""
    diff = reconstruction.float() - target.float()
    per_pixel = diff.square() if kind == "mse" else diff.abs()
    return per_pixel.mean(dim=(1, 2, 3))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over latent elements (B,) (Kingma & Welling 2014, appendix B)."""
    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) over patches (B,) (Lim & Ye 2017; Esser et al. 2021)."""
    real = torch.relu(1.0 - logits_real.float()).flatten(1).mean(1)
    fake = torch.relu(1.0 + logits_fake.float()).flatten(1).mean(1)
    return 0.5 * (real + fake)


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample −E[D(x̂)] over patches (B,) (Esser et al. 2021, eq. 5 with the hinge form)."""
    return -logits_fake.float().flatten(1).mean(1)


def adaptive_gan_weight(
    rec_grad: torch.Tensor, gan_grad: torch.Tensor, max_weight: float = ADAPTIVE_WEIGHT_MAX
) -> torch.Tensor:
    """λ = ‖∇L_rec‖ / (‖∇L_GAN‖ + 1e-4), clamped to [0, max], no gradient (Esser et al. 2021, eq. 7)."""
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# -- models --------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as taming-transformers' NLayerDiscriminator: 4×4 convs, LeakyReLU 0.2.

    GroupNorm instead of BatchNorm: the logits of a sample then depend on that sample alone, so N processes
    × batch B train what 1 process × batch N·B trains, and train and eval modes agree. (B, 3, H, W) ->
    (B, 1, h, w) logits, one per overlapping patch (70×70 px receptive field with 3 layers).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last block keeps the resolution, as in pix2pix
            blocks += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        # DCGAN initialisation (Radford et al. 2016), as taming's weights_init.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


class Reconstructor(nn.Module):
    """The VAE as one module (what DDP wraps): encode, z = μ + σ·ε with each sample's own ε (or z = μ), decode.

    ``sample_latents`` False decodes the posterior mean, exactly what latent caches hold and what the UNet
    learns to produce; True (latent-diffusion's training) also teaches the decoder the posterior's spread.
    With a frozen encoder it runs without gradient (no activations kept). Returns (reconstruction, μ, log σ²).
    """

    def __init__(self, vae: nn.Module, train_encoder: bool = False, sample_latents: bool = True):
        super().__init__()
        self.vae, self.train_encoder, self.sample_latents = vae, train_encoder, sample_latents

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean
        if self.sample_latents:
            z = z + posterior.std * noise.to(z.dtype)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def select_trainable(vae: nn.Module, train_encoder: bool = False) -> list[nn.Parameter]:
    """Freeze what must not change and return the rest: post_quant_conv + decoder (+ encoder + quant_conv)."""
    vae.requires_grad_(False)
    parts = [vae.decoder, vae.post_quant_conv]
    if train_encoder:
        parts += [vae.encoder, vae.quant_conv]
    trainable = []
    for part in parts:
        if part is not None:  # use_post_quant_conv / use_quant_conv False
            part.requires_grad_(True)
            trainable += list(part.parameters())
    return trainable


def decoder_last_layer(vae: nn.Module) -> nn.Parameter:
    """The weight the adaptive GAN weight is measured at: the decoder's output convolution."""
    return vae.decoder.conv_out.weight


# -- LPIPS (the lpips package: linear heads inside the package, backbone from torchvision's hub cache) -----------


class LpipsWeightsMissing(RuntimeError):
    """The LPIPS backbone's ImageNet weights are not in the torch hub cache and could not be downloaded."""


def lpips_backbone_file(net: LpipsNet) -> tuple[Path, str]:
    """(where torchvision looks for the backbone's weights in the torch hub cache, the URL it downloads from)."""
    import torchvision.models

    url = getattr(torchvision.models, LPIPS_BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def load_lpips(net: LpipsNet = "vgg", random_backbone: bool = False) -> nn.Module:
    """LPIPS v0.1 (Zhang et al. 2018), frozen, eval mode; raises LpipsWeightsMissing with the file to place.

    ``random_backbone`` builds the backbone without ImageNet weights (tests and benchmarks: same cost, no
    download); the learned linear heads are always the package's, read with ``weights_only=True``.
    """
    import lpips

    if net not in LPIPS_BACKBONE_WEIGHTS:
        raise ValueError(f"--lpips_net must be one of {sorted(LPIPS_BACKBONE_WEIGHTS)}, got {net!r}")
    try:
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated", inside lpips
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=random_backbone, verbose=False)
    except Exception as error:
        if random_backbone:
            raise
        path, url = lpips_backbone_file(net)
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise LpipsWeightsMissing(
            f"LPIPS ({net}) needs torchvision's ImageNet weights, which could not be loaded or downloaded "
            f"({type(error).__name__}: {reason}): place {path.name} (from {url}) at {path}, "
            "or pass --perceptual_weight 0 to train without LPIPS"
        ) from None
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    state = torch.load(heads, map_location="cpu", weights_only=True)
    # lin0..linN are the heads (lins.N names the same modules again); every one must be in the file.
    missing = [k for k in model.state_dict() if re.match(r"lin\d+\.", k) and k not in state]
    if missing or not state:
        raise RuntimeError(f"{heads}: LPIPS linear heads incomplete (missing {missing[:3]})")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


# -- one micro-batch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VaeLossSettings:
    """How the generator loss is made: L_rec + w_p·LPIPS + w_kl·KL + w_gan·λ·L_G (λ adaptive) from gan_start_step."""

    loss: ReconstructionLoss = "mse"
    perceptual_weight: float = 0.1  # sd-vae-ft-mse: MSE + 0.1·LPIPS
    kl_weight: float = 0.0  # only with a trained encoder; per pixel element, see kl_divergence's use
    gan_weight: float = 0.5  # latent-diffusion's disc_weight for its KL autoencoders
    gan_start_step: int | None = None  # None: no adversarial loss at all

    def gan_active(self, step: int) -> bool:
        """The adversarial terms train from optimizer step ``gan_start_step`` on (0-based count of updates done)."""
        return self.gan_start_step is not None and step >= self.gan_start_step


class VaeStep:
    """One micro-batch under accelerate: generator losses, backward, clip, optimizer step; then the discriminator.

    ``model`` is the prepared Reconstructor; ``disc``/``disc_optimizer`` the prepared discriminator (None without
    a GAN). The adversarial term reaches the generator through a call of the discriminator with DETACHED
    parameters, so its gradient never lands in the discriminator; λ is measured on the gradients of the GLOBAL
    batch (averaged across processes), so the run does not depend on how the batch is split.
    """

    def __init__(
        self,
        accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: VaeLossSettings,
        lpips_model: nn.Module | None = None,
        disc: nn.Module | None = None,
        disc_optimizer: torch.optim.Optimizer | None = None,
        clip_norm: float = math.inf,
    ):
        if settings.perceptual_weight > 0 and lpips_model is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS network (load_lpips)")
        if settings.gan_start_step is not None and (disc is None or disc_optimizer is None):
            raise ValueError("gan_start_step needs a discriminator and its optimizer")
        self.accelerator, self.model, self.optimizer, self.settings = accelerator, model, optimizer, settings
        self.lpips, self.disc, self.disc_optimizer, self.clip_norm = (
            lpips_model,
            disc,
            disc_optimizer,
            clip_norm,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.disc_params = list(disc.parameters()) if disc is not None else []
        inner = accelerator.unwrap_model(model)
        self.last_layer = decoder_last_layer(getattr(inner, "_orig_mod", inner).vae)

    def _optimizer_step(self, optimizer, params: list[nn.Parameter]) -> torch.Tensor:
        found_inf = torch.zeros((), device=self.accelerator.device)
        if self.accelerator.sync_gradients:
            found_inf = clip_and_check_gradients(self.accelerator, optimizer, params, self.clip_norm)
        optimizer.step()
        clear_nonfinite_mark(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return found_inf

    def _frozen_disc_logits(self, images: torch.Tensor) -> torch.Tensor:
        """D(x̂) with the discriminator's parameters detached: gradient flows to x̂ only."""
        module = self.accelerator.unwrap_model(self.disc)
        detached = {name: p.detach() for name, p in module.named_parameters()}
        return torch.func.functional_call(module, detached, (images,))

    def _adaptive_weight(self, nll: torch.Tensor, gan: torch.Tensor) -> torch.Tensor:
        (rec_grad,) = torch.autograd.grad(nll, self.last_layer, retain_graph=True)
        (gan_grad,) = torch.autograd.grad(gan, self.last_layer, retain_graph=True)
        if self.accelerator.num_processes > 1:
            rec_grad, gan_grad = self.accelerator.reduce(torch.stack([rec_grad, gan_grad]), "mean").unbind(0)
        return adaptive_gan_weight(rec_grad, gan_grad)

    def __call__(self, batch: dict[str, torch.Tensor], gan_active: bool = False) -> dict[str, torch.Tensor]:
        """Train on ``batch`` ({"pixels" (B, 3, S, S) in [-1, 1], "noise" (B, C, s, s)}); detached scalar logs."""
        s, accelerator = self.settings, self.accelerator
        target = batch["pixels"]
        models = (self.model,) if self.disc is None else (self.model, self.disc)
        logs: dict[str, torch.Tensor] = {}
        with accelerator.accumulate(*models):
            with accelerator.autocast():
                reconstruction, mean, logvar = self.model(target, batch["noise"])
                reconstruction = reconstruction.float()
                # The loss in one place: per-sample terms, weighted here, then the batch mean.
                rec = reconstruction_loss(reconstruction, target, s.loss)
                nll = rec
                logs["rec_loss"] = rec.mean()
                if s.perceptual_weight > 0:
                    perceptual = self.lpips(reconstruction, target).reshape(-1).float()
                    nll = nll + s.perceptual_weight * perceptual
                    logs["lpips"] = perceptual.mean()
                loss = nll.mean()
                if s.kl_weight > 0:
                    # latent-diffusion sums L_rec over pixel elements and KL over latent elements; dividing
                    # both by the pixel count keeps its ratio for our per-pixel mean L_rec.
                    kl = kl_divergence(mean, logvar) / target[0].numel()
                    loss = loss + s.kl_weight * kl.mean()
                    logs["kl"] = kl.mean()
                if gan_active:
                    generator = hinge_generator_loss(self._frozen_disc_logits(reconstruction)).mean()
                    weight = s.gan_weight * self._adaptive_weight(nll.mean(), generator)
                    loss = loss + weight * generator
                    logs["g_loss"], logs["gan_weight"] = generator, weight
            accelerator.backward(loss)
            logs["skipped"] = self._optimizer_step(self.optimizer, self.params)
            if gan_active:
                with accelerator.autocast():
                    logits = self.disc(torch.cat([target, reconstruction.detach()])).float()
                    real, fake = logits.chunk(2)
                    d_loss = hinge_discriminator_loss(real, fake).mean()
                accelerator.backward(d_loss)
                self._optimizer_step(self.disc_optimizer, self.disc_params)
                logs["d_loss"] = d_loss
        logs["loss"] = loss
        return {k: v.detach().float() for k, v in logs.items()}


def count_parameters(parameters: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)
