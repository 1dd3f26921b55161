import json
import random

import pytest
import torch

from sdxl_ztsnr.tags import (
    DEFAULT_CLASS_WEIGHTS,
    load_tag_classes,
    load_tag_frequencies,
    parse_tags,
    save_tag_frequencies,
    shuffle_and_drop_tags,
    tag_class,
    tag_frequencies,
    tag_loss_weights,
)


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("1girl, solo, outdoors", ["1girl", "solo", "outdoors"]),
        ("  1girl ,,  solo ,  ", ["1girl", "solo"]),
        ("\ufeff1girl,\r\nsolo\r\n", ["1girl", "solo"]),
        ("Long   Hair,\tBlue  eyes", ["Long Hair", "Blue eyes"]),
        ("a\nb, c", ["a", "b", "c"]),
        ("hatsune miku (vocaloid), 猫, café", ["hatsune miku (vocaloid)", "猫", "café"]),
        ("", []),
        (" , ,\n", []),
    ],
)
def test_parse_tags(caption, expected):
    assert parse_tags(caption) == expected


def test_tag_frequencies_count_samples():
    freqs = tag_frequencies([["a", "b", "a"], ["a"], ["c"], []])
    assert freqs == {"a": 2, "b": 1, "c": 1}
    assert list(freqs) == sorted(freqs)


def test_save_load_frequencies_roundtrip(tmp_path):
    path = tmp_path / "tag_frequencies.json"
    save_tag_frequencies(path, {"zeta": 2, "猫": 5, "alpha": 1})
    text = path.read_text(encoding="utf-8")
    assert "猫" in text  # stored as UTF-8, not \\u escapes
    assert text.index('"alpha"') < text.index('"zeta"') < text.index('"猫"')
    assert load_tag_frequencies(path) == {"alpha": 1, "zeta": 2, "猫": 5}


def test_load_frequencies_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": -1}')
    with pytest.raises(ValueError, match="bad.json"):
        load_tag_frequencies(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_tag_frequencies(broken)
    with pytest.raises(ValueError, match="missing.json"):
        load_tag_frequencies(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "tag,expected",
    [
        ("masterpiece", "quality"),
        ("best quality", "quality"),
        ("worst_quality", "quality"),
        ("absurdres", "quality"),
        ("score_9", "quality"),
        ("anime style", "style"),
        ("style:ghibli", "style"),
        ("by wlop", "style"),
        ("artist:foo", "style"),
        ("watercolor (medium)", "style"),
        ("1girl", "character"),
        ("2girls", "character"),
        ("1boy", "character"),
        ("solo", "character"),
        ("multiple girls", "character"),
        ("hatsune miku (vocaloid)", "character"),
        ("character:asuka", "character"),
        ("outdoors", "setting"),
        ("indoor", "setting"),
        ("white background", "setting"),
        ("night sky", "setting"),
        ("forest", "setting"),
        ("beach", "setting"),
        ("standing", "action"),
        ("sitting", "action"),
        ("looking at viewer", "action"),
        ("holding sword", "action"),
        ("arms up", "action"),
        ("red dress", "object"),
        ("earring", "object"),
        ("building", "object"),
        ("bow (weapon)", "object"),
        ("long hair", "object"),
    ],
)
def test_tag_class_heuristics(tag, expected):
    assert tag_class(tag, None) == expected


def test_tag_class_explicit_map_first(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"Long_Hair": "character", "standing": "object"}))
    classes = load_tag_classes(path)
    assert tag_class("long hair", classes) == "character"
    assert tag_class("long_hair", classes) == "character"
    assert tag_class("standing", classes) == "object"
    assert tag_class("sitting", classes) == "action"  # not in the map: heuristics
    assert tag_class("  ", classes) is None


def test_tag_class_map_grouped_form_and_errors(tmp_path):
    grouped = tmp_path / "grouped.json"
    grouped.write_text(json.dumps({"style": ["sketchy lines"], "setting": ["moon"]}))
    assert load_tag_classes(grouped) == {"sketchy lines": "style", "moon": "setting"}
    bad = tmp_path / "bad_classes.json"
    bad.write_text(json.dumps({"1girl": "person"}))
    with pytest.raises(ValueError, match="bad_classes.json.*person"):
        load_tag_classes(bad)


