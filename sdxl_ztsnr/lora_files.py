"""Continue a LoRA from a file (--lora_weights): kohya/A1111/LyCORIS keys or diffusers/peft keys, into peft.

What a file holds decides the adapter: its kind (lora, dora, loha, lokr), each module's rank and alpha, and the
modules it adapts (peft targets are derived from them: the shortest module-name suffixes that match exactly those
modules). The tensors are then copied into the peft adapter, so the adapted UNet computes what the file's
adapter computes. Layouts read:

- kohya / A1111 / LyCORIS: `lora_unet_<name>.<suffix>`, `<name>` the original SGM module path or the diffusers one
  with `_` for `.` (both are in ComfyUI's key table), or SimpleTuner's `lycoris_<diffusers name>`.
- diffusers / peft: `unet.<module>.lora_A.weight` ... (ours, with the peft config in the header; diffusers' and
  other trainers'), a bare `<module>.lora_A.weight`, and diffusers' older `<module>.lora.down.weight` /
  `<module>.processor.to_q_lora.down.weight`.

Text-encoder keys (`lora_te1_`, `lora_te2_`, `text_encoder.`, `text_encoder_2.`) are split off by
`split_components`; this module continues the UNet's part.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdxl_ztsnr import lora as lora_lib
from sdxl_ztsnr import lora_variants
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.lora_variants import LoraType

# Key prefix -> component, longest first. kohya writes lora_te1_/lora_te2_ for SDXL (lora_te_ for one encoder).
COMPONENT_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lycoris_", "unet"),  # SimpleTuner's LyCORIS files: diffusers module names
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("base_model.model.", "unet"),  # peft's PeftModel.save_pretrained
)
_FULL_MODEL_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.",
    "cond_stage_model.",
)
_PEFT_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    "_lora.down.weight",
)


@dataclass
class FileAdapter:
    """The UNet adapter a file holds: its settings and its tensors by diffusers module name."""

    lora_type: LoraType
    layout: str  # "kohya" (LyCORIS suffixes) or "peft" (peft parameter names)
    ranks: dict[str, int]  # per module
    alphas: dict[str, float]  # per module
    tensors: dict[str, dict[str, torch.Tensor]]  # module -> suffix / parameter name -> tensor
    lokr: dict = field(default_factory=dict)  # LoKr's decompose_both / decompose_factor

    @property
    def rank(self) -> int:
        return Counter(self.ranks.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        return Counter(self.alphas.values()).most_common(1)[0][0]

    def patterns(self) -> tuple[dict[str, int], dict[str, float]]:
        """peft's rank_pattern / alpha_pattern for the modules that differ from the most common rank / alpha."""
        ranks = {re.escape(m): r for m, r in sorted(self.ranks.items()) if r != self.rank}
        alphas = {re.escape(m): a for m, a in sorted(self.alphas.items()) if a != self.alpha}
        return ranks, alphas


