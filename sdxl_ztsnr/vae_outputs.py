"""What a VAE fine-tune leaves behind: an AutoencoderKL directory, a single-file VAE in the original layout, a
model card — and how a fine-tuned VAE goes into an SDXL pipeline directory and its single file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl_ztsnr.export import VAE_PREFIX, vae_to_original_state_dict
from sdxl_ztsnr.model_card import DEFAULT_LICENSE, public_training_config

# Config entries of the starting VAE that the fine-tune keeps: what turns latents into the UNet's inputs
# (scaling, per-channel statistics) and how pipelines must run the decoder (fp32 for SDXL's VAE).
KEPT_CONFIG = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")
CARD_TAGS = ["stable-diffusion-xl", "vae", "diffusers", "autoencoder"]
CARD_SECTION = "## VAE decoder fine-tune"


def single_file_vae_state_dict(vae_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original (ldm/sgm) key layout of a standalone VAE file.

    Standalone VAE files (e.g. Stability's sdxl_vae.safetensors) carry the keys without the checkpoint's
    ``first_stage_model.`` prefix; loaders (ComfyUI, A1111, Forge, diffusers' from_single_file) read both.
    """
    return {k.removeprefix(VAE_PREFIX): v for k, v in vae_to_original_state_dict(vae_state_dict).items()}


def save_vae(
    vae, output_dir: str | Path, starting_config: dict, single_file: str | None = None
) -> list[Path]:
    """Write ``vae`` as an AutoencoderKL directory (safetensors) with the starting VAE's KEPT_CONFIG, and
    ``single_file`` (a name in output_dir) in the original layout, fp32. Returns the written weight files."""
    output_dir = Path(output_dir)
    kept = {k: starting_config[k] for k in KEPT_CONFIG if k in starting_config}
    previous = {k: vae.config.get(k) for k in kept}
    vae.register_to_config(**kept)
    try:
        vae.save_pretrained(output_dir, safe_serialization=True)
    finally:
        vae.register_to_config(**previous)
    written = [output_dir / "diffusion_pytorch_model.safetensors"]
    if single_file:
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in single_file_vae_state_dict(vae.state_dict()).items()
        }
        save_file(tensors, str(output_dir / single_file), metadata={"format": "pt"})
        written.append(output_dir / single_file)
    return written


def vae_model_card(
    name: str,
    base_model: str,
    training_config: dict,
    metrics_markdown: str | None = None,
    single_file: str | None = None,
    license: str = DEFAULT_LICENSE,
) -> str:
    """README.md text of a fine-tuned VAE: what was trained, how to load it, held-out metrics, the config."""
    from huggingface_hub import ModelCard, ModelCardData

    from sdxl_ztsnr.model_card import _HUB_REPO_ID, _table

    on_hub = bool(_HUB_REPO_ID.match(base_model))
    card_data = ModelCardData(
        license=license,
        base_model=base_model if on_hub else None,
        tags=list(CARD_TAGS),
        library_name="diffusers",
    )
    # A local path is no Hub id: only its last part goes into the card.
    start = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{Path(base_model).name}`"
    encoder = (
        "The encoder was trained too (`--train_encoder`): latents change, so latent caches and UNets trained on "
        "the old latents must be redone."
        if training_config.get("train_encoder")
        else "Only the decoder (and post_quant_conv) was trained: the encoder is the starting VAE's, bit for bit, "
        "so existing latent caches and UNets trained on them stay valid."
    )
    sections = [
        f"# {name.rstrip('/').split('/')[-1]}",
        f"A fine-tuned SDXL VAE (AutoencoderKL), started from {start}. {encoder}",
        "## Usage",
        "```python\n"
        "import torch\n"
        "from diffusers import AutoencoderKL, StableDiffusionXLPipeline\n\n"
        f'vae = AutoencoderKL.from_pretrained("{name}")\n'
        'pipe = StableDiffusionXLPipeline.from_pretrained("YOUR/SDXL-MODEL", vae=vae, torch_dtype=torch.float16)\n'
        "```",
    ]
    if single_file:
        sections.append(
            f"`{single_file}` holds the same weights in the original layout for ComfyUI, A1111 and Forge."
        )
    if metrics_markdown:
        sections += ["## Metrics", metrics_markdown]
    sections += [
        "## Training configuration",
        _table(public_training_config(training_config), ("option", "value")),
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return str(ModelCard(content))


def _replace_dir(source_dir: Path, target: Path) -> None:
    """Copy ``source_dir`` over ``target`` so that a kill leaves the old or the new directory, never half."""
    tmp, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source_dir, tmp)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def replace_single_file_vae(single_file: str | Path, vae_state_dict: dict[str, torch.Tensor]) -> int:
    """Swap the ``first_stage_model.*`` tensors of an SDXL single file for ``vae_state_dict`` (same dtype as
    stored), keeping every other tensor and the metadata; atomic. Returns the number of tensors replaced."""
    single_file = Path(single_file)
    new = vae_to_original_state_dict(vae_state_dict)
    with safe_open(str(single_file), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    old_keys = {k for k in tensors if k.startswith(VAE_PREFIX)}
    if old_keys != set(new):
        raise ValueError(
            f"{single_file}: its VAE keys differ from the fine-tuned VAE's ({len(old_keys ^ set(new))} keys); "
            "it was made from another VAE architecture"
        )
    for key, tensor in new.items():
        tensors[key] = tensor.detach().to("cpu", tensors[key].dtype).contiguous()
    tmp = single_file.with_name(single_file.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, single_file)
    return len(new)


def install_finetuned_vae(
    pipeline_dir: str | Path, vae_dir: str | Path, single_file: str | Path | None = None
) -> None:
    """Put the fine-tuned VAE of ``vae_dir`` into an SDXL pipeline directory: ``vae/``, the single file, the card.

    The pipeline's own VAE config entries in KEPT_CONFIG (e.g. latents_mean/std from --normalize_latents) win
    over the fine-tune's. Idempotent: running it again after a kill finishes the job. The card gets (or has
    replaced) a CARD_SECTION with the held-out table from ``vae_dir``/vae_metrics.md.
    """
    from diffusers import AutoencoderKL

    pipeline_dir, vae_dir = Path(pipeline_dir), Path(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    pipeline_config = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    staged = pipeline_dir / "vae.staged"
    shutil.rmtree(staged, ignore_errors=True)
    save_vae(vae, staged, pipeline_config)
    _replace_dir(staged, pipeline_dir / "vae")
    shutil.rmtree(staged, ignore_errors=True)
    if single_file is not None and Path(single_file).is_file():
        replace_single_file_vae(single_file, vae.state_dict())
    card, table = pipeline_dir / "README.md", vae_dir / "vae_metrics.md"
    if card.is_file():
        text = card.read_text().split(f"\n{CARD_SECTION}\n")[0].rstrip("\n")
        body = table.read_text().strip() if table.is_file() else ""
        note = "The VAE decoder was fine-tuned after the UNet (encoder unchanged, latents unchanged)."
        card.write_text(f"{text}\n\n{CARD_SECTION}\n\n{note}\n\n{body}\n")
