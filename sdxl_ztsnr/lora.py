"""LoRA on the SDXL UNet through peft: add, save (diffusers + kohya/A1111 formats), checkpoint, check the base.

A LoRA fine-tune keeps the base frozen and trains low-rank updates W + (alpha/rank)·B·A of chosen linear
layers (Hu et al. 2021, arXiv:2106.09685). Outputs, in one directory:

- `pytorch_lora_weights.safetensors`: diffusers/PEFT keys; `StableDiffusionXLPipeline.load_lora_weights(dir)`.
- `<name>.safetensors`: kohya's key format (`lora_unet_<original SGM module path, _ for .>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`) with kohya's `ss_*` and Stability's `modelspec.*` metadata: ComfyUI, A1111
  and Forge load it as an SDXL LoRA; diffusers converts it itself.

In training checkpoints only the LoRA tensors are stored (LORA_STATE_NAME), by accelerate save/load hooks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from sdxl_ztsnr.export import UNET_PREFIX, unet_key_map

ADAPTER_NAME = "default"
# The attention projections of every transformer block (self-attention attn1, cross-attention attn2). In
# diffusers' SDXL UNet these names occur only there: 70 blocks x 2 attentions x 4 = 560 layers.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
EMA_LORA_SUBFOLDER = "lora_ema"  # the EMA LoRA: same two files, in output_dir/lora_ema/
LORA_STATE_NAME = "lora_state.safetensors"  # in checkpoint directories
KOHYA_PREFIX = "lora_unet_"


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES,
    under_autocast: bool = False,
) -> list[torch.nn.Parameter]:
    """Freeze `unet` and add a peft LoRA adapter; returns its parameters, the only trainable ones, in fp32.

    alpha defaults to rank (scale 1). target_modules: module names or suffixes (peft's matching: a module
    matches when its name equals a target or ends with "." + target), or one regex string for the full name.
    The LoRA weights are fp32 even when the base is cast to bf16/fp16 (call this after that cast): peft runs
    the adapter in its own dtype and adds the result in the base's. A is Kaiming-uniform, B zero, so the
    adapted UNet starts equal to the base.

    ``under_autocast``: every forward of this UNet runs under autocast (mixed precision). peft then casts each
    adapter input up to the adapter's fp32 and autocast casts it straight back to bf16/fp16 for the matmul: the
    same values, but a fresh half-precision copy that the layer keeps for backward while the input itself is
    kept too. Without the first cast the adapter keeps the input itself. SDXL at 1024², batch 1, rank 32
    (benchmarks/memory.py): 0.43 GiB less at the peak, 0.39 of it at to_out.0, whose input is the attention
    output. Without autocast the cast is needed (a bf16 input cannot meet fp32 weights), so it stays.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    alpha = float(rank if alpha is None else alpha)
    if rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {rank}.")
    if alpha <= 0:
        raise ValueError(f"--lora_alpha must be > 0, got {alpha}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {dropout}.")
    if not target_modules:
        raise ValueError(
            "--lora_target_modules is empty; name at least one module (default: to_q to_k to_v to_out.0)."
        )
    if getattr(unet, "peft_config", None):
        raise ValueError("add_lora: this UNet already has a LoRA adapter.")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    unmatched = _unmatched_targets(unet, targets)
    if unmatched:
        raise ValueError(
            f"--lora_target_modules: {unmatched} match no module of the UNet (a target matches a module whose "
            "name equals it or ends with '.' + target, e.g. to_q, attn2.to_k, ff.net.2, proj_in)."
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    cast_training_params(unet, dtype=torch.float32)
    if under_autocast:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return [p for p in unet.parameters() if p.requires_grad]


def _unmatched_targets(unet: torch.nn.Module, targets: list[str] | str) -> list[str]:
    """Targets that match no module name, by peft's rule (a regex string must match a full name)."""
    import re

    names = [name for name, _ in unet.named_modules()]
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, name) for name in names) else [targets]
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]