def split_components(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Keys by component (unet, text_encoder, text_encoder_2), each with its prefix kept; unprefixed keys: unet."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component = next((c for prefix, c in COMPONENT_PREFIXES if key.startswith(prefix)), "unet")
        out.setdefault(component, {})[key] = tensor
    return out


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a LoRA `.safetensors` (weights are read only from safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / lora_lib.DIFFUSERS_LORA_NAME
    if not path.is_file():
        raise UserError(f"--lora_weights {path}: no such file")
    if path.suffix != ".safetensors":
        raise UserError(
            f"--lora_weights {path}: not a .safetensors file (weights are read only from safetensors)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as error:
        raise UserError(f"--lora_weights {path}: not a readable safetensors file ({error})") from None


def unet_kohya_table(unet: torch.nn.Module) -> dict[str, str]:
    """kohya name -> diffusers module: ComfyUI's names for the UNet (SGM path and diffusers path)."""
    table = {kohya: module for module, kohya in lora_lib.kohya_unet_names(unet).items()}
    for module in lora_lib.kohya_unet_names(unet):
        flat = module.replace(".", "_")
        table.setdefault(lora_lib.KOHYA_PREFIX + flat, module)
        table.setdefault("lycoris_" + flat, module)
    return table


def _file_kind_error(path: Path, keys: Iterable[str]) -> None:
    keys = sorted(keys)
    full = next((k for k in keys if k.startswith(_FULL_MODEL_PREFIXES) or k == "conv_in.weight"), None)
    if full is not None:
        raise UserError(
            f"--lora_weights {path}: holds model weights ({full}), not a LoRA; a base model goes to "
            "--pretrained_model_name_or_path"
        )


def _metadata_config(metadata: Mapping[str, str], component: str) -> dict:
    """A component's peft config from a diffusers/peft file header (`lora_adapter_metadata`), {} without one."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    packed = json.loads(raw)
    prefix = f"{component}."
    return {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix) or "." not in k}


def _kohya_modules(
    path: Path, state: Mapping[str, torch.Tensor], table: Mapping[str, str], what: str
) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(state):
        name, _, suffix = key.partition(".")
        module = table.get(name)
        if module is None:
            raise UserError(
                f"--lora_weights {path}: key {key} names no module of this {what} (a LoRA for another "
                "architecture, e.g. SD 1.5 or Flux?)"
            )
        if suffix in lora_variants.UNSUPPORTED_LYCORIS_KEYS:
            raise UserError(
                f"--lora_weights {path}: key {key} is {lora_variants.UNSUPPORTED_LYCORIS_KEYS[suffix]}, which "
                f"cannot be continued (--lora_type {'/'.join(lora_variants.LORA_TYPES)} can)"
            )
        modules.setdefault(module, {})[suffix] = state[key]
    return modules


def _peft_modules(
    path: Path, state: Mapping[str, torch.Tensor], component: str
) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    bare = {}
    for key, tensor in state.items():
        for prefix in (f"{component}.", "base_model.model."):
            key = key.removeprefix(prefix)
        bare[key] = tensor
    if any(k.endswith((".lora.down.weight", "_lora.down.weight")) for k in bare):  # diffusers' older forms
        bare = convert_unet_state_dict_to_peft(bare)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(bare):
        split = lora_variants.split_peft_key(key.replace(".default.", ".").removesuffix(".default"))
        if split is None and key.endswith(".alpha"):  # some converters keep kohya's alpha beside peft keys
            split = key.removesuffix(".alpha"), lora_variants.ALPHA_KEY
        if split is None:
            raise UserError(f"--lora_weights {path}: key {key} is no LoRA, DoRA, LoHa or LoKr tensor")
        module, name = split
        modules.setdefault(module, {})[name] = bare[key]
    return modules


def _module_type(path: Path, module_keys: Mapping[str, dict], layout: str) -> LoraType:
    kinds = {}
    for module, tensors in module_keys.items():
        if layout == "kohya":
            kind = lora_variants.lycoris_type(tensors)
        else:
            names = set(tensors)
            kind = (
                "dora"
                if "lora_magnitude_vector" in names
                else "loha"
                if any(n.startswith("hada_") for n in names)
                else "lokr"
                if any(n.startswith("lokr_") for n in names)
                else "lora"
            )
        if kind is None:
            raise UserError(
                f"--lora_weights {path}: module {module} holds {sorted(tensors)}, no LoRA/DoRA/LoHa/LoKr keys"
            )
        kinds.setdefault(kind, module)
    if len(kinds) > 1:
        raise UserError(
            f"--lora_weights {path}: mixes adapter kinds {dict(sorted(kinds.items()))}; one kind only"
        )
    return next(iter(kinds))


def _peft_rank(lora_type: LoraType, tensors: Mapping[str, torch.Tensor]) -> int | None:
    if lora_type in ("lora", "dora"):
        return int(tensors["lora_A.weight"].shape[0])
    if lora_type == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    return next((int(tensors[n].shape[0]) for n in ("lokr_w2_b", "lokr_w1_b") if n in tensors), None)


def _pattern_value(patterns: Mapping[str, float], module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key (a regex) matching the end of the module name."""
    key = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)
    return default if key is None else patterns[key]


def _lokr_settings(adapter_modules: Mapping[str, dict], unet) -> dict:
    """decompose_both and decompose_factor that give the file's LoKr factor shapes (peft's factorization)."""
    from peft.tuners.lokr.layer import factorization

    w1 = {m: t.get("lokr_w1") for m, t in adapter_modules.items()}
    layers = dict(unet.named_modules())
    candidates = [-1] + sorted({int(t.shape[0]) for t in w1.values() if t is not None})
    for factor in candidates:
        fits = True
        for module, tensor in w1.items():
            if tensor is None:
                continue
            weight = layers[module].weight
            out1, in1 = factorization(weight.shape[0], factor)[0], factorization(weight.shape[1], factor)[0]
            fits &= tuple(tensor.shape) == (out1, in1)
        if fits:
            break
    decompose_both = any("lokr_w1_a" in t for t in adapter_modules.values())
    return {"decompose_both": decompose_both, "decompose_factor": factor}


def file_adapter(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    unet: torch.nn.Module,
    kohya_table: Mapping[str, str] | None = None,
    component: str = "unet",
) -> FileAdapter:
    """The adapter in a file's tensors for one model (`state`: its component of `split_components`), checked
    against the model's module names; a UserError names the file and the first key that does not fit.

    `unet` is the model (the UNet, or a text encoder with its `kohya_table`: kohya name -> module name, and
    `component`, the prefix of its diffusers keys); the UNet's table is `unet_kohya_table`.
    """
    path = Path(path)
    what = "SDXL UNet" if component == "unet" else component
    if not state:
        raise UserError(f"--lora_weights {path}: holds no {what} LoRA tensors")
    _file_kind_error(path, state)
    table = unet_kohya_table(unet) if kohya_table is None else kohya_table
    if any(k.startswith(("lora_", "lycoris_")) and not k.startswith(("lora_A", "lora_B")) for k in state):
        layout, modules = "kohya", _kohya_modules(path, state, table, what)
    elif any(k.endswith(_PEFT_SUFFIXES) or lora_variants.split_peft_key(k) for k in state):
        layout, modules = "peft", _peft_modules(path, state, component)
    else:
        raise UserError(
            f"--lora_weights {path}: key {sorted(state)[0]} is in no LoRA layout this trainer reads"
        )
    lora_type = _module_type(path, modules, layout)
    layers = dict(unet.named_modules())
    for module in modules:
        if not isinstance(layers.get(module), (torch.nn.Linear, torch.nn.Conv2d)):
            raise UserError(
                f"--lora_weights {path}: module {module} is no Linear or Conv2d layer of this {what}"
                + ("" if module in layers else " (a LoRA for another architecture?)")
            )
    config = _metadata_config(metadata, component) if layout == "peft" else {}
    rank_of = lora_variants.lycoris_rank if layout == "kohya" else _peft_rank
    ranks = {m: rank_of(lora_type, t) for m, t in modules.items()}
    # A LoKr module with both factors whole holds no rank. A peft file's config has it (its scale is alpha/r);
    # in a kohya file the scale is folded in, and the rank only has to make peft keep the factors whole
    # (rank >= the larger side of lokr_w2 / 2).
    whole = [m for m, r in ranks.items() if r is None]
    if whole and "r" in config:
        ranks |= {m: int(_pattern_value(config.get("rank_pattern") or {}, m, config["r"])) for m in whole}
    elif whole:
        known = Counter(r for r in ranks.values() if r is not None).most_common(1)
        rank = known[0][0] if known else 1
        ranks |= {m: max(rank, -(-max(modules[m]["lokr_w2"].shape[:2]) // 2)) for m in whole}
    alphas = {}
    default_alpha = config.get("lora_alpha", config.get("alpha"))
    for module, tensors in modules.items():
        alpha = tensors.pop(lora_variants.ALPHA_KEY, None)
        if alpha is None:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, default_alpha)
        alphas[module] = float(
            ranks[module] if alpha is None else alpha
        )  # none: kohya's and diffusers' scale 1
    lokr = _lokr_settings(modules, unet) if lora_type == "lokr" else {}
    return FileAdapter(lora_type, layout, ranks, alphas, modules, lokr)


def compact_targets(module_names: Iterable[str], chosen: Iterable[str]) -> list[str]:
    """The shortest module-name suffixes that, by peft's rule (a name equals the target or ends with '.' + it),
    match exactly the `chosen` modules among `module_names`."""
    chosen = set(chosen)
    matches: dict[str, set[str]] = {}
    for name in module_names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            matches.setdefault(".".join(parts[-k:]), set()).add(name)
    targets = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if matches[suffix] <= chosen:
                targets.add(suffix)
                break
    return sorted(targets)


def matched_modules(unet: torch.nn.Module, targets: list[str]) -> set[str]:
    """The Linear/Conv2d modules peft would adapt for `targets` (names or suffixes)."""
    return {
        name
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        and any(name == t or name.endswith("." + t) for t in targets)
    }


def check_requested(
    path: str | Path,
    adapter: FileAdapter,
    unet: torch.nn.Module,
    lora_type: LoraType | None,
    rank: int | None,
    alpha: float | None,
    target_modules: list[str] | None,
) -> None:
    """Flags given beside --lora_weights must agree with the file (None: not given, the file's is taken)."""
    differ = []
    if lora_type is not None and lora_type != adapter.lora_type:
        differ.append(f"--lora_type {lora_type} (the file: {adapter.lora_type})")
    if rank is not None and set(adapter.ranks.values()) != {rank}:
        differ.append(f"--lora_rank {rank} (the file: {sorted(set(adapter.ranks.values()))})")
    if alpha is not None and set(adapter.alphas.values()) != {float(alpha)}:
        differ.append(f"--lora_alpha {alpha:g} (the file: {sorted(set(adapter.alphas.values()))})")
    if target_modules is not None:
        extra = sorted(matched_modules(unet, target_modules) ^ set(adapter.tensors))
        if extra:
            differ.append(f"--lora_target_modules (the file's modules differ at {extra[0]})")
    if differ:
        raise UserError(
            f"--lora_weights {path}: {differ[0]} disagrees with the file; leave the flag out to continue the "
            "file's adapter as it is"
        )


def add_file_adapter(
    unet: torch.nn.Module,
    path: str | Path,
    adapter: FileAdapter,
    dropout: float = 0.0,
    under_autocast: bool = False,
) -> list[torch.nn.Parameter]:
    """Add the file's adapter to `unet` (sdxl_ztsnr.lora.add_lora) and copy its tensors in; returns its parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = compact_targets([name for name, _ in unet.named_modules()], adapter.tensors)
    rank_pattern, alpha_pattern = adapter.patterns()
    params = lora_lib.add_lora(
        unet,
        adapter.rank,
        adapter.alpha,
        dropout,
        targets,
        under_autocast=under_autocast,
        lora_type=adapter.lora_type,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lokr_options=adapter.lokr or None,
    )
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    if set(layers) != set(adapter.tensors):  # compact_targets matched other modules: a bug, not a user error
        raise RuntimeError(
            f"targets {targets} adapt {sorted(set(layers) ^ set(adapter.tensors))[:3]} differently"
        )
    parameters = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for module, tensors in adapter.tensors.items():
            own = {
                name: parameters[f"{module}.{_peft_parameter(name)}"]
                for name in lora_variants.PEFT_TO_LYCORIS[adapter.lora_type]
                if f"{module}.{_peft_parameter(name)}" in parameters
            }
            shapes = {name: p.shape for name, p in own.items()}
            try:
                if adapter.layout == "kohya":
                    scale = float(layers[module].scaling[lora_lib.ADAPTER_NAME])
                    values = lora_variants.from_lycoris(adapter.lora_type, tensors, scale, shapes, module)
                else:
                    values = _checked_peft(dict(tensors), shapes, module)
            except ValueError as error:
                raise UserError(f"--lora_weights {path}: {error}") from None
            for name, value in values.items():
                own[name].copy_(value.to(own[name].dtype))
    return params


def _peft_parameter(name: str) -> str:
    """peft parameter name in named_parameters(): the adapter name sits before `.weight` or at the end."""
    if name.endswith(".weight"):
        return f"{name.removesuffix('.weight')}.{lora_lib.ADAPTER_NAME}.weight"
    if name == "lora_magnitude_vector":
        return f"{name}.{lora_lib.ADAPTER_NAME}.weight"
    return f"{name}.{lora_lib.ADAPTER_NAME}"


def _checked_peft(tensors: dict, shapes: Mapping[str, torch.Size], module: str) -> dict[str, torch.Tensor]:
    if tensors.keys() != shapes.keys():
        raise ValueError(f"{module}: holds {sorted(tensors)}, peft builds {sorted(shapes)} for it")
    for name, tensor in tensors.items():
        if tensor.shape != shapes[name]:
            raise ValueError(
                f"{module}.{name}: shape {tuple(tensor.shape)}, this UNet's module needs {tuple(shapes[name])}"
            )
    return tensors


def continue_lora(
    unet: torch.nn.Module,
    path: str | Path,
    lora_type: LoraType | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
    under_autocast: bool = False,
) -> list[torch.nn.Parameter]:
    """--lora_weights: freeze `unet`, add the file's adapter with its tensors; returns the trainable parameters.

    type, rank, alpha and targets come from the file; any of them given (not None) must agree with it.
    """
    state, metadata = read_lora_file(path)
    components = split_components(state)
    others = sorted(set(components) - {"unet"})
    if others:
        first = sorted(components[others[0]])[0]
        raise UserError(
            f"--lora_weights {path}: holds {others[0]} LoRA tensors ({first}); this run continues the UNet's only"
        )
    adapter = file_adapter(path, components.get("unet", {}), metadata, unet)
    check_requested(path, adapter, unet, lora_type, rank, alpha, target_modules)
    return add_file_adapter(unet, path, adapter, dropout, under_autocast)


def load_lora_file(unet: torch.nn.Module, path: str | Path) -> None:
    """Apply a LoRA file of any kind to `unet` for inference (what the variants need beside diffusers' loader)."""
    continue_lora(unet, path)
    unet.requires_grad_(False)
