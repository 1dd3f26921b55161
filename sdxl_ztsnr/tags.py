"""Tags: caption parsing, dataset tag frequencies, tag classes, NAI-style tag-based loss weights and
tag shuffle/dropout for online text encoding."""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sdxl_ztsnr.console import UserError

DEFAULT_CLASS_WEIGHTS: dict[str, float] = {
    "character": 1.5,
    "style": 1.2,
    "quality": 0.8,
    "setting": 1.0,
    "action": 1.1,
    "object": 0.9,
}
TAG_CLASSES = tuple(DEFAULT_CLASS_WEIGHTS)


def parse_tags(caption: str) -> list[str]:
    """Comma- (or newline-) separated tags, stripped, inner whitespace collapsed, empties dropped; order and
    case kept. A BOM or CR anywhere is removed."""
    caption = caption.replace("\ufeff", "").replace("\r", "")
    tags = (" ".join(part.split()) for part in re.split(r"[,\n]", caption))
    return [tag for tag in tags if tag]


def tag_frequencies(tag_lists: Iterable[Sequence[str]]) -> dict[str, int]:
    """Number of samples each tag appears in (a tag repeated within one caption counts once), keys sorted."""
    counts: Counter[str] = Counter()
    for tags in tag_lists:
        counts.update(set(tags))
    return dict(sorted(counts.items()))


def save_tag_frequencies(path: str | os.PathLike, freqs: Mapping[str, int]) -> None:
    """Write {tag: count} as UTF-8 JSON with sorted keys (tag_frequencies.json)."""
    text = json.dumps(dict(freqs), ensure_ascii=False, indent=2, sort_keys=True)
    Path(path).write_text(text + "\n", encoding="utf-8")


def load_tag_frequencies(path: str | os.PathLike) -> dict[str, int]:
    """Read a {tag: count} JSON file written by save_tag_frequencies; raises ValueError naming the file."""
    data = _read_json(path, "tag frequency file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: tag frequency file must hold a JSON object {{tag: count}}")
    for tag, count in data.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UserError(f"{path}: count of tag {tag!r} must be a non-negative integer, got {count!r}")
    return dict(sorted(data.items()))


