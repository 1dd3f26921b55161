"""Single-file SDXL bases (one `.safetensors` in the original Stability layout) as diffusers models.

The layout, as our export, kohya sd-scripts, ComfyUI and A1111/Forge write it:

    model.diffusion_model.*                UNet, sgm names
    first_stage_model.*                    VAE, ldm names; mid-block attention as 1x1 convs (or linears)
    conditioner.embedders.0.transformer.*  CLIP ViT-L, transformers names under text_model.
    conditioner.embedders.1.model.*        OpenCLIP ViT-bigG, open_clip names: q/k/v fused into in_proj,
                                           text_projection stored (hidden, projection), transposed

Writers differ in what else they keep, and all of it is ignored: CLIP-L's position_ids (kohya drops it on
recent transformers, ComfyUI writes one, and one under clip_g too), open_clip's logit_scale, the marker
tensors, and anything outside those four prefixes (`denoiser.sigmas`, `model_ema.*`, ...). Tensors may be
fp32, fp16, bf16 or fp8. Keys are found by inverting export's key maps over the model its config builds,
so our own export loads back bit-exact.

Models, tokenizers and the scheduler config come from `config_dir` (a diffusers SDXL directory) or, without
one, from SDXL base 1.0's configs on the Hub (json/txt only). A file without a VAE or text encoders loads
those parts from `config_dir` when it holds their weights, and says so. The prediction type and schedule
come from the file (`sdxl_ztsnr.base_schedule`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sdxl_ztsnr.base_schedule import BaseSchedule, read_base_schedule, scheduler_config_for
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.export import (
    CLIP_G_PREFIX,
    CLIP_G_TEXT_PROJECTION,
    CLIP_L_PREFIX,
    FUSED_QKV,
    UNET_PREFIX,
    VAE_PREFIX,
    apply_umask,
    clip_g_key_map,
    clip_l_key_map,
    qkv_index,
    unet_key_map,
    vae_key_map,
)

logger = logging.getLogger(__name__)

Component = Literal["unet", "vae", "text_encoder", "text_encoder_2"]
COMPONENTS: tuple[Component, ...] = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES: dict[str, str] = {
    "unet": UNET_PREFIX,
    "vae": VAE_PREFIX,
    "text_encoder": CLIP_L_PREFIX,
    "text_encoder_2": CLIP_G_PREFIX,
}
PART_NAMES = {
    "unet": "UNet",
    "vae": "VAE",
    "text_encoder": "CLIP-L encoder",
    "text_encoder_2": "CLIP-G encoder",
}
KEY_MAPS = {
    "unet": unet_key_map,
    "vae": vae_key_map,
    "text_encoder": clip_l_key_map,
    "text_encoder_2": clip_g_key_map,
}
# Keys some writers add inside the component prefixes that no diffusers model holds; dropped silently.
_KNOWN_EXTRAS = re.compile(
    r".*(position_ids|logit_scale)|" + re.escape(CLIP_L_PREFIX) + r"text_projection\.weight"
)
# Keys outside the components that say nothing about the weights; any other leftover is logged.
_KNOWN_OUTSIDE = re.compile(
    r"(v_pred|ztsnr|denoiser\.sigmas|model_ema\..*|alphas_cumprod.*|betas|.*logit_scale)"
)

HUB_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
HUB_CONFIG_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    *(f"{part}/config.json" for part in COMPONENTS),
    "tokenizer/*",
    "tokenizer_2/*",
]
SOURCE_RECORD = "single_file_source.json"  # written last into a materialised directory: it is complete


# ---------------------------------------------------------------------------------------------------------------
# Reading and refusing


class _FileTensors(Mapping):
    """The tensors of an open safetensors file as a read-only mapping; each is read when asked for."""

    def __init__(self, handle):
        self.handle, self.names = handle, list(handle.keys())
        self._known = set(self.names)

    def __contains__(self, key: object) -> bool:
        return key in self._known  # without reading the tensor, as Mapping's default would

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self.handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextlib.contextmanager
def open_single_file(path: str | os.PathLike) -> Iterator[tuple[Mapping[str, torch.Tensor], dict[str, str]]]:
    """(tensors, metadata) of a .safetensors file, read lazily; a UserError for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(
            f"{path}: a pickle checkpoint; only .safetensors files are loaded (a pickle can run code)"
        )
    try:
        handle = safe_open(str(path), framework="pt")
    except (OSError, SafetensorError, ValueError) as error:
        raise UserError(f"{path}: not a readable .safetensors file ({_first_line(error)})") from None
    with handle:
        yield _FileTensors(handle), dict(handle.metadata() or {})


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


