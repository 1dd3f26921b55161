"""The data config: ``--data_config FILE.toml`` — several image sources in one run, each with its own repeats or
sampling weight, caption settings, regularisation flag and buckets.

Our layout is a list of ``[[datasets]]`` tables (one source each) with an optional ``[general]`` table of
defaults. kohya sd-scripts' layout (``[general]`` < ``[[datasets]]`` < ``[[datasets.subsets]]``, one source per
subset) is read too, its spellings mapped to ours (``image_dir``, ``num_repeats``, ``is_reg``,
``shuffle_caption``, ``caption_dropout_rate``, ``caption_tag_dropout_rate``, ``class_tokens``, ...). A JSON file
holding a list is read as SimpleTuner's data-backend file (``id``, ``instance_data_dir``, ``repeats`` = extra
passes, ``is_regularisation_data``, ``caption_strategy``, ``instance_prompt``, ``probability``).

Every mistake is one line naming the file, the table (``datasets[1]``, ``datasets[0].subsets[2]``) and the key,
with the nearest valid key for a typo. Keys of the other trainers that mean nothing here are either noted and
ignored (``enable_bucket``, ``batch_size``) or refused with what to use instead (``flip_aug``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdxl_ztsnr.console import UserError, read_config_file

CaptionFrom = Literal["file", "filename", "instance_prompt"]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class SourceConfig:
    """One source of images: where they are, how often they are seen, how their captions are made.

    ``None`` for a training-time caption setting or a bucket setting means: the command line's value.
    """

    name: str
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    streaming: bool = False
    data_files: tuple[str, ...] | None = None
    # How often per epoch: each row `repeats` times (kohya's num_repeats), or a `weight` share of the epoch.
    repeats: int = 1
    weight: float | None = None
    # Captions as they are stored (changing these re-encodes the source).
    caption_extension: str = ".txt"
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_from: CaptionFrom = "file"
    instance_prompt: str | None = None
    # Captions as training changes them each step (changing these re-encodes nothing).
    keep_tokens: int | None = None
    shuffle_tags: bool | None = None
    tag_dropout: float | None = None
    caption_dropout: float | None = None
    # DreamBooth prior preservation: the loss of these rows is multiplied by prior_loss_weight.
    is_regularisation: bool = False
    prior_loss_weight: float = 1.0
    # Buckets (None: the command line's).
    resolution: int | None = None
    bucket_step: int | None = None
    min_bucket_side: int | None = None
    max_bucket_side: int | None = None
    # Masks (masked loss): passed to the folder source where it accepts them.
    mask_dir: str | None = None
    alpha_mask: bool = False

    @property
    def kind(self) -> Literal["folder", "dataset", "stream"]:
        if self.train_data_dir is not None:
            return "folder"
        return "stream" if self.streaming else "dataset"

    @property
    def loss_weight(self) -> float:
        """What this source's rows multiply into the per-sample loss weight."""
        return self.prior_loss_weight if self.is_regularisation else 1.0

    def encoding_settings(self) -> dict:
        """What the stored rows depend on: a change to any of these re-encodes this source (and only it)."""
        keys = (
            "train_data_dir",
            "dataset_name",
            "dataset_split",
            "image_column",
            "caption_column",
            "streaming",
            "data_files",
            "caption_extension",
            "caption_prefix",
            "caption_suffix",
            "caption_from",
            "instance_prompt",
            "resolution",
            "bucket_step",
            "min_bucket_side",
            "max_bucket_side",
            "mask_dir",
            "alpha_mask",
        )
        values = {key: getattr(self, key) for key in keys}
        values["data_files"] = list(self.data_files) if self.data_files else None
        return values

    def fingerprint(self) -> str:
        text = json.dumps(self.encoding_settings(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["data_files"] = list(self.data_files) if self.data_files else None
        return out


@dataclass(frozen=True)
class DataConfig:
    """The sources of a run, in file order, and the notes to log (keys of other trainers that were ignored)."""

    path: str
    sources: tuple[SourceConfig, ...]
    notes: tuple[str, ...] = ()

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def by_name(self) -> dict[str, SourceConfig]:
        return {source.name: source for source in self.sources}

    @property
    def online_captions(self) -> bool:
        """Some source changes its captions each step: text must be encoded online."""
        return any(s.keep_tokens or s.shuffle_tags or s.tag_dropout for s in self.sources)


# --- the schema ----------------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(SourceConfig)}
_SOURCE_KEYS = set(_FIELDS)  # our spellings
_TYPES = {  # key -> (python types accepted, what the message says)
    "name": ((str,), "a string"),
    "train_data_dir": ((str,), "a folder path (string)"),
    "dataset_name": ((str,), "a string"),
    "dataset_split": ((str,), "a string"),
    "image_column": ((str,), "a string"),
    "caption_column": ((str,), "a string"),
    "streaming": ((bool,), "true or false"),
    "data_files": ((list, str), "a list of file patterns"),
    "repeats": ((int,), "a whole number >= 1"),
    "weight": ((int, float), "a number > 0"),
    "caption_extension": ((str,), 'a string such as ".txt"'),
    "caption_prefix": ((str,), "a string"),
    "caption_suffix": ((str,), "a string"),
    "caption_from": ((str,), '"file", "filename" or "instance_prompt"'),
    "instance_prompt": ((str,), "a string"),
    "keep_tokens": ((int,), "a whole number >= 0"),
    "shuffle_tags": ((bool,), "true or false"),
    "tag_dropout": ((int, float), "a number in [0, 1]"),
    "caption_dropout": ((int, float), "a number in [0, 1]"),
    "is_regularisation": ((bool,), "true or false"),
    "prior_loss_weight": ((int, float), "a number >= 0"),
    "resolution": ((int,), "a whole number (bucket area = resolution²)"),
    "bucket_step": ((int,), "a whole number"),
    "min_bucket_side": ((int,), "a whole number"),
    "max_bucket_side": ((int,), "a whole number"),
    "mask_dir": ((str,), "a folder path (string)"),
    "alpha_mask": ((bool,), "true or false"),
}
# Other spellings of our keys (kohya sd-scripts, SimpleTuner, US English).
_ALIASES = {
    "image_dir": "train_data_dir",
    "data_dir": "train_data_dir",
    "num_repeats": "repeats",
    "is_reg": "is_regularisation",
    "is_regularization": "is_regularisation",
    "shuffle_caption": "shuffle_tags",
    "caption_dropout_rate": "caption_dropout",
    "caption_tag_dropout_rate": "tag_dropout",
    "class_tokens": "instance_prompt",
    "bucket_reso_steps": "bucket_step",
    "min_bucket_reso": "min_bucket_side",
    "max_bucket_reso": "max_bucket_side",
    "probability": "weight",
    "conditioning_data_dir": "mask_dir",  # kohya's masked loss reads its masks from there
}
# kohya keys that change nothing here: noted in the log, then ignored.
_IGNORED = {
    "enable_bucket": "aspect-ratio buckets are always on",
    "batch_size": "the batch size is --train_batch_size (one for all sources)",
    "enable_wildcard": "a caption file's lines are always separate captions, one picked per step",
    "bucket_no_upscale": "images smaller than their bucket are upscaled and counted in the summary",
    "cache_info": "the cache records its sources itself",
}
# kohya keys with no equivalent per source: refused, with what to use instead.
_REFUSED = {
    "flip_aug": "store mirrored copies with precompute_latents.py --random_flip (for every source)",
    "random_crop": "use precompute_latents.py --crop random (for every source)",
    "color_aug": "colour augmentation is not supported (latents are cached)",
    "face_crop_aug_range": "face-crop augmentation is not supported",
    "token_warmup_min": "token warm-up is not supported",
    "token_warmup_step": "token warm-up is not supported",
    "caption_separator": "tags are separated by commas (or lines)",
    "keep_tokens_separator": "use keep_tokens (a number of tags)",
    "secondary_separator": "tags are separated by commas (or lines)",
    "caption_dropout_every_n_epochs": "use caption_dropout (a per-step probability)",
    "metadata_file": "kohya's fine-tuning metadata JSON is not read; use caption files or an HF dataset",
    "network_multiplier": "per-dataset network multipliers are not supported",
}
_SOURCE_ONLY = {"name", "train_data_dir", "dataset_name", "data_files", "instance_prompt", "mask_dir"}
_ALL_SPELLINGS = sorted(_SOURCE_KEYS | set(_ALIASES) | set(_IGNORED))


def _bad(where: str, key: str, message: str) -> UserError:
    return UserError(f"{where}: {key}: {message}")


def _nearest(key: str, spellings: Sequence[str] = _ALL_SPELLINGS) -> str:
    near = difflib.get_close_matches(key, list(spellings), n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else "; see the README's Datasets section for the keys"


def _check_value(where: str, key: str, value: object) -> object:
    """The value of our key ``key`` as the dataclass holds it; a one-line UserError when it cannot be."""
    types, expected = _TYPES[key]
    if isinstance(value, bool) and bool not in types:
        raise _bad(where, key, f"{value!r} is not {expected}")
    if not isinstance(value, types):
        raise _bad(where, key, f"{value!r} is not {expected}")
    if key == "data_files":
        values = [value] if isinstance(value, str) else value
        if not values or not all(isinstance(v, str) for v in values):
            raise _bad(where, key, f"{value!r} is not {expected}")
        return tuple(values)
    if key == "repeats" and value < 1:
        raise _bad(where, key, f"{value} must be at least 1 (each image counts `repeats` times per epoch)")
    if key == "weight" and not (math.isfinite(value) and value > 0):
        raise _bad(where, key, f"{value} must be a number > 0 (the source's share of each epoch)")
    if key in ("tag_dropout", "caption_dropout") and not 0.0 <= value <= 1.0:
        raise _bad(where, key, f"{value} must be in [0, 1]")
    if key in ("keep_tokens",) and value < 0:
        raise _bad(where, key, f"{value} must be >= 0")
    if key == "prior_loss_weight" and not (math.isfinite(value) and value >= 0):
        raise _bad(where, key, f"{value} must be a number >= 0")
    if key in ("resolution", "bucket_step", "min_bucket_side", "max_bucket_side") and value < 8:
        raise _bad(where, key, f"{value} is too small (pixels)")
    if key == "caption_from" and value not in ("file", "filename", "instance_prompt"):
        raise _bad(where, key, f"{value!r} is not {expected}")
    if key == "caption_extension" and not value.startswith("."):
        value = "." + value
    if key in ("tag_dropout", "caption_dropout", "weight", "prior_loss_weight"):
        value = float(value)
    return value


def _resolution(where: str, key: str, value: object) -> int:
    """kohya's resolution: an int, or [width, height]; ours is one side of a square area."""
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise _bad(where, key, f"{value!r} is not a whole number or [width, height]")
        if value[0] != value[1]:
            raise _bad(
                where,
                key,
                f"{value!r}: buckets here take one side (maximum area = side²); give "
                f"{int(math.sqrt(value[0] * value[1])) // 64 * 64} or a square [w, w]",
            )
        value = value[0]
    return _check_value(where, "resolution", value)


def _read_table(where: str, table: Mapping, notes: list[str], allow: set[str] | None = None) -> dict:
    """Our keys and checked values of one table; kohya/SimpleTuner spellings mapped; unknown keys refused."""
    out: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, (dict, list)) and key == "subsets":
            continue  # handled by the caller
        if key in _IGNORED:
            notes.append(f"{where}: {key} ignored: {_IGNORED[key]}")
            continue
        if key in _REFUSED:
            raise _bad(where, key, f"not supported here: {_REFUSED[key]}")
        ours = _ALIASES.get(key, key)
        if ours not in _SOURCE_KEYS or (allow is not None and ours not in allow):
            spellings = _ALL_SPELLINGS if allow is None else sorted(allow)
            raise _bad(where, key, "unknown key" + _nearest(key, spellings))
        if ours in out:
            raise _bad(where, key, f"given twice (also as {ours!r} or one of its spellings)")
        out[ours] = (
            _resolution(where, key, value) if ours == "resolution" else _check_value(where, ours, value)
        )
    return out


def _default_name(values: Mapping) -> str:
    path = values.get("train_data_dir") or values.get("dataset_name") or "source"
    stem = Path(str(path).rstrip("/\\")).name or "source"
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:64] or "source"


def _make_source(where: str, values: dict, path: Path) -> SourceConfig:
    """One source from its merged keys: exactly one place to read from, repeats or weight, consistent captions."""
    places = [k for k in ("train_data_dir", "dataset_name") if values.get(k)]
    if len(places) != 1:
        raise _bad(where, "train_data_dir", "give exactly one of train_data_dir (image_dir) or dataset_name")
    if values.get("train_data_dir"):
        folder = Path(values["train_data_dir"]).expanduser()
        if not folder.is_absolute():
            folder = (
                path.parent / folder
            )  # relative to the config file, as kohya and SimpleTuner users write them
        values["train_data_dir"] = str(folder)
        if values.get("streaming") or values.get("data_files"):
            raise _bad(where, "streaming", "streaming and data_files read a dataset_name, not a folder")
    if values.get("data_files") and not values.get("streaming"):
        raise _bad(where, "data_files", "needs streaming = true (large file sets are read as a stream)")
    if values.get("mask_dir"):
        masks = Path(values["mask_dir"]).expanduser()
        values["mask_dir"] = str(masks if masks.is_absolute() else path.parent / masks)
    if "weight" in values and "repeats" in values and values["repeats"] != 1:
        raise _bad(where, "weight", "give repeats or weight, not both (repeats: N passes; weight: a share)")
    if values.get("caption_from") == "instance_prompt" and not values.get("instance_prompt"):
        raise _bad(
            where, "caption_from", '"instance_prompt" needs instance_prompt = "..." (kohya: class_tokens)'
        )
    if values.get("prior_loss_weight") is not None and "is_regularisation" not in values:
        pass  # a [general] prior_loss_weight applies to the regularisation sources only
    name = values.get("name") or _default_name(values)
    if not NAME_PATTERN.fullmatch(name):
        raise _bad(where, "name", f"{name!r}: use letters, digits, '.', '_' or '-' (at most 64), no '/'")
    values["name"] = name
    return SourceConfig(**values)


def _finish(path: Path, sources: list[tuple[str, SourceConfig]], notes: list[str]) -> DataConfig:
    if not sources:
        raise UserError(f"{path}: no sources: add a [[datasets]] table with train_data_dir or dataset_name")
    table = lambda where: where.removeprefix(f"{path}: ")  # noqa: E731  (the file is named once per message)
    seen: dict[str, str] = {}
    for where, source in sources:
        if source.name in seen:
            other = table(seen[source.name])
            raise _bad(where, "name", f"{source.name!r} is also the name of {other}; names are unique")
        seen[source.name] = where
    weighted = [table(where) for where, s in sources if s.weight is not None]
    if weighted and len(weighted) != len(sources):
        unweighted = next(where for where, s in sources if s.weight is None)
        raise _bad(
            unweighted,
            "weight",
            f"missing: {weighted[0]} gives a weight, so every source needs one (weights are shares of the "
            "epoch; use repeats everywhere instead to count passes)",
        )
    if all(s.is_regularisation for _, s in sources):
        raise _bad(
            sources[0][0], "is_regularisation", "every source is regularisation; add the images to train"
        )
    return DataConfig(str(path), tuple(s for _, s in sources), tuple(notes))


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """The sources of ``path`` (TOML, or JSON: our/kohya layout as an object, SimpleTuner's as a list)."""
    path = Path(path)
    data = read_config_file(path, "--data_config")
    if isinstance(data, list):
        return _simpletuner_config(path, data)
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold [[datasets]] tables")
    notes: list[str] = []
    for key in data:
        if key not in ("general", "datasets"):
            hint = _nearest(key, ["general", "datasets"])
            raise UserError(f"{path}: {key}: unknown table (the file holds [general] and [[datasets]]){hint}")
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise UserError(f"{path}: general: must be a table ([general])")
    general_values = _read_table(f"{path}: [general]", general, notes, _SOURCE_KEYS - _SOURCE_ONLY)
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"{path}: datasets: must be a list of tables ([[datasets]])")
    sources: list[tuple[str, SourceConfig]] = []
    for i, table in enumerate(datasets):
        where = f"{path}: datasets[{i}]"
        subsets = table.get("subsets")
        if subsets is None:
            values = {**general_values, **_read_table(where, table, notes)}
            sources.append((where, _make_source(where, values, path)))
            continue
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise UserError(f"{where}: subsets: must be a list of tables ([[datasets.subsets]])")
        # kohya: the dataset's keys are the defaults of its subsets (and name a single source only).
        shared = _read_table(where, table, notes, _SOURCE_KEYS - _SOURCE_ONLY)
        for j, subset in enumerate(subsets):
            sub_where = f"{where}.subsets[{j}]"
            values = {**general_values, **shared, **_read_table(sub_where, subset, notes)}
            sources.append((sub_where, _make_source(sub_where, values, path)))
    return _finish(path, sources, notes)


