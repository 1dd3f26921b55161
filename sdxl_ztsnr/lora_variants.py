"""The adapter kinds a LoRA run can train through peft, and their per-module tensors in LyCORIS's key layout.

- lora: W + (alpha/r)·B·A (Hu et al. 2021, arXiv:2106.09685).
- dora: m · (W + (alpha/r)·B·A) / ‖W + (alpha/r)·B·A‖, the norm per output channel (Liu et al. 2024,
  arXiv:2402.09353); peft's LoraConfig(use_dora=True).
- loha: W + (alpha/r)·(W1a·W1b) ⊙ (W2a·W2b), a Hadamard product of two rank-r products (Hyeon-Woo et al.
  2022, FedPara, arXiv:2108.06098); peft's LoHaConfig.
- lokr: W + (alpha/r)·W1 ⊗ W2, a Kronecker product whose larger factor W2 is itself W2a·W2b when r is small
  (Yeh et al. 2024, arXiv:2309.14859); peft's LoKrConfig.

ComfyUI, A1111 and Forge read the same math from LyCORIS's keys, per module `lora_unet_<name>`:
`.lora_down.weight`/`.lora_up.weight` (+ `.dora_scale`), `.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b`,
`.lokr_w1(_a/_b)/.lokr_w2(_a/_b)`, and `.alpha`. Two conventions differ from peft's tensors:

- dora_scale: loaders tell the decomposition axis by its shape: (out, 1) / (out, 1, 1, 1) is the output axis
  (peft's, LyCORIS's wd_on_out), (1, in) / (1, in, 1, 1) the input axis. peft keeps (out,) / (1, out, 1, 1).
- LoKr: loaders apply alpha/r only when a factor is decomposed (they read r from it); with both factors
  full the scale is 1, so peft's alpha/r is folded into lokr_w1 there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

LoraType = Literal["lora", "dora", "loha", "lokr"]
LORA_TYPES: tuple[LoraType, ...] = ("lora", "dora", "loha", "lokr")

# peft's parameter names per kind (state-dict suffixes after the module name) -> LyCORIS's key suffixes.
_LORA_KEYS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_DORA_KEYS = {**_LORA_KEYS, "lora_magnitude_vector": "dora_scale"}
_LOHA_KEYS = {name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
_LOKR_KEYS = {
    name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
}
PEFT_TO_LYCORIS: dict[LoraType, dict[str, str]] = {
    "lora": _LORA_KEYS,
    "dora": _DORA_KEYS,
    "loha": _LOHA_KEYS,
    "lokr": _LOKR_KEYS,
}
ALPHA_KEY = "alpha"
# LyCORIS keys of modules peft cannot hold (Tucker cores, LoCon's mid, full diffs, OFT, GLoRA, (IA)^3 ...).
UNSUPPORTED_LYCORIS_KEYS = {
    "lora_mid.weight": "LoCon with a Tucker core (lora_mid)",
    "hada_t1": "LoHa with Tucker cores (hada_t1/t2)",
    "hada_t2": "LoHa with Tucker cores (hada_t1/t2)",
    "lokr_t2": "LoKr with a Tucker core (lokr_t2)",
    "diff": "a full weight difference (.diff)",
    "diff_b": "a full bias difference (.diff_b)",
    "oft_blocks": "OFT",
    "oft_diag": "BOFT/OFT",
    "a1.weight": "GLoRA",
    "weight": "(IA)^3 or a full weight",
    "w_norm": "a norm difference (w_norm)",
    "b_norm": "a norm difference (b_norm)",
}


def peft_config(
    lora_type: LoraType,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str] | str,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    lokr_options: Mapping[str, object] | None = None,
):
    """The peft config of an adapter of kind `lora_type` (patterns: per-module rank/alpha, regex keys;
    lokr_options: LoKrConfig's decompose_both / decompose_factor)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    patterns = {"rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    if lora_type in ("lora", "dora"):
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            use_dora=lora_type == "dora",
            **patterns,
        )
    if dropout:
        raise ValueError(
            f"--lora_dropout: peft's {lora_type} has no input dropout; leave it at 0 for --lora_type {lora_type}."
        )
    if lora_type == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, **patterns)
    return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, **patterns, **dict(lokr_options or {}))


def config_type(config) -> LoraType:
    """The kind of a peft adapter config."""
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora":
        return "dora" if config.use_dora else "lora"
    if kind in ("loha", "lokr"):
        return kind
    raise ValueError(f"a {kind} adapter is none of {', '.join(LORA_TYPES)}")


def config_alpha(config) -> float:
    return float(config.lora_alpha if hasattr(config, "lora_alpha") else config.alpha)