_ADAPTER_KEY = re.compile(r"(^|[._])(lora_(up|down|A|B|unet|te\d?)|hada_w|lokr_w|oft_)")
_DIFFUSERS_UNET_KEY = re.compile(r"^(unet\.)?(down_blocks|mid_block|up_blocks|conv_in|time_embedding)\.")


def check_sdxl_base(path: Path, keys: Sequence[str], metadata: Mapping[str, str]) -> None:
    """Refuse, naming the file and the reason, anything but an SDXL base in the original layout."""
    adapter = [k for k in keys if _ADAPTER_KEY.search(k)]
    if (
        adapter
        or "ss_network_module" in metadata
        or str(metadata.get("modelspec.architecture", "")).endswith("/lora")
    ):
        example = f" ({len(adapter)} keys like {adapter[0]!r})" if adapter else ""
        raise UserError(
            f"{path}: a LoRA/LyCORIS adapter{example}, not a base model; pass the SDXL checkpoint it was trained "
            "on (or a merge of the two)"
        )
    if "scaled_fp8" in keys:
        raise UserError(
            f"{path}: a ComfyUI scaled-fp8 checkpoint (weights need their scales); pass an fp16/bf16/fp32 one"
        )
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(_DIFFUSERS_UNET_KEY.match(k) for k in keys):
            kind = "a diffusers-layout UNet state dict; put it in a diffusers directory's unet/ and pass that"
        elif any(k.startswith((VAE_PREFIX, "encoder.", "decoder.")) for k in keys):
            kind = "a VAE alone, not an SDXL base"
        else:
            kind = "not a Stable Diffusion checkpoint"
        raise UserError(f"{path}: no UNet weights ({UNET_PREFIX}*): {kind}")
    if any(k.startswith("cond_stage_model.") for k in keys):
        raise UserError(f"{path}: an SD 1.x/2.x checkpoint (text encoder under cond_stage_model.*), not SDXL")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise UserError(f"{path}: an SDXL refiner (one OpenCLIP encoder), not an SDXL base")
    if UNET_PREFIX + "label_emb.0.0.weight" not in keys:
        raise UserError(
            f"{path}: its UNet has no label_emb (SDXL's size and pooled-text conditioning): not an SDXL base"
        )
    if "edm_mean" in keys or "edm_vpred.sigma_max" in keys:
        raise UserError(
            f"{path}: a continuous-σ EDM model (Playground v2.5 / CosXL style); only SDXL's discrete schedule "
            "(ε or v-prediction) is supported"
        )


# ---------------------------------------------------------------------------------------------------------------
# Conversion: the inverse of export's