def _read_json(path: str | os.PathLike, what: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: {what} is not valid UTF-8 JSON: {e}") from None


def _normalise_tag(tag: str) -> str:
    """Lower case, danbooru underscores as spaces, whitespace collapsed: the form heuristics and maps use."""
    return " ".join(tag.replace("_", " ").lower().split())


def load_tag_classes(path: str | os.PathLike) -> dict[str, str]:
    """Read a tag->class JSON map ({"1girl": "character", ...}, or {"character": ["1girl", ...]}); keys are
    normalised (lower case, underscores as spaces); raises ValueError naming the file and the bad entry."""
    data = _read_json(path, "tag class map")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: tag class map must be a JSON object {{tag: class}}")
    if data and all(isinstance(v, list) for v in data.values()):
        data = {tag: cls for cls, tags in data.items() for tag in tags}  # {class: [tags]} form
    classes: dict[str, str] = {}
    for tag, cls in data.items():
        if not isinstance(tag, str) or not isinstance(cls, str) or cls not in TAG_CLASSES:
            raise ValueError(
                f"{path}: tag {tag!r} has class {cls!r}; classes must be one of {', '.join(TAG_CLASSES)}"
            )
        classes[_normalise_tag(tag)] = cls
    return classes


_QUALITY_TAGS = frozenset(
    {
        "masterpiece",
        "absurdres",
        "highres",
        "lowres",
        "incredibly absurdres",
        "very aesthetic",
        "aesthetic",
        "displeasing",
        "very displeasing",
        "jpeg artifacts",
        "bad anatomy",
        "bad hands",
    }
)
_STYLE_TAGS = frozenset(
    {
        "sketch",
        "lineart",
        "monochrome",
        "greyscale",
        "grayscale",
        "realistic",
        "photorealistic",
        "pixel art",
        "oil painting",
        "watercolor",
        "traditional media",
        "flat color",
        "cel shading",
        "anime coloring",
    }
)
_CHARACTER_TAGS = frozenset({"solo", "solo focus", "multiple girls", "multiple boys", "multiple others"})
_CHARACTER_COUNT = re.compile(r"^\d+\+?(girl|boy|other)s?$")  # 1girl, 2girls, 6+boys, 1other
# Danbooru disambiguation suffixes that are not a series ("bow (weapon)" is an object, not a character).
_NON_SERIES_QUALIFIERS = frozenset(
    {
        "medium",
        "object",
        "weapon",
        "food",
        "animal",
        "plant",
        "flower",
        "clothing",
        "meme",
        "instrument",
        "style",
    }
)
_QUALIFIED_NAME = re.compile(r"^.+ \(([^()]+)\)$")  # "hatsune miku (vocaloid)"
_SETTING_WORDS = frozenset(
    {
        "outdoors",
        "outdoor",
        "indoors",
        "indoor",
        "background",
        "sky",
        "night",
        "day",
        "city",
        "cityscape",
        "forest",
        "beach",
        "room",
        "bedroom",
        "classroom",
        "kitchen",
        "bathroom",
        "office",
        "street",
        "ocean",
        "sea",
        "lake",
        "river",
        "mountain",
        "mountains",
        "field",
        "park",
        "garden",
        "sunset",
        "sunrise",
        "evening",
        "morning",
        "scenery",
        "landscape",
        "interior",
        "desert",
        "underwater",
        "space",
        "shrine",
        "temple",
        "castle",
        "cafe",
        "library",
        "school",
    }
)
_ACTION_TAGS = frozenset(
    {
        "arms up",
        "arms behind back",
        "hand on hip",
        "hands on hips",
        "crossed arms",
        "crossed legs",
        "head tilt",
        "peace sign",
        "v",
        "thumbs up",
        "salute",
        "hug",
        "kiss",
        "selfie",
        "outstretched arm",
        "outstretched arms",
    }
)
# Words ending in "ing" that are things, not actions.
_ING_NOUNS = frozenset(
    {
        "building",
        "ceiling",
        "clothing",
        "earring",
        "evening",
        "morning",
        "wedding",
        "pudding",
        "painting",
        "drawing",
        "stocking",
        "string",
        "thing",
        "nothing",
        "something",
        "sling",
        "spring",
        "swing",
        "lighting",
        "bedding",
        "railing",
        "ending",
        "awning",
        "icing",
        "frosting",
        "dumpling",
        "sibling",
        "duckling",
        "seedling",
        "viking",
    }
)


def _heuristic_class(tag: str) -> str:
    """Class of a normalised tag; checked in order quality, style, character, action (leading verb), setting."""
    words = tag.split(" ")
    if tag in _QUALITY_TAGS or tag.endswith(" quality") or tag.startswith(("score ", "score:", "quality:")):
        return "quality"
    if (
        tag in _STYLE_TAGS
        or tag.endswith((" style", " (medium)"))
        or tag.startswith(("style:", "by ", "artist:"))
    ):
        return "style"
    if tag in _CHARACTER_TAGS or _CHARACTER_COUNT.match(tag) or tag.startswith("character:"):
        return "character"
    qualified = _QUALIFIED_NAME.match(tag)
    if qualified and qualified.group(1) not in _NON_SERIES_QUALIFIERS:
        return "character"
    first = words[0]
    if tag in _ACTION_TAGS or (len(first) > 4 and first.endswith("ing") and first not in _ING_NOUNS):
        return "action"
    if words[-1] in _SETTING_WORDS or tag.endswith("background"):
        return "setting"
    last = words[-1]
    if len(last) > 4 and last.endswith("ing") and last not in _ING_NOUNS:
        return "action"  # "girl sitting"
    return "object"


def tag_class(tag: str, tag_classes: Mapping[str, str] | None = None) -> str | None:
    """The class of `tag` (one of TAG_CLASSES): the explicit map first (exact, then normalised key), else
    heuristics; None only for an empty tag."""
    normalised = _normalise_tag(tag)
    if not normalised:
        return None
    if tag_classes:
        explicit = tag_classes.get(tag) or tag_classes.get(normalised)
        if explicit is not None:
            return explicit
    return _heuristic_class(normalised)


def _scale_into_bounds(weights: torch.Tensor, min_weight: float, max_weight: float) -> torch.Tensor:
    """clip(c·w, min, max) with c chosen so the mean is 1: the fixed point of clamp-then-renormalise.

    mean(clip(c·w)) rises monotonically from min_weight (c→0) to max_weight (c→∞) for w > 0, so bisection on
    log c converges whenever min_weight <= 1 <= max_weight. Computed in float64 for a tight mean.
    """
    w = weights.double()
    # At c = e^lo every c·w is below min_weight (mean <= 1); at c = e^hi every one is above max_weight.
    lo = math.log(max(min_weight, 1e-12) / w.max().item()) - 1.0
    hi = math.log(max_weight / w.min().item()) + 1.0
    for _ in range(200):  # ~50 halvings reach float64 precision; the cap only guards the loop
        if hi - lo <= 1e-13:
            break
        mid = 0.5 * (lo + hi)
        if (w * math.exp(mid)).clamp(min_weight, max_weight).mean().item() < 1.0:
            lo = mid
        else:
            hi = mid
    return (w * math.exp(0.5 * (lo + hi))).clamp(min_weight, max_weight)


def tag_factors(
    frequencies: Mapping[str, int],
    class_weights: Mapping[str, float] = DEFAULT_CLASS_WEIGHTS,
    tag_classes: Mapping[str, str] | None = None,
    alpha: float = 0.5,
) -> Callable[[str], float]:
    """f(t) = (m / n_t) ** alpha * class_weights[tag_class(t)], n_t the tag's count (at least 1), m the median count.

    The per-tag factor of NAI's tag-based loss weighting (see tag_loss_weights); cached per tag.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    for cls in TAG_CLASSES:
        weight = class_weights.get(cls)
        if weight is None or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"class weight for {cls!r} must be a positive number, got {weight!r}")
    counts = [count for count in frequencies.values() if count > 0]
    median = float(statistics.median(counts)) if counts else 1.0
    cache: dict[str, float] = {}

    def factor(tag: str) -> float:
        if tag not in cache:
            count = max(frequencies.get(tag, 0), 1)  # a tag missing from the table counts as seen once
            cls = tag_class(tag, tag_classes) or "object"
            if cls not in class_weights:
                raise ValueError(f"tag {tag!r} has class {cls!r}, which has no class weight")
            cache[tag] = (median / count) ** alpha * class_weights[cls]
        return cache[tag]

    return factor


def scale_tag_weights(raw: np.ndarray, min_weight: float = 0.1, max_weight: float = 3.0) -> torch.Tensor:
    """Raw per-sample weights → clip(c · raw, min, max) with mean 1, as a (N,) float32 tensor."""
    if not min_weight <= 1.0 <= max_weight or min_weight < 0:
        raise ValueError(
            f"need 0 <= min_weight <= 1 <= max_weight for weights with mean 1, got min_weight={min_weight}, "
            f"max_weight={max_weight} (--min_tag_weight / --max_tag_weight)"
        )
    if not len(raw):
        return torch.ones(0, dtype=torch.float32)
    return _scale_into_bounds(
        torch.from_numpy(np.asarray(raw, dtype=np.float64)), min_weight, max_weight
    ).float()


def tag_loss_weights(
    tag_lists: Iterable[Sequence[str]],
    frequencies: Mapping[str, int],
    class_weights: Mapping[str, float] = DEFAULT_CLASS_WEIGHTS,
    tag_classes: Mapping[str, str] | None = None,
    min_weight: float = 0.1,
    max_weight: float = 3.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Per-sample loss weights that attenuate overrepresented concepts (NAI V3, arXiv:2409.15997, section on
    tag-based loss weighting).

    For tag t with dataset count n_t (samples containing t; at least 1) and median count m over `frequencies`:
        f_t = (m / n_t) ** alpha * class_weights[tag_class(t)]
    A sample's raw weight is the mean of f_t over its distinct tags (1.0 when it has none). Weights are then
    w_i = clip(c · raw_i, min_weight, max_weight) with the scale c chosen so mean(w) = 1 (the limit of
    repeated clamp-and-renormalise). Returns a (N,) float32 tensor. (sdxl_ztsnr.train_data computes the same
    from the cache's arrow column without a Python string per tag.)
    """
    scale_tag_weights(np.zeros(0), min_weight, max_weight)  # check the bounds before any work
    factor = tag_factors(frequencies, class_weights, tag_classes, alpha)

    def raw_weight(tags: Sequence[str]) -> float:
        distinct = list(dict.fromkeys(tags))
        return sum(factor(t) for t in distinct) / len(distinct) if distinct else 1.0

    # One float64 per row (an iterator of tag lists is consumed once).
    raw = np.fromiter((raw_weight(tags) for tags in tag_lists), dtype=np.float64)
    return scale_tag_weights(raw, min_weight, max_weight)


def shuffle_and_drop_tags(
    tags: Sequence[str], keep_tokens: int = 0, dropout: float = 0.0, rng: random.Random | None = None
) -> list[str]:
    """The first `keep_tokens` tags in place, the rest shuffled and each dropped with probability `dropout`
    (kohya's --keep_tokens / caption tag dropout); `rng` is required so results are reproducible."""
    if rng is None:
        raise ValueError("shuffle_and_drop_tags needs rng=random.Random(seed) for reproducible captions")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"tag dropout must be in [0, 1], got {dropout} (--tag_dropout)")
    kept, rest = list(tags[:keep_tokens]), list(tags[keep_tokens:])
    rng.shuffle(rest)
    return kept + [tag for tag in rest if rng.random() >= dropout]
