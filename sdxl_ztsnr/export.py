"""Save a trained SDXL as a diffusers pipeline directory and as a single file in the original SDXL layout."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
# Empty tensors that ComfyUI, A1111 and Forge read as "v-prediction" and "zero terminal SNR" (the SDXL
# model_type check in ComfyUI's supported_models.py; NoobAI-XL v-pred ships them).
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
# Two tensors the original SDXL base checkpoint carries that transformers' CLIP models no longer hold:
# open_clip's learned temperature (CLIP clamps it at ln 100 = 4.6052; 4.6055 once stored in fp16, as in
# sd_xl_base_1.0) and CLIP-L's position_ids buffer, int64 (1, 77). Loaders ignore both; tools that re-save
# a checkpoint copy what they find, so a file without them yields files without them.
CLIP_G_LOGIT_SCALE = math.log(100.0)

# The scheduler settings a ZTSNR v-prediction model needs at sampling time (Lin et al. 2023, sections 3.1-3.3).
ZTSNR_SCHEDULER_SETTINGS = {
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def _checked_latent_stats(
    latents_mean: Sequence[float] | None, latents_std: Sequence[float] | None, channels: int
) -> tuple[list[float], list[float]] | tuple[None, None]:
    """Both lists as floats (one per latent channel, std > 0), or (None, None); raises on anything else."""
    if (latents_mean is None) != (latents_std is None):
        raise ValueError("latent stats: pass both latents_mean and latents_std, or neither.")
    if latents_mean is None:
        return None, None
    if len(latents_mean) != channels or len(latents_std) != channels:
        raise ValueError(
            f"latent stats: latents_mean/latents_std need {channels} values (vae.config.latent_channels), "
            f"got {len(latents_mean)} and {len(latents_std)}."
        )
    if min(float(s) for s in latents_std) <= 0:
        raise ValueError(f"latent stats: latents_std must be positive, got {list(latents_std)}.")
    return [float(m) for m in latents_mean], [float(s) for s in latents_std]


def set_latent_stats(vae, latents_mean: list[float] | None, latents_std: list[float] | None) -> None:
    """Write per-channel latent mean/std into `vae.config` (NAI V3 appendix; diffusers reads them on decode).

    diffusers' SDXL pipeline then decodes with `latents * latents_std / scaling_factor + latents_mean` instead
    of `latents / scaling_factor`, and its img2img pipeline encodes with
    `(z - latents_mean) * scaling_factor / latents_std`: the UNet must have been trained on latents
    normalised the same way. The pipelines view the lists as (1, 4, 1, 1), i.e. 4 latent channels.
    None for both clears them (plain `scaling_factor` scaling).
    """
    latents_mean, latents_std = _checked_latent_stats(latents_mean, latents_std, vae.config.latent_channels)
    vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)


def fold_latent_stats(
    vae_state_dict: Mapping[str, torch.Tensor], latents_mean: Sequence[float], latents_std: Sequence[float]
) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights whose 1x1 `quant_conv` / `post_quant_conv` absorb the per-channel latent affine.

    With m = latents_mean, s = latents_std (the VAE-config convention of set_latent_stats, C channels), the
    folded VAE used the plain way (`latents / scaling_factor` before decode, `z * scaling_factor` after encode)
    does exactly what diffusers does with m and s in the config:
      decode: post_quant_conv(n·s/sf + m) = W·diag(s)·(n/sf) + (b + W·m)  ->  W' = W·diag(s), b' = b + W·m;
      encode: (z − m)/s for z ~ N(μ, e^logvar) is N((μ − m)/s, e^(logvar − 2 ln s)), so the first C output
      rows of quant_conv (μ) become (W, b − m)/s and the last C (logvar) get b − 2 ln s.
    The only inexactness is the posterior's logvar clamp to [-30, 20], applied after the shift. Computed in fp64,
    stored in each tensor's own dtype; every other tensor is passed through unchanged.
    """
    out = dict(vae_state_dict)
    weight = vae_state_dict["post_quant_conv.weight"]  # (C, C, 1, 1)
    channels = weight.shape[0]
    mean, std = _checked_latent_stats(latents_mean, latents_std, channels)
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)

    w = weight.double()[:, :, 0, 0]  # (C_out, C_in)
    out["post_quant_conv.weight"] = (w * s[None, :])[:, :, None, None].to(weight.dtype)
    bias = vae_state_dict["post_quant_conv.bias"]
    out["post_quant_conv.bias"] = (bias.double() + w @ m).to(bias.dtype)

    weight = vae_state_dict["quant_conv.weight"]  # (2C, 2C, 1, 1): rows [0, C) -> mean, [C, 2C) -> logvar
    bias = vae_state_dict["quant_conv.bias"]
    w, b = weight.double().clone(), bias.double().clone()
    w[:channels] /= s[:, None, None, None]
    b[:channels] = (b[:channels] - m) / s
    b[channels:] -= 2.0 * torch.log(s)
    out["quant_conv.weight"], out["quant_conv.bias"] = w.to(weight.dtype), b.to(bias.dtype)
    return out