def _fit_shape(tensor: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """`tensor` as `shape`: a 1x1 convolution and a linear hold the same numbers (ldm's VAE attention is a conv)."""
    if tensor.shape == shape:
        return tensor

    def core(dims) -> list[int]:
        dims = list(dims)
        while len(dims) > 2 and dims[-1] == 1:
            dims.pop()
        return dims

    if core(tensor.shape) == core(shape):
        return tensor.reshape(shape)
    raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the config's model expects {tuple(shape)}")


def diffusers_state_dict(
    component: Component,
    original: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One component's diffusers state dict from original-layout tensors: export's conversion run backwards.

    `expected` is the diffusers model's own key -> shape (a model built from its config on the meta device);
    export's key map over those keys, inverted, names each tensor to read. Fused q/k/v are split, CLIP-G's
    text_projection transposed back, 1x1 convs and linears reshaped into each other. Floating tensors are cast
    to `dtype` (None keeps the file's). A missing position_ids buffer keeps the model's own.
    """
    plan = KEY_MAPS[component](expected.keys())
    out, missing, fused = {}, [], {}
    for key, original_key in plan.items():
        if original_key not in original:
            if not key.endswith("position_ids"):
                missing.append(original_key)
            continue
        part = qkv_index(key) if component == "text_encoder_2" else None
        if part is not None:
            if original_key not in fused:
                fused[original_key] = original[original_key]
                if fused[original_key].shape[0] % len(FUSED_QKV):
                    raise ValueError(
                        f"{original_key} has {fused[original_key].shape[0]} rows, not 3 x hidden"
                    )
            tensor = (
                fused[original_key].chunk(len(FUSED_QKV), dim=0)[part].clone()
            )  # a copy: no shared storage
        elif original_key == CLIP_G_TEXT_PROJECTION:
            tensor = original[original_key].t().contiguous()
        else:
            tensor = original[original_key]
        tensor = _fit_shape(tensor, expected[key], original_key)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    if missing:
        raise ValueError(
            f"{PART_NAMES[component]}: {len(missing)} of {len(plan)} tensors missing, e.g. {missing[:3]} (a "
            "truncated file, or another architecture than the config's)"
        )
    return out


def original_keys(component: Component, expected_keys: Sequence[str]) -> set[str]:
    """The original-layout keys one component's model reads (export's key map over its keys)."""
    return set(KEY_MAPS[component](expected_keys).values())


# ---------------------------------------------------------------------------------------------------------------
# Configs and models


def sdxl_config_dir(path: Path, config_dir: str | os.PathLike | None) -> Path:
    """`config_dir` checked, or SDXL base 1.0's configs and tokenizers from the Hub (cached; no weights)."""
    if config_dir is not None:
        config_dir = Path(config_dir)
        if not (config_dir / "unet" / "config.json").is_file():
            raise UserError(f"{config_dir}: not a diffusers SDXL directory (no unet/config.json)")
        return config_dir
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(HUB_CONFIG_REPO, allow_patterns=HUB_CONFIG_PATTERNS))
    except (
        OSError
    ) as error:  # offline and not cached, network down, Hub errors (HfHubHTTPError is an OSError)
        raise UserError(
            f"{path}: a single file needs SDXL's configs, which could not be fetched from the Hub "
            f"({_first_line(error)}); offline, pass --config DIR (a diffusers SDXL pipeline directory)"
        ) from None


def _has_weights(config_dir: Path, component: str) -> bool:
    return any((config_dir / component).glob("*.safetensors"))


def _model_class(component: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }[component]


def empty_model(component: Component, config_dir: Path) -> torch.nn.Module:
    """The component's model from `config_dir/<component>/config.json`, parameters on the meta device."""
    from accelerate import init_empty_weights

    cls = _model_class(component)
    config_file = config_dir / component / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_dir}: no {component}/config.json")
    with init_empty_weights():  # buffers (position_ids) stay real; parameters take no memory
        if component.startswith("text_encoder"):
            from transformers import CLIPTextConfig

            return cls(CLIPTextConfig.from_pretrained(config_dir, subfolder=component))
        return cls.from_config(cls.load_config(config_dir, subfolder=component))