def dominant_dataset(seed: int, n: int = 200):
    rng = random.Random(seed)
    vocab = [f"tag{i}" for i in range(40)] + ["1girl", "anime style", "masterpiece", "outdoors", "sitting"]
    lists = []
    for _ in range(n):
        tags = ["dominant"] if rng.random() < 0.9 else []
        tags += rng.sample(vocab, rng.randint(0, 4))
        lists.append(tags)
    return lists


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bounds", [(0.1, 3.0), (0.5, 1.5), (0.9, 1.05), (0.0, 10.0)])
def test_weights_mean_one_within_clamps(seed, bounds):
    min_w, max_w = bounds
    lists = dominant_dataset(seed)
    weights = tag_loss_weights(lists, tag_frequencies(lists), min_weight=min_w, max_weight=max_w)
    assert weights.dtype == torch.float32 and weights.shape == (len(lists),)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert weights.min().item() >= min_w - 1e-6
    assert weights.max().item() <= max_w + 1e-6
    assert weights.std().item() > 0.01  # not trivially all ones


def test_clamps_bind_on_skewed_data():
    # One unique-tag sample among many identical ones: unclamped it would far exceed max_weight.
    lists = [["common"]] * 99 + [["unique"]]
    freqs = tag_frequencies(lists)
    weights = tag_loss_weights(lists, freqs, min_weight=0.5, max_weight=2.0, alpha=1.0)
    assert weights[-1].item() == pytest.approx(2.0, abs=1e-6)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(weights[:-1], weights[0].expand(99))


def test_rare_tag_sample_outweighs_dominant_only():
    lists = dominant_dataset(0)
    lists += [["dominant"], ["rare thing"]]
    weights = tag_loss_weights(lists, tag_frequencies(lists))
    assert weights[-1] > weights[-2]


def test_class_weight_order_for_equal_frequency():
    lists = [["1girl"], ["masterpiece"], ["outdoors"], ["red dress"]]
    weights = tag_loss_weights(lists, tag_frequencies(lists))
    character, quality, setting, obj = weights.tolist()
    assert character > setting > obj > quality
    assert character / quality == pytest.approx(
        DEFAULT_CLASS_WEIGHTS["character"] / DEFAULT_CLASS_WEIGHTS["quality"]
    )


def test_untagged_sample_and_empty_dataset():
    lists = [["a"], ["a"], []]
    weights = tag_loss_weights(
        lists, tag_frequencies(lists), alpha=0.0, class_weights={**DEFAULT_CLASS_WEIGHTS, "object": 1.0}
    )
    assert torch.allclose(weights, torch.ones(3))  # raw weight 1.0 for all, including the untagged sample
    assert tag_loss_weights([], {}).shape == (0,)


@pytest.mark.parametrize("bounds", [(1.1, 3.0), (0.1, 0.9), (2.0, 1.0), (-0.1, 2.0)])
def test_infeasible_clamps_raise(bounds):
    with pytest.raises(ValueError, match="min_weight"):
        tag_loss_weights([["a"]], {"a": 1}, min_weight=bounds[0], max_weight=bounds[1])


def test_bad_class_weights_raise():
    with pytest.raises(ValueError, match="character"):
        tag_loss_weights([["a"]], {"a": 1}, class_weights={**DEFAULT_CLASS_WEIGHTS, "character": 0.0})


def test_shuffle_keeps_first_tokens_and_is_deterministic():
    tags = [f"t{i}" for i in range(12)]
    out = shuffle_and_drop_tags(tags, keep_tokens=3, dropout=0.0, rng=random.Random(7))
    assert out[:3] == tags[:3]
    assert sorted(out) == sorted(tags)
    assert out != tags  # shuffled (fixed seed; a no-op shuffle of 9 tags has probability 1/9!)
    again = shuffle_and_drop_tags(tags, keep_tokens=3, dropout=0.0, rng=random.Random(7))
    assert out == again


def test_dropout_drops_only_the_rest():
    tags = [f"t{i}" for i in range(200)]
    out = shuffle_and_drop_tags(tags, 2, 0.5, random.Random(0))
    assert out[:2] == ["t0", "t1"]
    assert 40 < len(out) - 2 < 160
    assert set(out) <= set(tags)
    assert shuffle_and_drop_tags(tags, 5, 1.0, random.Random(0)) == tags[:5]
    assert shuffle_and_drop_tags(tags, 500, 1.0, random.Random(0)) == tags
    assert out == shuffle_and_drop_tags(tags, 2, 0.5, random.Random(0))


def test_shuffle_argument_errors():
    with pytest.raises(ValueError, match="rng"):
        shuffle_and_drop_tags(["a"])
    with pytest.raises(ValueError, match="dropout"):
        shuffle_and_drop_tags(["a"], dropout=1.5, rng=random.Random(0))