def current_umask() -> int:
    """The process umask (from /proc on Linux: os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Give each file (every file below a directory) the mode a plain `open()` would: 0666 & ~umask.

    safetensors >= 0.8 creates files 0600 whatever the umask, so a UI running as another user (a container,
    a shared server) cannot read the model. Files with the owner's execute bit keep x (0777 & ~umask).
    Directories and symlinks are left alone. Returns the files it set.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    umask = current_umask()
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_symlink():
            continue
        if path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()]
        elif path.is_file():
            files.append(path)
    for path in files:
        executable = path.stat().st_mode & stat.S_IXUSR
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)
    return files


def save_pipeline(
    output_dir: str | Path,
    unet,
    vae,
    text_encoders: tuple | list,
    tokenizers: tuple | list,
    scheduler_config: dict,
    latents_mean: list[float] | None = None,
    latents_std: list[float] | None = None,
    force_zeros_for_empty_prompt: bool = True,
    ztsnr: bool = True,
    fold_latents: bool = False,
) -> Path:
    """Save a StableDiffusionXLPipeline (safetensors) that samples with v-prediction + ZTSNR out of the box.

    `scheduler_config` builds an EulerDiscreteScheduler and must carry the three settings in
    ZTSNR_SCHEDULER_SETTINGS. `latents_mean` / `latents_std` (one float per latent channel) go into the saved
    VAE config, see set_latent_stats; with `fold_latents` they are folded into the saved VAE's weights
    instead (fold_latent_stats) and the config carries none, as in save_single_file: then every diffusers
    pipeline (inpaint, ControlNet-inpaint and T2I-Adapter SDXL read no latents_mean) and a single file loaded
    with `config=` this directory decode alike. The in-memory `vae` is left as it was. None keeps what its
    config has. Files get the user's umask (apply_umask).
    `force_zeros_for_empty_prompt` is SDXL's choice of all-zero embeddings for an empty negative prompt; set it
    False when the model was trained with caption dropout to the encoded empty prompt.
    `ztsnr=False` (ablations trained on SDXL's own schedule) expects rescale_betas_zero_snr False instead.
    Models must be unwrapped (not DDP/compiled wrappers); they are saved in their current dtype.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    required = {**ZTSNR_SCHEDULER_SETTINGS, "rescale_betas_zero_snr": ztsnr}
    wrong = {k: scheduler_config.get(k) for k, v in required.items() if scheduler_config.get(k) != v}
    if wrong:
        raise ValueError(
            f"save_pipeline: scheduler_config has {wrong}; this model needs {required} "
            "(use sdxl_ztsnr.schedule.scheduler_config())."
        )
    text_encoder, text_encoder_2 = text_encoders
    tokenizer, tokenizer_2 = tokenizers
    if fold_latents and latents_mean is not None:
        folded = fold_latent_stats(vae.state_dict(), latents_mean, latents_std)
        vae = copy.deepcopy(vae)  # the caller's VAE keeps its weights
        vae.load_state_dict(folded)
        vae.register_to_config(latents_mean=None, latents_std=None)
        latents_mean = latents_std = None
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    output_dir = Path(output_dir)
    previous = (getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None))
    if latents_mean is not None or latents_std is not None:
        set_latent_stats(vae, latents_mean, latents_std)
    try:
        pipeline.save_pretrained(output_dir, safe_serialization=True)
    finally:
        vae.register_to_config(latents_mean=previous[0], latents_std=previous[1])
    written = [output_dir / "model_index.json"]
    written += [output_dir / name for name, module in pipeline.components.items() if module is not None]
    apply_umask(written)
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# Single file in the original (Stability "sgm") layout. Module paths are derived from the diffusers module tree
# (how many levels, resnets, attentions and resamplers it has), so the same code maps SDXL and tiny test models.