def lora_modules(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet modules that carry a LoRA (diffusers names, e.g. `mid_block...attn1.to_q`)."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def lora_settings(unet: torch.nn.Module) -> dict:
    """rank, alpha, dropout and target modules of the UNet's adapter, JSON-serialisable."""
    config = unet.peft_config[ADAPTER_NAME]
    targets = config.target_modules
    return {
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }


def check_lora_base(scheduler_config: Mapping) -> str | None:
    """None when the base model predicts v; otherwise why a LoRA does not belong on it (for an error or warning).

    A LoRA changes a few attention projections; it cannot turn an ε-prediction model into a v-prediction one
    trained down to zero terminal SNR. `scheduler_config` is the base's scheduler/scheduler_config.json
    (`EulerDiscreteScheduler.load_config(base, subfolder="scheduler")`); diffusers' default is ε.
    """
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction == "v_prediction":
        return None
    return (
        f"the base model's scheduler has prediction_type={prediction!r}. A LoRA cannot turn an "
        f"{prediction}-prediction model into a v-prediction ZTSNR one: a few low-rank attention updates do not "
        "relearn what the whole UNet predicts. Train the LoRA on a v-prediction ZTSNR base (a model made "
        "with this toolkit, or e.g. NoobAI-XL v-pred), or fine-tune the full UNet first."
    )


# -- state dicts in the three layouts ----------------------------------------------------------------------


def diffusers_lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in peft's layout (`<module>.lora_A.weight` / `.lora_B.weight`), as saved for diffusers."""
    from peft.utils import get_peft_model_state_dict

    # peft's keys as they are: what diffusers' own save_lora_adapter writes and load_lora_weights reads without
    # conversion. diffusers' convert_state_dict_to_diffusers renames only the attention projections (to
    # `.lora.down/.up`), so any other target left the file in two formats; the loader picks one format from the
    # first key and silently drops the modules in the other.
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def kohya_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module name -> kohya name (`lora_unet_` + the original SGM module path with `_` for `.`)."""
    # The UNet's own key set (LoRA wrappers removed) gives the full module tree the SGM table is derived from.
    base_keys = [k.replace(".base_layer.", ".") for k in unet.state_dict() if ".lora_" not in k]
    to_original = {key: sgm.removeprefix(UNET_PREFIX) for key, sgm in unet_key_map(base_keys).items()}
    names = {}
    for module in lora_modules(unet):
        sgm_key = to_original[f"{module}.weight"]
        names[module] = KOHYA_PREFIX + sgm_key.removesuffix(".weight").replace(".", "_")
    return names


def kohya_lora_state_dict(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter in kohya's layout: per module `.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha` (0-d).

    kohya scales by alpha / rank like peft, and stores down/up with the shapes of peft's A/B (linear:
    (r, in) / (out, r); conv: (r, in, kh, kw) / (out, r, 1, 1)). dtype None keeps fp32.
    """
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    alpha = lora_settings(unet)["alpha"]
    out: dict[str, torch.Tensor] = {}
    for module, name in kohya_module_names(unet).items():
        down, up = peft_state[f"{module}.lora_A.weight"], peft_state[f"{module}.lora_B.weight"]
        out[f"{name}.lora_down.weight"] = down if dtype is None else down.to(dtype)
        out[f"{name}.lora_up.weight"] = up if dtype is None else up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def kohya_metadata(
    settings: Mapping, name: str, base_model: str | None = None, ztsnr: bool = True
) -> dict[str, str]:
    """Header metadata as kohya's sd-scripts writes for an SDXL LoRA, plus Stability's model spec, all strings.

    `modelspec.prediction_type` "v", `ss_v_parameterization` and `ss_zero_terminal_snr` tell UIs and model
    sites that the LoRA belongs on a v-prediction (ZTSNR) SDXL.
    """
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings["rank"]),
        "ss_network_alpha": str(float(settings["alpha"])),
        "ss_network_dropout": str(float(settings["dropout"])),
        "ss_network_args": json.dumps({"target_modules": settings["target_modules"]}),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_v_parameterization": "True",
        "ss_zero_terminal_snr": str(bool(ztsnr)),
        "ss_output_name": name,
        "ss_sd_model_name": Path(base_model).name if base_model else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": "v",
        "modelspec.title": name,
    }