def split_peft_key(key: str) -> tuple[str, str] | None:
    """`<module>.<peft parameter>` -> (module, parameter), None for a key that is no adapter tensor."""
    for names in (_DORA_KEYS, _LOHA_KEYS, _LOKR_KEYS):
        for name in names:
            if key.endswith("." + name):
                return key[: -len(name) - 1], name
    return None


def lokr_factors_full(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Both Kronecker factors stored whole: loaders then scale by 1 (see the module docstring)."""
    return "lokr_w1" in tensors and "lokr_w2" in tensors


def to_lycoris(
    lora_type: LoraType, tensors: Mapping[str, torch.Tensor], scale: float, alpha: float, out_channels: int
) -> dict[str, torch.Tensor]:
    """One module's peft tensors (by parameter name) -> LyCORIS suffixes, `alpha` 0-d fp32 included.

    `scale` is the module's alpha/r (peft's scaling); `out_channels` orients DoRA's magnitude vector.
    """
    out = {PEFT_TO_LYCORIS[lora_type][name]: tensor for name, tensor in tensors.items()}
    if lora_type == "dora":
        magnitude = tensors["lora_magnitude_vector"]
        out["dora_scale"] = magnitude.reshape(out_channels, *[1] * (tensors["lora_A.weight"].dim() - 1))
    if lora_type == "lokr" and lokr_factors_full(tensors):
        out["lokr_w1"] = tensors["lokr_w1"] * scale  # loaders scale a whole-factor LoKr by 1
    out[ALPHA_KEY] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def from_lycoris(
    lora_type: LoraType,
    tensors: Mapping[str, torch.Tensor],
    scale: float,
    peft_shapes: Mapping[str, torch.Size],
    where: str,
) -> dict[str, torch.Tensor]:
    """The inverse of `to_lycoris` for one module: peft parameter name -> tensor, in the shapes peft built.

    `peft_shapes`: the adapter's parameters for this module as peft created them; `where` names the module in
    errors. Raises ValueError naming the key when the file's tensors do not fit.
    """
    inverse = {lycoris: name for name, lycoris in PEFT_TO_LYCORIS[lora_type].items()}
    out = {}
    for suffix, tensor in tensors.items():
        if suffix == ALPHA_KEY:
            continue
        name = inverse.get(suffix)
        if name is None:
            raise ValueError(f"{where}.{suffix}: not a key of a {lora_type} module")
        if name == "lora_magnitude_vector":
            expected = peft_shapes[name]
            out_channels = expected.numel()
            if tensor.shape[0] != out_channels or tensor.numel() != out_channels:
                raise ValueError(
                    f"{where}.dora_scale: shape {tuple(tensor.shape)} is DoRA on the input axis (LyCORIS "
                    f"wd_on_out=False); peft's DoRA decomposes per output channel ({out_channels},) and cannot "
                    "continue it"
                )
            tensor = tensor.reshape(expected)
        if name == "lokr_w1" and lora_type == "lokr" and lokr_factors_full(tensors):
            tensor = tensor / scale
        out[name] = tensor
    if out.keys() != peft_shapes.keys():
        missing = sorted(peft_shapes.keys() - out.keys())
        extra = sorted(out.keys() - peft_shapes.keys())
        raise ValueError(
            f"{where}: holds {sorted(PEFT_TO_LYCORIS[lora_type][n] for n in out)}, but peft's {lora_type} of this "
            f"rank builds {sorted(PEFT_TO_LYCORIS[lora_type][n] for n in peft_shapes)} (missing {missing}, "
            f"extra {extra})"
        )
    for name, tensor in out.items():
        if tensor.shape != peft_shapes[name]:
            raise ValueError(
                f"{where}.{PEFT_TO_LYCORIS[lora_type][name]}: shape {tuple(tensor.shape)}, this UNet's module "
                f"needs {tuple(peft_shapes[name])}"
            )
    return out


def lycoris_type(suffixes: Sequence[str]) -> LoraType | None:
    """The kind of one module's LyCORIS keys, None when they hold none of ours."""
    names = set(suffixes) - {ALPHA_KEY}
    if "dora_scale" in names:
        return "dora"
    for kind in ("lora", "loha", "lokr"):
        if names and names <= set(PEFT_TO_LYCORIS[kind].values()):
            return kind
    return None


def lycoris_rank(lora_type: LoraType, tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank one module's LyCORIS tensors were made with; None for a LoKr with both factors whole."""
    if lora_type in ("lora", "dora"):
        return int(tensors["lora_down.weight"].shape[0])
    if lora_type == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    for decomposed in ("lokr_w2_b", "lokr_w1_b"):
        if decomposed in tensors:
            return int(tensors[decomposed].shape[0])
    return None