# diffusers ResnetBlock2D -> sgm ResBlock sublayers.
_RESNET_SUBLAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_SUBLAYERS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _child_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted integer children of a module path, e.g. prefix 'down_blocks.' -> [0, 1, 2]."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _has_module(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _add_resnet(table: dict[str, str], diffusers_prefix: str, original_prefix: str) -> None:
    for new, old in _RESNET_SUBLAYERS.items():
        table[f"{diffusers_prefix}.{new}"] = f"{original_prefix}.{old}"


def unet_module_table(unet_keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> sgm module path, from the UNet's own module tree (any depth/width)."""
    keys = list(unet_keys)
    table = dict(_UNET_TOP_LEVEL)
    # input_blocks: one entry per resnet (+ its attention), then one per downsampler, in construction order.
    index = 1
    for level in _child_indices(keys, "down_blocks."):
        block = f"down_blocks.{level}"
        for j in _child_indices(keys, f"{block}.resnets."):
            _add_resnet(table, f"{block}.resnets.{j}", f"input_blocks.{index}.0")
            if _has_module(keys, f"{block}.attentions.{j}."):
                table[f"{block}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if _has_module(keys, f"{block}.downsamplers.0."):
            table[f"{block}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    # middle_block: resnet, attention, resnet.
    _add_resnet(table, "mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    _add_resnet(table, "mid_block.resnets.1", "middle_block.2")
    # output_blocks: one entry per resnet; the upsampler sits in the level's last entry after the attention.
    index = 0
    for level in _child_indices(keys, "up_blocks."):
        block = f"up_blocks.{level}"
        resnets = _child_indices(keys, f"{block}.resnets.")
        for j in resnets:
            slot = 1
            _add_resnet(table, f"{block}.resnets.{j}", f"output_blocks.{index}.0")
            if _has_module(keys, f"{block}.attentions.{j}."):
                table[f"{block}.attentions.{j}"] = f"output_blocks.{index}.1"
                slot = 2
            if j == resnets[-1] and _has_module(keys, f"{block}.upsamplers.0."):
                table[f"{block}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return table


def vae_module_table(vae_keys: Iterable[str]) -> dict[str, str]:
    """diffusers AutoencoderKL module path -> sgm/ldm module path (decoder levels are stored in reverse)."""
    keys = list(vae_keys)
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = f"{part}.conv_in"
        table[f"{part}.conv_out"] = f"{part}.conv_out"
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        for j in (0, 1):
            for new in ("norm1", "conv1", "norm2", "conv2"):
                table[f"{part}.mid_block.resnets.{j}.{new}"] = f"{part}.mid.block_{j + 1}.{new}"
            table[f"{part}.mid_block.resnets.{j}.conv_shortcut"] = f"{part}.mid.block_{j + 1}.nin_shortcut"
        for new, old in _VAE_ATTENTION_SUBLAYERS.items():
            table[f"{part}.mid_block.attentions.0.{new}"] = f"{part}.mid.attn_1.{old}"
    for level in _child_indices(keys, "encoder.down_blocks."):
        block = f"encoder.down_blocks.{level}"
        for j in _child_indices(keys, f"{block}.resnets."):
            for new in ("norm1", "conv1", "norm2", "conv2"):
                table[f"{block}.resnets.{j}.{new}"] = f"encoder.down.{level}.block.{j}.{new}"
            table[f"{block}.resnets.{j}.conv_shortcut"] = f"encoder.down.{level}.block.{j}.nin_shortcut"
        table[f"{block}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
    up_levels = _child_indices(keys, "decoder.up_blocks.")
    for level in up_levels:
        block, original = f"decoder.up_blocks.{level}", f"decoder.up.{len(up_levels) - 1 - level}"
        for j in _child_indices(keys, f"{block}.resnets."):
            for new in ("norm1", "conv1", "norm2", "conv2"):
                table[f"{block}.resnets.{j}.{new}"] = f"{original}.block.{j}.{new}"
            table[f"{block}.resnets.{j}.conv_shortcut"] = f"{original}.block.{j}.nin_shortcut"
        table[f"{block}.upsamplers.0.conv"] = f"{original}.upsample.conv"
    return table


def _renamed_keys(keys: Iterable[str], table: dict[str, str], what: str) -> dict[str, str]:
    """Each key -> its new name, by its longest module-path prefix found in `table`; fail on any key left unmapped."""
    out, unmapped = {}, []
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in table:
                out[key] = table[module] + "." + ".".join(parts[cut:])
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{what}: {len(unmapped)} keys have no place in the original SDXL layout, e.g. {unmapped[:5]}. "
            "Pass a plain diffusers state dict (LoRA/PEFT adapters merged, no wrapper prefixes)."
        )
    if len(set(out.values())) != len(out):
        raise ValueError(
            f"{what}: {len(out) - len(set(out.values()))} keys collided when renamed; the table is wrong."
        )
    return out


def unet_key_map(unet_keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> its `model.diffusion_model.*` key (one to one, tensors unchanged)."""
    keys = list(unet_keys)
    return {k: UNET_PREFIX + v for k, v in _renamed_keys(keys, unet_module_table(keys), "UNet").items()}


def vae_key_map(vae_keys: Iterable[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> its `first_stage_model.*` key (one to one; see vae_to_original_state_dict)."""
    keys = list(vae_keys)
    return {k: VAE_PREFIX + v for k, v in _renamed_keys(keys, vae_module_table(keys), "VAE").items()}


def unet_to_original_state_dict(unet_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> sgm `model.diffusion_model.*` keys (tensors unchanged)."""
    return {new: unet_state_dict[old] for old, new in unet_key_map(unet_state_dict.keys()).items()}


def vae_to_original_state_dict(vae_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` keys; attention linears become 1x1 convs."""
    out = {}
    for old, new in vae_key_map(vae_state_dict.keys()).items():
        tensor = vae_state_dict[old]
        # ldm's AttnBlock uses Conv2d(C, C, 1) for q/k/v/proj_out: (C, C) -> (C, C, 1, 1).
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[new] = tensor
    return out


def _text_model_key(key: str) -> str:
    """A CLIP key under `text_model.` (transformers >= 5.6 names CLIPTextModel's keys without that level)."""
    return key if key.startswith("text_model.") or key == "text_projection.weight" else "text_model." + key


def clip_l_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel key -> `conditioner.embedders.0.transformer.text_model.*` (same names otherwise)."""
    out = {key: CLIP_L_PREFIX + _text_model_key(key) for key in keys}
    if CLIP_L_PREFIX + "text_projection.weight" in out.values():
        raise ValueError(
            "CLIP-L: got a text_projection; pass the first encoder (CLIPTextModel), not encoder 2."
        )
    return out


def clip_l_to_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> `conditioner.embedders.0.transformer.text_model.*` (same names otherwise),
    plus the int64 (1, positions) `embeddings.position_ids` the original checkpoint stores."""
    out = {new: state_dict[old] for old, new in clip_l_key_map(state_dict.keys()).items()}
    positions = out[CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight"].shape[0]
    out.setdefault(
        CLIP_L_PREFIX + "text_model.embeddings.position_ids", torch.arange(positions, dtype=torch.int64)[None]
    )
    return out


# open_clip's text tower: names outside the residual blocks, and per block (transformers name -> open_clip name).
_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",  # stored transposed
}
_OPEN_CLIP_LAYER_SUBLAYERS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
# torch MultiheadAttention stacks q, k, v (in that order, on dim 0) into one in_proj weight and bias.
FUSED_QKV = ("q_proj", "k_proj", "v_proj")
CLIP_G_TEXT_PROJECTION = CLIP_G_PREFIX + "text_projection"
_CLIP_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def qkv_index(key: str) -> int | None:
    """Where a transformers q/k/v projection key sits in open_clip's fused in_proj (0, 1, 2); None for others."""
    parts = key.split(".")
    return FUSED_QKV.index(parts[-2]) if len(parts) > 2 and parts[-2] in FUSED_QKV else None


def clip_g_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModelWithProjection key -> open_clip key under `conditioner.embedders.1.model.*`.

    A layer's q, k and v projections all map to its fused `attn.in_proj_weight` / `in_proj_bias` (qkv_index
    says where each sits) and `text_projection.weight` maps to `text_projection`, stored transposed: see
    clip_g_to_original_state_dict. The position_ids buffer has no place (open_clip holds none).
    """
    out, unmapped = {}, []
    for key in keys:
        name = _text_model_key(key)
        layer = _CLIP_LAYER_KEY.fullmatch(name)
        if name == "text_model.embeddings.position_ids":
            continue
        if name in _OPEN_CLIP_TOP_LEVEL:
            out[key] = _OPEN_CLIP_TOP_LEVEL[name]
        elif layer and layer.group(2) in {f"self_attn.{p}" for p in FUSED_QKV}:
            out[key] = f"transformer.resblocks.{layer.group(1)}.attn.in_proj_{layer.group(3)}"
        elif layer and layer.group(2) in _OPEN_CLIP_LAYER_SUBLAYERS:
            sublayer = _OPEN_CLIP_LAYER_SUBLAYERS[layer.group(2)]
            out[key] = f"transformer.resblocks.{layer.group(1)}.{sublayer}.{layer.group(3)}"
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"CLIP-G: {len(unmapped)} keys have no place in the open_clip layout, e.g. {unmapped[:5]}."
        )
    if "text_projection" not in out.values():
        raise ValueError("CLIP-G: no text_projection.weight; pass encoder 2 (CLIPTextModelWithProjection).")
    return {key: CLIP_G_PREFIX + new for key, new in out.items()}


def clip_g_to_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection -> open_clip layout under `conditioner.embedders.1.model.*`.

    q/k/v projections are concatenated into `attn.in_proj_weight` / `in_proj_bias` (torch MultiheadAttention)
    and the projection is stored transposed, (hidden, projection_dim), as open_clip applies `x @ text_projection`.
    `logit_scale` (unused for conditioning) gets CLIP's final value ln 100, which the SDXL base file has.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for old, new in clip_g_key_map(state_dict.keys()).items():
        tensor, part = state_dict[old], qkv_index(old)
        if part is not None:
            fused.setdefault(new, [None] * len(FUSED_QKV))[part] = tensor
        elif new == CLIP_G_TEXT_PROJECTION:
            out[new] = tensor.t().contiguous()
        else:
            out[new] = tensor
    for new, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"CLIP-G: {new} needs q, k and v projections; one is missing.")
        out[new] = torch.cat(parts, dim=0)
    out[CLIP_G_PREFIX + "logit_scale"] = torch.tensor(CLIP_G_LOGIT_SCALE)  # 0-dim, as open_clip stores it
    return out


def original_state_dict(
    unet_state_dict: Mapping[str, torch.Tensor],
    vae_state_dict: Mapping[str, torch.Tensor],
    text_encoder_state_dict: Mapping[str, torch.Tensor],
    text_encoder_2_state_dict: Mapping[str, torch.Tensor],
    v_pred: bool = True,
    ztsnr: bool = True,
) -> dict[str, torch.Tensor]:
    """All four diffusers components in one original-layout state dict, plus the v_pred / ztsnr markers."""
    if ztsnr and not v_pred:
        raise ValueError(
            "save_single_file: ztsnr=True needs v_pred=True (an eps model cannot predict at SNR 0)."
        )
    out: dict[str, torch.Tensor] = {}
    for part in (
        unet_to_original_state_dict(unet_state_dict),
        vae_to_original_state_dict(vae_state_dict),
        clip_l_to_original_state_dict(text_encoder_state_dict),
        clip_g_to_original_state_dict(text_encoder_2_state_dict),
    ):
        out.update(part)
    if v_pred:
        out[V_PRED_KEY] = torch.tensor([])
    if ztsnr:
        out[ZTSNR_KEY] = torch.tensor([])
    return out


def save_single_file(
    path: str | Path,
    unet_state_dict: Mapping[str, torch.Tensor],
    vae_state_dict: Mapping[str, torch.Tensor],
    text_encoder_state_dict: Mapping[str, torch.Tensor],
    text_encoder_2_state_dict: Mapping[str, torch.Tensor],
    v_pred: bool = True,
    ztsnr: bool = True,
    dtype: torch.dtype | None = torch.float16,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> Path:
    """Write one `.safetensors` that ComfyUI / A1111 / Forge load as SDXL v-pred (+ ZTSNR); dtype=None keeps dtypes.

    `latents_mean` / `latents_std` (the values save_pipeline takes; a UNet trained with --normalize_latents)
    are folded into the VAE's quant_conv / post_quant_conv (fold_latent_stats), since no single-file consumer
    reads latent statistics; they are also recorded in the header. The file gets the user's umask.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_single_file: {path} must end in .safetensors.")
    if latents_mean is not None or latents_std is not None:
        vae_state_dict = fold_latent_stats(vae_state_dict, latents_mean, latents_std)
    state_dict = original_state_dict(
        unet_state_dict, vae_state_dict, text_encoder_state_dict, text_encoder_2_state_dict, v_pred, ztsnr
    )
    tensors = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Stability's model-spec header; loaders that ignore the marker tensors can read the prediction type here.
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    if latents_mean is not None:
        metadata["latent_normalization"] = json.dumps(
            {
                "latents_mean": [float(m) for m in latents_mean],
                "latents_std": [float(s) for s in latents_std],
                "folded_into": [VAE_PREFIX + "quant_conv", VAE_PREFIX + "post_quant_conv"],
            }
        )
    save_file(tensors, str(path), metadata=metadata)
    apply_umask(path)
    return path