def save_lora(
    unet: torch.nn.Module,
    output_dir: str | Path,
    name: str,
    base_model: str | None = None,
    ztsnr: bool = True,
    kohya_dtype: torch.dtype | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write DIFFUSERS_LORA_NAME and `<name>.safetensors` (kohya format) into `output_dir`; returns both paths.

    `unet` is the unwrapped UNet carrying the adapter. The diffusers file carries the LoraConfig (so
    `load_lora_weights` restores alpha), the kohya file the metadata of `kohya_metadata` + `extra_metadata`.
    """
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    if (
        not name
        or "/" in name
        or name.endswith(".safetensors")
        or f"{name}.safetensors" == DIFFUSERS_LORA_NAME
    ):
        raise ValueError(
            f"save_lora: name {name!r} must be a plain file stem other than 'pytorch_lora_weights'."
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = lora_settings(unet)
    state = {k: v.detach().to("cpu").contiguous() for k, v in diffusers_lora_state_dict(unet).items()}
    StableDiffusionXLPipeline.save_lora_weights(
        output_dir,
        unet_lora_layers=state,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
        weight_name=DIFFUSERS_LORA_NAME,
        safe_serialization=True,
    )
    kohya = {
        k: v.detach().to("cpu").contiguous() for k, v in kohya_lora_state_dict(unet, kohya_dtype).items()
    }
    metadata = {**kohya_metadata(settings, name, base_model, ztsnr), **(extra_metadata or {})}
    kohya_path = output_dir / f"{name}.safetensors"
    save_file(kohya, str(kohya_path), metadata={k: str(v) for k, v in metadata.items()})
    return output_dir / DIFFUSERS_LORA_NAME, kohya_path


# -- training checkpoints: the LoRA tensors only --------------------------------------------------------------


def _trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by their full names (peft's, adapter name included): what a resume must restore."""
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def save_lora_state(unet: torch.nn.Module, directory: str | Path) -> Path:
    """The trainable (LoRA) tensors, exactly as they are, and the LoRA settings into LORA_STATE_NAME."""
    from safetensors.torch import save_file

    path = Path(directory) / LORA_STATE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _trainable_state(unet).items()}
    save_file(tensors, str(path), metadata={"lora": json.dumps(lora_settings(unet))})
    return path


def load_lora_state(unet: torch.nn.Module, directory: str | Path) -> None:
    """Copy LORA_STATE_NAME back into the UNet's adapter; refuses a checkpoint made with other LoRA settings."""
    from safetensors import safe_open

    path = Path(directory) / LORA_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; this checkpoint was not saved by a LoRA run (resume it without --lora_rank)."
        )
    with safe_open(str(path), framework="pt") as f:
        saved_settings = json.loads(f.metadata()["lora"])
        current = lora_settings(unet)
        if saved_settings != current:
            raise ValueError(
                f"{path}: saved with LoRA settings {saved_settings}, this run has {current}; resume with the "
                "same --lora_rank / --lora_alpha / --lora_dropout / --lora_target_modules."
            )
        params = _trainable_state(unet)
        if set(f.keys()) != set(params):
            missing, extra = sorted(set(params) - set(f.keys())), sorted(set(f.keys()) - set(params))
            raise ValueError(
                f"{path}: LoRA tensors do not match this UNet (missing {missing[:3]}, extra {extra[:3]})."
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(f.get_tensor(name))


def _find_unet(models: list, unet: torch.nn.Module) -> int | None:
    """Index of `unet` among accelerate's (possibly DDP-wrapped or compiled) models."""
    from accelerate.utils import extract_model_from_parallel

    for i, model in enumerate(models):
        if extract_model_from_parallel(model, keep_torch_compile=False) is unet:
            return i
    return None


def lora_checkpoint_hooks(unet: torch.nn.Module, is_main_process: bool) -> tuple[Callable, Callable]:
    """(save, load) hooks for `accelerator.register_save_state_pre_hook` / `register_load_state_pre_hook`.

    save_state then writes LORA_STATE_NAME (a few MB) instead of the whole UNet (5-10 GB for SDXL), and
    load_state reads it back into `unet` (the unwrapped model), bit-exact. Other prepared models are saved and
    loaded by accelerate as usual. Pass `accelerator.is_main_process` (the local main with save_on_each_node).
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        index = _find_unet(models, unet)
        if index is None:
            raise ValueError(
                "lora_checkpoint_hooks: the LoRA UNet is not among the accelerator's prepared models."
            )
        if weights:  # accelerate leaves weights empty under DeepSpeed/FSDP, which save models themselves
            weights.pop(index)  # accelerate must not write the full UNet
        if is_main_process:
            save_lora_state(unet, output_dir)

    def load_hook(models: list, input_dir: str) -> None:
        index = _find_unet(models, unet)
        if index is None:
            raise ValueError(
                "lora_checkpoint_hooks: the LoRA UNet is not among the accelerator's prepared models."
            )
        models.pop(index)  # accelerate must not look for the full UNet's weights
        load_lora_state(unet, input_dir)

    return save_hook, load_hook
