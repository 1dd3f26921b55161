"""LoRA on the SDXL UNet through peft: add, save (diffusers + kohya/A1111 formats), checkpoint, check the base.

A LoRA fine-tune keeps the base frozen and trains low-rank updates W + (alpha/rank)·B·A of chosen linear
layers (Hu et al. 2021, arXiv:2106.09685), or one of the variants of sdxl_ztsnr.lora_variants (DoRA, LoHa,
LoKr). Outputs, in one directory:

- `pytorch_lora_weights.safetensors`: peft's keys (`unet.<module>.lora_A.weight` ...) and the peft config;
  `StableDiffusionXLPipeline.load_lora_weights(dir)` reads LoRA and DoRA, `lora_files.load_lora_file` all.
- `<name>.safetensors`: kohya's key format (`lora_unet_<original SGM module path, _ for .>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; LyCORIS's `.dora_scale`, `.hada_*`, `.lokr_*` for the variants) with kohya's
  `ss_*` and Stability's `modelspec.*` metadata: ComfyUI, A1111 and Forge load it as an SDXL LoRA.

In training checkpoints only the LoRA tensors are stored (LORA_STATE_NAME), by accelerate save/load hooks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from sdxl_ztsnr import lora_variants
from sdxl_ztsnr.export import UNET_PREFIX, unet_key_map
from sdxl_ztsnr.lora_variants import LoraType

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
    lora_type: LoraType = "lora",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    lokr_options: Mapping[str, object] | None = None,
) -> list[torch.nn.Parameter]:
    """Freeze `unet` and add a peft LoRA adapter; returns its parameters, the only trainable ones, in fp32.

    ``lora_type``: lora, dora, loha or lokr (sdxl_ztsnr.lora_variants). ``rank_pattern`` / ``alpha_pattern``:
    peft's per-module rank and alpha (regex keys matching the end of module names), for continued files;
    ``lokr_options``: LoKrConfig's decompose_both / decompose_factor, for a continued LoKr.

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
    if lora_type not in lora_variants.LORA_TYPES:
        raise ValueError(
            f"--lora_type must be one of {', '.join(lora_variants.LORA_TYPES)}, got {lora_type!r}."
        )
    config = lora_variants.peft_config(
        lora_type, rank, alpha, dropout, targets, rank_pattern, alpha_pattern, lokr_options
    )
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
    """Names of the UNet modules that carry an adapter (diffusers names, e.g. `mid_block...attn1.to_q`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]


def lora_settings(unet: torch.nn.Module) -> dict:
    """type, rank, alpha, dropout and target modules of the UNet's adapter (and per-module patterns), JSON-able."""
    config = unet.peft_config[ADAPTER_NAME]
    targets = config.target_modules
    settings = {
        "type": lora_variants.config_type(config),
        "rank": int(config.r),
        "alpha": lora_variants.config_alpha(config),
        "dropout": float(getattr(config, "lora_dropout", 0.0)),
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }
    if settings["type"] == "lokr" and (config.decompose_both or config.decompose_factor != -1):
        settings |= {"decompose_both": config.decompose_both, "decompose_factor": config.decompose_factor}
    if config.rank_pattern or config.alpha_pattern:  # a continued file with per-module ranks or alphas
        settings["rank_pattern"] = {k: int(v) for k, v in sorted(config.rank_pattern.items())}
        settings["alpha_pattern"] = {k: float(v) for k, v in sorted(config.alpha_pattern.items())}
    return settings


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


