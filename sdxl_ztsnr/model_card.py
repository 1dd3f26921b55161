"""The model card (README.md with Hub metadata) written beside every saved pipeline, mid-run and at the end."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CARD_TAGS = ["stable-diffusion-xl", "text-to-image", "diffusers", "v-prediction", "zero-terminal-snr"]
# SDXL 1.0 base is released under CreativeML Open RAIL++-M; fine-tunes inherit it.
DEFAULT_LICENSE = "openrail++"

# Config keys that hold credentials: `token`, `hub_token`, `wandb_api_key`, ... (not `max_token_length`).
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_?key|auth)$", re.IGNORECASE)
# Hugging Face token-shaped values (`hf_...`) are redacted even under an innocent key.
_SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def public_training_config(training_config: dict) -> dict:
    """The training config without credentials: secret keys dropped, token-shaped strings redacted."""
    out = {}
    for key, value in training_config.items():
        if _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, dict):
            value = public_training_config(value)
        elif isinstance(value, str):
            value = _SECRET_VALUE.sub("<redacted>", value)
        elif isinstance(value, (list, tuple)):
            value = [_SECRET_VALUE.sub("<redacted>", v) if isinstance(v, str) else v for v in value]
        out[key] = value
    return out


def is_hub_id(name: str) -> bool:
    """True for a Hub repo id (`owner/name`) that is not also an existing local path (e.g. `demo/model`)."""
    return bool(_HUB_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def _local_name(path: str) -> str:
    """How the card names a local base model: a relative path as given, an absolute one by its last part only
    (a published card should not show the trainer's home directory)."""
    as_path = Path(path)
    return as_path.name if as_path.is_absolute() or path.startswith("~") else path


def _markdown_cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {_markdown_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def model_card(
    repo_id_or_name: str,
    base_model: str,
    training_config: dict,
    validation_images: list[str] | None = None,
    metrics: dict | None = None,
    license: str = DEFAULT_LICENSE,
    single_file: str | None = None,
    normalized_latents: bool = False,
) -> str:
    """README.md text: Hub metadata, how to sample (ZTSNR scheduler, CFG rescale 0.7), config, metrics, images.

    `validation_images` are paths relative to the card's folder; `single_file` names the original-layout
    `.safetensors` shipped beside the pipeline, if any; `normalized_latents` says the model was trained on
    per-channel normalised latents, which its VAE carries. Credentials in `training_config` never reach the text.
    """
    # A local base model (an existing path, or anything that is not owner/name) is no Hub id: keep it out of
    # the metadata (the Hub would link a stranger's repo, or reject it) and the links.
    on_hub = is_hub_id(base_model)
    card_data = ModelCardData(
        license=license,
        base_model=base_model if on_hub else None,
        tags=list(CARD_TAGS),
        library_name="diffusers",
        pipeline_tag="text-to-image",
    )
    name = repo_id_or_name.rstrip("/").split("/")[-1]
    base_link = (
        f"[{base_model}](https://huggingface.co/{base_model})"
        if on_hub
        else f"a local SDXL base model (`{_local_name(base_model)}`)"
    )
    sections = [
        f"# {name}",
        f"A fine-tune of {base_link} trained with v-prediction and zero terminal SNR (the NovelAI Diffusion V3 recipe, arXiv:2409.15997; Lin et al. 2023, arXiv:2305.08891). "
        "It must be sampled with a v-prediction, zero-terminal-SNR scheduler and trailing timestep spacing; "
        "the scheduler config in this repository already sets all three.",
        "## Usage",
        "```python\n"
        "import torch\n"
        "from diffusers import StableDiffusionXLPipeline\n\n"
        "pipe = StableDiffusionXLPipeline.from_pretrained(\n"
        f'    "{repo_id_or_name}", torch_dtype=torch.float16\n'
        ').to("cuda")\n'
        "# Loaded from scheduler/scheduler_config.json: v_prediction, rescale_betas_zero_snr=True, trailing.\n"
        "config = pipe.scheduler.config\n"
        "print(config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing)\n\n"
        "image = pipe(\n"
        '    "1girl, anime style, outdoors, high quality",\n'
        "    num_inference_steps=28,\n"
        "    guidance_scale=5.0,\n"
        "    guidance_rescale=0.7,  # CFG rescale (Lin et al. 2023, eq. 15-16) keeps high-CFG images from overexposing\n"
        ").images[0]\n"
        'image.save("sample.png")\n'
        "```",
    ]
    if single_file:
        sections.append(
            f"`{single_file}` holds the same weights in the original SDXL layout for ComfyUI, A1111 and Forge. "
            "It carries the `v_pred` and `ztsnr` marker tensors, so those UIs switch to v-prediction with zero "
            "terminal SNR by themselves; elsewhere pick v-prediction + ZTSNR sampling by hand."
        )
    if normalized_latents:
        sections.append(
            "It was trained on per-channel normalised latents (NovelAI Diffusion V3, appendix). Its VAE carries "
            "that normalisation (in the VAE config, or folded into the 1x1 `quant_conv` / `post_quant_conv`, "
            "as in the single file): keep this VAE; another SDXL VAE decodes its latents with wrong colours."
        )
    if metrics:
        sections += ["## Metrics", _table(metrics, ("metric", "value"))]
    if validation_images:
        sections.append("## Validation images")
        sections.append("\n".join(f"![validation {i}]({path})" for i, path in enumerate(validation_images)))
    sections += [
        "## Training configuration",
        _table(public_training_config(training_config), ("option", "value")),
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return str(ModelCard(content))