def _load_component(
    path: Path, component: Component, tensors: Mapping[str, torch.Tensor], config_dir: Path, dtype
) -> torch.nn.Module:
    model = empty_model(component, config_dir)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    try:
        state_dict = diffusers_state_dict(component, tensors, expected, dtype)
    except ValueError as error:
        raise UserError(f"{path}: {error}; config from {config_dir}") from None
    model.load_state_dict(state_dict, strict=False, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{component}: {left[:3]} were not loaded")  # a key-map bug, not the user's file
    return model.eval()


def _borrow_component(path: Path, component: Component, config_dir: Path | None, dtype) -> torch.nn.Module:
    """A part the file lacks, from `config_dir`'s weights; a UserError when it has none."""
    prefix = PREFIXES[component]
    if config_dir is None or not _has_weights(config_dir, component):
        where = (
            "the Hub configs hold no weights" if config_dir is None else f"{config_dir}/{component}/ has none"
        )
        raise UserError(
            f"{path}: has no {PART_NAMES[component]} weights ({prefix}*) and {where}; pass --config DIR, a "
            f"diffusers SDXL directory whose {component}/ holds safetensors weights"
        )
    logger.warning("%s has no %s; using the one in %s", path, PART_NAMES[component], config_dir / component)
    model = _model_class(component).from_pretrained(
        config_dir, subfolder=component, use_safetensors=True, dtype=dtype
    )
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The entry point


@dataclass
class SingleFileBase:
    """An SDXL base read from one file: the asked-for models (others None), tokenizers, scheduler config."""

    path: Path
    schedule: BaseSchedule
    scheduler_config: dict  # the config dir's, set to the file's prediction type and schedule
    force_zeros_for_empty_prompt: bool  # SDXL's all-zero embeddings for an empty negative (model_index.json)
    config_dir: Path  # where the configs and tokenizers came from
    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer: object | None = None
    tokenizer_2: object | None = None
    borrowed: tuple[str, ...] = ()  # components loaded from config_dir because the file has none
    ignored_keys: tuple[str, ...] = field(default=(), repr=False)  # file keys no model reads

    def scheduler(self):
        """The scheduler config as its diffusers class (EulerDiscreteScheduler for SDXL)."""
        import diffusers

        return getattr(
            diffusers, self.scheduler_config.get("_class_name", "EulerDiscreteScheduler")
        ).from_config(self.scheduler_config)

    def pipeline(self):
        """A StableDiffusionXLPipeline of the four models (all must have been loaded)."""
        from diffusers import StableDiffusionXLPipeline

        missing = [c for c in COMPONENTS if getattr(self, c) is None]
        if missing:
            raise ValueError(f"SingleFileBase.pipeline: {missing} were not loaded (components=...)")
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=self.scheduler(),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )


def file_schedule(path: str | os.PathLike) -> BaseSchedule:
    """The prediction type and schedule of a single file (reads its header only); refuses non-SDXL files."""
    with open_single_file(path) as (tensors, metadata):
        check_sdxl_base(Path(path), list(tensors), metadata)
        return read_base_schedule(list(tensors), metadata)


def _ignored_keys(keys: Sequence[str], used: set[str], skipped: Sequence[str], path: Path) -> tuple[str, ...]:
    """Keys no model read, those of `skipped` components aside; unknown ones inside a component's prefix, or
    outside them all, are logged."""
    not_asked = tuple(PREFIXES[c] for c in skipped)
    ignored = sorted(k for k in set(keys) - used if not (not_asked and k.startswith(not_asked)))
    prefixes = tuple(PREFIXES.values())
    odd = [k for k in ignored if k.startswith(prefixes) and not _KNOWN_EXTRAS.fullmatch(k)]
    odd += [k for k in ignored if not k.startswith(prefixes) and not _KNOWN_OUTSIDE.fullmatch(k)]
    if odd:
        logger.warning("%s: %d tensors no model reads were left out, e.g. %s", path, len(odd), odd[:3])
    if any(k.startswith("model_ema.") for k in ignored):
        logger.info("%s carries EMA weights (model_ema.*); loading the raw UNet (%s*)", path, UNET_PREFIX)
    return tuple(ignored)


def _pipeline_settings(configs: Path, schedule: BaseSchedule) -> tuple[dict, bool]:
    """(scheduler config set to the schedule, force_zeros_for_empty_prompt) from a config directory."""
    scheduler_file = configs / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise UserError(f"{configs}: no scheduler/scheduler_config.json")
    index_file = configs / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    scheduler_config = scheduler_config_for(json.loads(scheduler_file.read_text()), schedule)
    return scheduler_config, bool(index.get("force_zeros_for_empty_prompt", True))