def _base_weight_keys(unet: torch.nn.Module) -> list[str]:
    """The UNet's own state-dict keys, adapter wrappers and tensors removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = set()
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            adapter |= {f"{name}.{key}" for key in module.state_dict() if not key.startswith("base_layer.")}
    return [k.replace(".base_layer.", ".") for k in unet.state_dict() if k not in adapter]


def kohya_unet_names(unet: torch.nn.Module, prefix: str = KOHYA_PREFIX) -> dict[str, str]:
    """diffusers module name -> kohya name (`prefix` + the original SGM module path with `_` for `.`), for every
    UNet module with a weight (what ComfyUI's key table holds for `lora_unet_`)."""
    to_original = {
        key: sgm.removeprefix(UNET_PREFIX) for key, sgm in unet_key_map(_base_weight_keys(unet)).items()
    }
    return {
        key.removesuffix(".weight"): prefix + sgm.removesuffix(".weight").replace(".", "_")
        for key, sgm in to_original.items()
        if key.endswith(".weight")
    }


def kohya_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers module name -> kohya name of the modules that carry the adapter."""
    names = kohya_unet_names(unet)
    return {module: names[module] for module in lora_modules(unet)}


def module_tensors(unet: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors by module, then by peft parameter name (`lora_A.weight`, `hada_w1_a`, ...)."""
    from peft.utils import get_peft_model_state_dict

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items():
        module, name = lora_variants.split_peft_key(key)
        modules.setdefault(module, {})[name] = tensor
    return modules


def module_scales(unet: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """(alpha/r, alpha) of each adapted module, per-module patterns applied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            alpha = getattr(module, "lora_alpha", None) or module.alpha
            out[name] = (float(module.scaling[ADAPTER_NAME]), float(alpha[ADAPTER_NAME]))
    return out


def kohya_state_dict(
    lora_type: LoraType,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    scales: Mapping[str, tuple[float, float]],
    out_channels: Mapping[str, int],
    names: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Adapter tensors by module (`module_tensors`) -> kohya/LyCORIS keys `<names[module]>.<suffix>`.

    `names` maps each module to its kohya name (`kohya_unet_names`, or a text encoder's with `lora_te1_`);
    `scales` gives (alpha/r, alpha) and `out_channels` each module's output width. dtype None keeps fp32; the
    0-d `.alpha` stays fp32.
    """
    out: dict[str, torch.Tensor] = {}
    for module, tensors in modules.items():
        scale, alpha = scales[module]
        converted = lora_variants.to_lycoris(lora_type, tensors, scale, alpha, out_channels[module])
        for suffix, tensor in converted.items():
            keep = dtype is None or suffix == lora_variants.ALPHA_KEY
            out[f"{names[module]}.{suffix}"] = tensor if keep else tensor.to(dtype)
    return out


def _out_channels(unet: torch.nn.Module) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: module.get_base_layer().weight.shape[0]
        for name, module in unet.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def kohya_lora_state_dict(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The UNet's adapter in kohya's layout: for a LoRA per module `.lora_down.weight` (A), `.lora_up.weight` (B),
    `.alpha` (0-d); the variants' LyCORIS keys (sdxl_ztsnr.lora_variants).

    kohya scales by alpha / rank like peft, and stores down/up with the shapes of peft's A/B (linear:
    (r, in) / (out, r); conv: (r, in, kh, kw) / (out, r, 1, 1)). dtype None keeps fp32.
    """
    lora_type = lora_settings(unet)["type"]
    return kohya_state_dict(
        lora_type,
        module_tensors(unet),
        module_scales(unet),
        _out_channels(unet),
        kohya_module_names(unet),
        dtype,
    )


def kohya_metadata(
    settings: Mapping, name: str, base_model: str | None = None, ztsnr: bool = True
) -> dict[str, str]:
    """Header metadata as kohya's sd-scripts writes for an SDXL LoRA, plus Stability's model spec, all strings.

    `modelspec.prediction_type` "v", `ss_v_parameterization` and `ss_zero_terminal_snr` tell UIs and model
    sites that the LoRA belongs on a v-prediction (ZTSNR) SDXL. The variants are named as LyCORIS's kohya
    network names them (`lycoris.kohya`, `algo`, `dora_wd`).
    """
    lora_type = settings.get("type", "lora")
    network_args: dict = {"target_modules": settings["target_modules"]}
    if lora_type != "lora":
        network_args = {"algo": "lora" if lora_type == "dora" else lora_type, **network_args}
    if lora_type == "dora":
        network_args |= {"dora_wd": "True", "wd_on_out": "True"}
    return {
        "ss_network_module": "networks.lora" if lora_type == "lora" else "lycoris.kohya",
        "ss_network_dim": str(settings["rank"]),
        "ss_network_alpha": str(float(settings["alpha"])),
        "ss_network_dropout": str(float(settings["dropout"])),
        "ss_network_args": json.dumps(network_args),
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
        saved_settings = {"type": "lora", **json.loads(f.metadata()["lora"])}  # older checkpoints: plain LoRA
        current = lora_settings(unet)
        if saved_settings != current:
            raise ValueError(
                f"{path}: saved with LoRA settings {saved_settings}, this run has {current}; resume with the "
                "same --lora_type / --lora_rank / --lora_alpha / --lora_dropout / --lora_target_modules / "
                "--lora_weights."
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