# --- SimpleTuner's data-backend JSON ---------------------------------------------------------------------------

_ST_IGNORED = {
    "type": None,  # "local" only; checked below
    "crop": "crops follow --crop",
    "crop_style": "crops follow --crop",
    "crop_aspect": "buckets keep each image's aspect ratio",
    "resolution_type": None,  # checked with resolution
    "minimum_image_size": "use --min_image_side on precompute_latents.py",
    "maximum_image_size": "images are bucketed at the source's resolution",
    "target_downsample_size": "images are bucketed at the source's resolution",
    "cache_dir_vae": "latents live in the one cache of the run",
    "cache_dir": "latents live in the one cache of the run",
    "text_embeds": "text embeddings live in the one cache of the run",
    "image_embeds": "latents live in the one cache of the run",
    "metadata_backend": "image sizes are read during precompute",
    "skip_file_discovery": "the cache records what it holds",
    "vae_cache_clear_each_epoch": "latents are cached once",
    "preserve_data_backend_cache": "the cache records what it holds",
    "hash_filenames": "the cache records source paths",
    "default": None,
    "write_batch_size": None,
    "disable_multiline_split": None,  # checked below
}
_ST_KEYS = {
    "id": "name",
    "instance_data_dir": "train_data_dir",
    "is_regularisation_data": "is_regularisation",
    "is_regularization_data": "is_regularisation",
    "instance_prompt": "instance_prompt",
    "probability": "weight",
    "resolution": "resolution",
}
_ST_ALL = sorted(
    set(_ST_IGNORED)
    | set(_ST_KEYS)
    | {
        "repeats",
        "caption_strategy",
        "dataset_type",
        "disabled",
        "prepend_instance_prompt",
        "only_instance_prompt",
    }
)


