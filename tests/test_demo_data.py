"""The synthetic demo dataset: real image files, tag captions, shapes, and pixels that match the tags."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_ztsnr.demo_data import DOMINANT_TAG, main, write_demo_dataset


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".png", ".jpg"))


def _tags(image_path: Path) -> list[str]:
    return [t.strip() for t in image_path.with_suffix(".txt").read_text(encoding="utf-8").split(",")]


def _pixels(image_path: Path) -> np.ndarray:
    with Image.open(image_path) as image:
        assert image.mode == "RGB"
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_files_are_readable_images_with_captions(demo_data: Path):
    images = _images(demo_data)
    assert len(images) == 24
    assert {p.suffix for p in images} == {".png", ".jpg"}
    assert len(list(demo_data.glob("*.txt"))) == 24
    for path in images:
        with Image.open(path) as image:
            image.load()
            assert image.format == {".png": "PNG", ".jpg": "JPEG"}[path.suffix]
            assert 96 <= min(image.size) and max(image.size) <= 256
        tags = _tags(path)
        assert len(tags) >= 3 and all(tags)


def test_at_least_three_aspect_ratios(demo_data: Path):
    ratios = set()
    for path in _images(demo_data):
        with Image.open(path) as image:
            width, height = image.size
        ratios.add(round(width / height, 3))
    assert len(ratios) >= 3
    assert any(r > 1 for r in ratios) and any(r < 1 for r in ratios) and 1.0 in ratios


@pytest.mark.parametrize("tag,value", [("solid black", 0), ("solid white", 255), ("solid grey", 128)])
def test_solid_images_have_exact_pixels(demo_data: Path, tag: str, value: int):
    matching = [p for p in _images(demo_data) if tag in _tags(p)]
    assert len(matching) >= 2
    for path in matching:
        pixels = _pixels(path)
        assert (pixels == value).all(), path


def test_texture_tags_describe_pixels(demo_data: Path):
    seen = Counter()
    for path in _images(demo_data):
        tags = _tags(path)
        pixels = _pixels(path).astype(np.float64)
        along_rows, along_columns = pixels.std(axis=1).mean(), pixels.std(axis=0).mean()
        if "horizontal stripes" in tags:
            assert along_rows < 10 < along_columns, path  # each row one colour, rows alternate
        elif "vertical stripes" in tags:
            assert along_columns < 10 < along_rows, path
        elif "checkerboard" in tags:
            assert along_rows > 10 and along_columns > 10, path
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) == 2, path  # lossless, two colours
        elif "noise" in tags:
            assert pixels.std() > 50, path
        else:
            continue
        seen[tags[2]] += 1
    assert set(seen) == {"horizontal stripes", "vertical stripes", "checkerboard", "noise"}


def test_dominant_and_rare_tags(demo_data: Path):
    counts = Counter(tag for path in _images(demo_data) for tag in set(_tags(path)))
    assert counts[DOMINANT_TAG] > 0.75 * 24
    rare = {tag for tag, count in counts.items() if count <= 2}
    assert {"watermark", "sparkles"} <= rare
    assert counts["watermark"] == 2
    for class_like in ("anime style", "outdoor", "indoor"):
        assert counts[class_like] >= 1


def test_deterministic_by_seed(tmp_path: Path):
    first = write_demo_dataset(tmp_path / "a", n=12, seed=3)
    second = write_demo_dataset(tmp_path / "b", n=12, seed=3)
    other = write_demo_dataset(tmp_path / "c", n=12, seed=4)
    assert [p.name for p in first] == [p.name for p in second] == [p.name for p in other]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".txt").read_text() == b.with_suffix(".txt").read_text()
    differing = [a.name for a, c in zip(first, other, strict=True) if a.read_bytes() != c.read_bytes()]
    assert differing  # textures and colours follow the seed
    assert "000_solid_black.png" not in differing  # solids do not


def test_bad_count_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="--n"):
        write_demo_dataset(tmp_path, n=0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--n" in help_text and "--seed" in help_text
    main([str(tmp_path / "cli"), "--n", "5", "--seed", "1"])
    assert len(_images(tmp_path / "cli")) == 5
    assert len(list((tmp_path / "cli").glob("*.txt"))) == 5