def load_single_file(
    path: str | os.PathLike,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    components: Sequence[Component] = COMPONENTS,
) -> SingleFileBase:
    """Load an SDXL single file (original layout) as diffusers models, in eval mode.

    `config_dir` is a diffusers SDXL directory for configs and tokenizers (None: SDXL base 1.0's from the Hub,
    configs only). `dtype` casts floating weights (None keeps the file's: bit-exact). `components` picks the
    models to build; tokenizers come with their text encoders. A part the file lacks is loaded from
    `config_dir`'s weights when it has them, else refused. Every problem the user can fix is a one-line
    UserError naming the file.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"load_single_file: unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    with open_single_file(path) as (tensors, metadata):
        keys = list(tensors)
        check_sdxl_base(path, keys, metadata)
        schedule = read_base_schedule(keys, metadata)
        configs = sdxl_config_dir(path, config_dir)
        base = SingleFileBase(path, schedule, *_pipeline_settings(configs, schedule), config_dir=configs)
        used: set[str] = set()
        borrowed = []
        for component in components:
            if any(k.startswith(PREFIXES[component]) for k in keys):
                model = _load_component(path, component, tensors, configs, dtype)
                used |= original_keys(component, list(model.state_dict()))
            else:
                model = _borrow_component(path, component, None if config_dir is None else configs, dtype)
                borrowed.append(component)
            setattr(base, component, model)
    for component, name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if component in components:
            setattr(base, name, CLIPTokenizer.from_pretrained(configs, subfolder=name))
    base.borrowed = tuple(borrowed)
    skipped = [c for c in COMPONENTS if c not in components]
    base.ignored_keys = _ignored_keys(keys, used, skipped, path)
    return base


# ---------------------------------------------------------------------------------------------------------------
# A diffusers directory for code that loads with from_pretrained(subfolder=...)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (A1111's AutoV2 hash is its first 10 digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_root() -> Path:
    """Where materialised bases go unless told: $SDXL_ZTSNR_CACHE, else ~/.cache/sdxl_ztsnr/bases."""
    if os.environ.get("SDXL_ZTSNR_CACHE"):
        return Path(os.environ["SDXL_ZTSNR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl_ztsnr" / "bases"


def _materialised(out_dir: Path, digest: str) -> bool:
    record = out_dir / SOURCE_RECORD
    return record.is_file() and json.loads(record.read_text()).get("sha256") == digest


def materialize_as_diffusers_dir(
    path: str | os.PathLike,
    config_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Path:
    """A diffusers SDXL pipeline directory with the single file's weights (its dtypes kept, bit-exact) and a
    scheduler config set to its schedule, for code that loads with `from_pretrained(subfolder=...)`.

    Written once per file content: `out_dir` defaults to default_cache_root()/<stem>-<sha256[:16]>, and a
    directory already holding this file's conversion is reused. It is written to a temporary sibling and
    renamed into place, so concurrent processes never read half of one. The file's schedule is recorded in
    SOURCE_RECORD, written last.
    """
    path = Path(path)
    with open_single_file(path) as (tensors, metadata):  # refuse early, before hashing gigabytes
        check_sdxl_base(path, list(tensors), metadata)
    digest = file_sha256(path)
    out = Path(out_dir) if out_dir is not None else default_cache_root() / f"{path.stem}-{digest[:16]}"
    if _materialised(out, digest):
        logger.info("%s: using its diffusers copy in %s", path, out)
        return out
    if out.exists():
        raise UserError(
            f"{out}: exists and is not a conversion of {path}; remove it or choose another folder"
        )
    base = load_single_file(path, config_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base.pipeline().save_pretrained(tmp, safe_serialization=True)
    record = {
        "file": path.name,
        "sha256": digest,
        "prediction_type": base.schedule.prediction_type,
        "zero_terminal_snr": base.schedule.zero_terminal_snr,
        "schedule_source": base.schedule.source,
        "borrowed_from_config": list(base.borrowed),
    }
    (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    apply_umask(tmp)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _materialised(out, digest):  # another process did not just finish the same conversion
            raise
    logger.info(
        "%s: %s base (%s); diffusers copy written to %s", path, base.schedule.label, base.schedule.source, out
    )
    return out


def as_diffusers_dir(model: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> str:
    """`model` unchanged when it is a diffusers directory or a Hub id; a single file's materialised copy
    (materialize_as_diffusers_dir, in the default cache) when it is a file."""
    if Path(model).is_file():
        return str(materialize_as_diffusers_dir(model, config_dir))
    return str(model)