def _simpletuner_config(path: Path, backends: list) -> DataConfig:
    """SimpleTuner's multidatabackend.json: image backends become sources; embed caches are skipped."""
    notes: list[str] = []
    sources: list[tuple[str, SourceConfig]] = []
    for i, backend in enumerate(backends):
        where = f"{path}: [{i}]"
        if not isinstance(backend, dict):
            raise UserError(f"{where}: must be an object")
        if backend.get("dataset_type", "image") != "image":
            notes.append(
                f"{where}: dataset_type {backend['dataset_type']!r} skipped (embeddings live in the cache)"
            )
            continue
        if backend.get("disabled"):
            notes.append(f"{where}: disabled, skipped")
            continue
        values: dict[str, object] = {}
        for key, value in backend.items():
            if key in ("dataset_type", "disabled"):
                continue
            if key == "type":
                if value != "local":
                    raise _bad(where, key, f'{value!r}: only local folders map here (type = "local")')
                continue
            if key == "repeats":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise _bad(where, key, f"{value!r} is not a whole number >= 0")
                values["repeats"] = value + 1  # SimpleTuner counts extra passes: 0 = seen once
                continue
            if key == "caption_strategy":
                mapping = {"textfile": "file", "filename": "filename", "instanceprompt": "instance_prompt"}
                if value not in mapping:
                    raise _bad(where, key, f"{value!r}: textfile, filename or instanceprompt map here")
                values["caption_from"] = mapping[value]
                continue
            if key == "only_instance_prompt":
                if value:
                    values["caption_from"] = "instance_prompt"
                continue
            if key == "prepend_instance_prompt":
                if value:
                    values["_prepend"] = True
                continue
            if key == "disable_multiline_split":
                if value:
                    raise _bad(where, key, "every line of a caption file is its own caption here")
                continue
            if key == "resolution":
                if backend.get("resolution_type", "pixel_area") != "pixel_area":
                    raise _bad(
                        where,
                        "resolution_type",
                        f'{backend.get("resolution_type")!r}: use "pixel_area" (our resolution is the side '
                        "of the bucket area, resolution²)",
                    )
                values["resolution"] = _check_value(where, "resolution", value)
                continue
            if key in _ST_KEYS:
                values[_ST_KEYS[key]] = _check_value(where, _ST_KEYS[key], value)
                continue
            if key in _ST_IGNORED:
                if _ST_IGNORED[key]:
                    notes.append(f"{where}: {key} ignored: {_ST_IGNORED[key]}")
                continue
            raise _bad(where, key, "unknown or unsupported key" + _nearest(key, _ST_ALL))
        if values.pop("_prepend", False):
            if not values.get("instance_prompt"):
                raise _bad(where, "prepend_instance_prompt", "needs instance_prompt")
            values["caption_prefix"] = f"{values['instance_prompt']}, "
        values.setdefault("caption_from", "file")
        sources.append((where, _make_source(where, values, path)))
    return _finish(path, sources, notes)
