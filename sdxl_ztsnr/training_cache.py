"""The cache a UNet training run reads: opened (local, Hub, or a raw folder precomputed first), refused when it
was made for another model, split into training and held-out rows, weighted by tags, with online text encoding
when the captions change each step or the cache holds no embeddings.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from sdxl_ztsnr.base_model import BaseModel
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.data_config import DataConfig, SourceConfig
from sdxl_ztsnr.train_data import (
    SourceCaptions,
    TrainingRows,
    source_epoch_counts,
    split_rows,
    training_tag_frequencies,
    training_tag_weights,
)

if TYPE_CHECKING:
    from sdxl_ztsnr.text_encoder_training import TrainedTextEncoders

logger = logging.getLogger("train_sdxl_ztsnr")

# The cache's loss masks: "auto" uses them where it has some, "require" refuses a cache without, "ignore" trains
# every pixel alike (kohya's --masked_loss is "require"; here masks in the cache count without a flag).
MaskedLoss = Literal["auto", "require", "ignore"]


@dataclass(frozen=True)
class TagWeighting:
    """NAI V3's tag-based loss weights: from a frequency file (or counted over the training rows), class weights
    per tag class (a class map file, heuristics for the rest), clamped to [min_weight, max_weight]."""

    class_weights: Mapping[str, float]
    frequency_path: str | os.PathLike | None = None  # default: the cache's tag_frequencies.json
    dynamic: bool = False
    class_map: str | os.PathLike | None = None
    min_weight: float = 0.1
    max_weight: float = 3.0


@dataclass(frozen=True)
class CaptionSettings:
    """What happens to a caption before it is encoded: dropout to the empty prompt, tag shuffle and dropout."""

    dropout: float = 0.0  # --proportion_empty_prompts
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    online: bool = False  # encode every step (implied by keep_tokens / tag_dropout)


def open_training_rows(
    cache: str | os.PathLike,
    base: BaseModel,
    device: torch.device,
    captions: CaptionSettings,
    tag_weighting: TagWeighting | None,
    resolution: int | None = None,
    validation_rows: int = 16,
    seed: int = 0,
    normalize_latents: bool = False,
    num_workers: int = 0,
    masked_loss: MaskedLoss = "auto",
    trained_text: TrainedTextEncoders | None = None,
    data_config: DataConfig | None = None,
) -> TrainingRows:
    """The cache as TrainingRows; ``resolution`` (when given) must be the cache's, its VAE and text encoders
    the base's. Tag weights have mean 1 over the training rows (all 1 with ``tag_weighting`` None). Batches
    carry a ``loss_mask`` where their rows have masks, unless ``masked_loss`` is "ignore".

    ``trained_text`` (--train_text_encoder): its encoders encode the captions, inside each step; the cache must
    hold captions (its embeddings, if any, go unused).

    A cache of several sources samples each source as ``data_config`` says (or, without one, as the config it
    was made from recorded): repeats or weights, regularisation rows' loss × prior_loss_weight, per-source
    caption changes (which need online text encoding: ``captions.online``)."""
    from sdxl_ztsnr.cache import load_cache, load_pad_chunk, model_identity, open_cache
    from sdxl_ztsnr.precompute import load_vae
    from sdxl_ztsnr.tags import load_tag_classes, load_tag_frequencies, scale_tag_weights, tag_factors
    from sdxl_ztsnr.text_encoding import encode_prompts, load_text_encoders

    vae = load_vae(base.path, vae_name_or_path=base.vae_path)
    dataset, metadata, cache_dir = open_cache(cache)
    cached_text = not metadata["settings"]["text_online"]
    text_online = captions.online or not cached_text
    training_text = trained_text is not None and trained_text.trains
    if training_text and not has_captions(dataset):
        raise UserError(
            f"--train_text_encoder: the cache {cache} holds no captions to encode (its rows have no tags); "
            "precompute it again from captioned images (name.txt beside each image, or --caption_column), or "
            "train without --train_text_encoder"
        )
    if training_text:
        tokenizers, encoders = trained_text.tokenizers, trained_text.encoders
    elif cached_text or text_online:
        tokenizers, encoders = load_text_encoders(base.path)
    else:
        tokenizers, encoders = None, None
    # What the cache depends on must be this model: same VAE, same text encoders (when embeddings are cached).
    expected = model_identity(vae, encoders if cached_text else None)
    if not cached_text:
        expected = {k: v for k, v in expected.items() if not k.startswith("text_encoder")}
    if resolution is not None:
        expected["resolution"] = resolution  # a cache made at another resolution is refused, by name
    dataset, metadata = load_cache(cache_dir, expected)
    del vae
    dataset = _masks_as_asked(dataset, metadata, masked_loss, cache)
    if text_online and not captions.online:
        logger.info("the cache holds no text embeddings: encoding captions every step (--text_online)")

    train_ids, validation_ids = split_rows(dataset.with_format("arrow")["source"], validation_rows, seed)
    weights = torch.ones(len(dataset))
    if tag_weighting is not None:
        if tag_weighting.dynamic:
            frequencies = training_tag_frequencies(dataset, train_ids)
        else:
            frequencies = load_tag_frequencies(
                tag_weighting.frequency_path or cache_dir / "tag_frequencies.json"
            )
        tag_classes = load_tag_classes(tag_weighting.class_map) if tag_weighting.class_map else None
        factor = tag_factors(frequencies, dict(tag_weighting.class_weights), tag_classes)
        raw = training_tag_weights(dataset, train_ids, factor)
        weights[torch.from_numpy(train_ids)] = scale_tag_weights(
            raw, tag_weighting.min_weight, tag_weighting.max_weight
        )

    sources = _source_rows(metadata, len(dataset), data_config, captions)
    if sources is not None:  # regularisation rows: × their prior loss weight
        loss = torch.tensor([c.loss_weight for c in sources["configs"]], dtype=torch.float32)
        weights = weights * loss[torch.from_numpy(sources["row_source"].astype(np.int64))]

    encode = encode_in_step = None
    if training_text:
        max_chunks = metadata["settings"]["max_token_chunks"]
        encode = functools.partial(trained_text.encode, max_chunks=max_chunks)
        encode_in_step = functools.partial(trained_text.encode_in_step, max_chunks=max_chunks)
    elif text_online:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        encoders = [e.to(device, dtype) for e in encoders]
        max_chunks = metadata["settings"]["max_token_chunks"]

        def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return encode_prompts(prompts, tokenizers, encoders, max_chunks)

    mean = std = None
    if normalize_latents:
        mean, std = torch.tensor(metadata["latents_mean"]), torch.tensor(metadata["latents_std"])
    rows = TrainingRows(
        dataset,
        metadata,
        train_ids,
        validation_ids,
        weights,
        load_pad_chunk(cache_dir),
        mean,
        std,
        captions.dropout,
        encode,
        captions.keep_tokens,
        captions.tag_dropout,
        num_workers,
        encode_in_step,
    )
    if sources is not None:
        rows.row_source, rows.source_names = sources["row_source"], sources["names"]
        rows.source_captions = sources["captions"]
        counts = rows.source_row_counts()
        weighted = any(c.weight is not None for c in sources["configs"])
        rows.epoch_counts = source_epoch_counts(
            counts,
            [c.repeats for c in sources["configs"]],
            [c.weight for c in sources["configs"]] if weighted else None,
        )
        for name, config, n, k in zip(
            rows.source_names, sources["configs"], counts, rows.epoch_counts, strict=True
        ):
            role = (
                f", regularisation (loss × {config.prior_loss_weight:g})" if config.is_regularisation else ""
            )
            logger.info("source %s: %d training rows, %d samples per epoch%s", name, n, k, role)
    return rows


def _source_rows(metadata: dict, num_rows: int, data_config: DataConfig | None, captions: CaptionSettings):
    """Each row's source and each source's config (from ``data_config``, else as the cache recorded them) and
    caption rule; None for a single-source cache."""
    from sdxl_ztsnr.source_cache import row_sources

    if not metadata.get("sources"):
        if data_config is not None:
            raise UserError(
                "--data_config with a cache made from one source: precompute it with --data_config (or drop it)"
            )
        return None
    names, row_source = row_sources(metadata, num_rows)
    if data_config is None:
        recorded = [
            SourceConfig(
                **{
                    **e["config"],
                    "data_files": e["config"].get("data_files") and tuple(e["config"]["data_files"]),
                }
            )
            for e in metadata["sources"]
        ]
        configs = recorded
    else:
        by_name = data_config.by_name()
        missing = [n for n in names if n not in by_name]
        extra = [n for n in by_name if n not in names]
        if missing or extra:
            raise UserError(
                f"--data_config {data_config.path}: its sources ({', '.join(by_name)}) are not the cache's "
                f"({', '.join(names)}); precompute the cache with this config first"
            )
        configs = [by_name[n] for n in names]
        for entry, config in zip(metadata["sources"], configs, strict=True):
            if entry.get("fingerprint") not in (None, config.fingerprint()):
                recorded = entry["config"]
                changed = [k for k, v in config.encoding_settings().items() if recorded.get(k) != v]
                raise UserError(
                    f"--data_config {data_config.path}: source {config.name!r} changed since the cache was made "
                    f"({', '.join(changed) or 'its encoding settings'}); rerun precompute_latents.py with this "
                    "config (only that source is re-encoded)"
                )
    rules = [
        SourceCaptions(
            keep_tokens=captions.keep_tokens if c.keep_tokens is None else c.keep_tokens,
            shuffle=True if c.shuffle_tags is None else c.shuffle_tags,
            tag_dropout=captions.tag_dropout if c.tag_dropout is None else c.tag_dropout,
            caption_dropout=captions.dropout if c.caption_dropout is None else c.caption_dropout,
        )
        for c in configs
    ]
    return {"names": names, "row_source": row_source, "configs": configs, "captions": rules}


def _masks_as_asked(dataset, metadata: dict, masked_loss: MaskedLoss, where: str | os.PathLike):
    """The cache's dataset with its mask column, or without it (so no batch reads or carries one); ``where``
    names the cache in the error."""
    masked = metadata["counts"].get("masked", 0) if "mask" in dataset.column_names else 0
    if masked_loss == "require" and not masked:
        raise UserError(
            f"--masked_loss: the cache {where} holds no masks; precompute it from a folder with masks "
            "(name.mask.png beside the images, --mask_dir or --alpha_mask)"
        )
    if masked and masked_loss != "ignore":
        logger.info(
            "masked loss: %d of %d rows have a mask (the others weigh 1 everywhere)", masked, len(dataset)
        )
        return dataset
    if masked:
        logger.info("--no_masked_loss: the cache's masks (%d rows) are not used", masked)
    return dataset.remove_columns("mask") if "mask" in dataset.column_names else dataset


def has_captions(dataset) -> bool:
    """Whether any row of the cache has a caption (tags) that online encoding can read."""
    import pyarrow.compute as pc

    if "tags" not in dataset.column_names:
        return False
    column = dataset.with_format("arrow")["tags"]
    return len(column) > 0 and (pc.max(pc.list_value_length(column)).as_py() or 0) > 0


def cache_path(precomputed_dir: str | None, output_dir: str | os.PathLike) -> Path | str:
    """Where the run's cache is: --precomputed_dir, or OUTPUT_DIR/cache for a raw --train_data_dir."""
    return precomputed_dir if precomputed_dir else Path(output_dir) / "cache"
