import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from sdxl_ztsnr.images import (
    IMAGE_EXTENSIONS,
    BadInputError,
    _to_rgb,
    find_images,
    image_size_fast,
    load_image,
    read_caption,
)


def noise_image(width=64, height=48, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_bad_input_error_fields():
    error = BadInputError("a/b.png", "broken")
    assert (error.path, error.reason, str(error)) == ("a/b.png", "broken", "a/b.png: broken")


def test_find_images_recursive_sorted_case_insensitive(tmp_path):
    (tmp_path / "sub dir é").mkdir()
    names = [
        "b.png",
        "A.JPG",
        "c.Jpeg",
        "sub dir é/d.webp",
        "sub dir é/猫 1.PNG",
        "e.txt",
        "f.gif",
        "g.jpg.txt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    found = find_images(tmp_path)
    assert found == sorted(found)
    assert {p.relative_to(tmp_path).as_posix() for p in found} == {
        "b.png",
        "A.JPG",
        "c.Jpeg",
        "sub dir é/d.webp",
        "sub dir é/猫 1.PNG",
    }
    assert ".png" in IMAGE_EXTENSIONS
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


def test_loads_uppercase_extension_and_unicode_space_path(tmp_path):
    folder = tmp_path / "données d'entrée ✓"
    folder.mkdir()
    path = folder / "my image 画像.JPG"
    noise_image(40, 30).save(path, format="JPEG")
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (40, 30))
    assert find_images(tmp_path) == [path]


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadInputError, match="empty file"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_truncated_jpeg_is_rejected_not_gray(tmp_path):
    full = tmp_path / "full.jpg"
    noise_image(128, 128).save(full, quality=95)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    assert load_image(full).size == (128, 128)
    with pytest.raises(BadInputError, match="truncated"):
        load_image(truncated)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_rejected(tmp_path):
    full = tmp_path / "full.png"
    noise_image(128, 128).save(full)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError):
        load_image(truncated)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(BadInputError, match="not an image"):
        load_image(path)


def test_decompression_bomb_by_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    assert load_image(path, max_pixels=20_000).size == (200, 100)
    with pytest.raises(BadInputError, match="max_pixels"):
        load_image(path, max_pixels=19_999)


def test_decompression_bomb_by_png_header(tmp_path):
    # A 200-byte PNG whose header claims 100000 x 100000 pixels (10 GP): must fail before decoding.
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
    data += png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        with pytest.raises(BadInputError, match="decompression bomb"):
            load_image(path)
        with pytest.raises(BadInputError, match="decompression bomb"):
            image_size_fast(path)


def test_pil_bomb_warning_becomes_bad_input(tmp_path, monkeypatch):
    path = tmp_path / "warn.png"
    Image.new("RGB", (100, 100)).save(path)
    # Over PIL's warning limit (5000 px) but under its error limit (10000) and under our max_pixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    filters_before = list(warnings.filters)
    with pytest.raises(BadInputError, match="decompression bomb"):
        load_image(path)
    assert warnings.filters == filters_before  # the warning filter change did not leak


def test_cmyk_jpeg_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((16, 16))
    assert red > 240 and green < 15 and blue < 15


def test_sixteen_bit_grayscale_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128,) * 3, (255,) * 3]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_modes_in_memory(mode):
    # Older Pillow opens 16-bit PNGs as "I", newer as "I;16"; big-endian I;16B comes from other decoders.
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    raw = {"I;16": values.astype("<u2"), "I;16B": values.astype(">u2"), "I": values.astype("<i4")}[mode]
    image = Image.frombytes(mode, (3, 1), raw.tobytes())
    converted = _to_rgb(image)
    assert converted.mode == "RGB"
    assert [converted.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128,) * 3, (255,) * 3]


def test_palette_png_with_transparency_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([200, 0, 0, 0, 0, 200] + [0] * (254 * 3))
    image.putpixel((0, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)  # palette index 1 is fully transparent
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((2, 2)) == (200, 0, 0)


def test_rgba_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    path = tmp_path / "rgba.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((3, 3)) == (10, 20, 30)
    assert all(126 <= c <= 128 for c in loaded.getpixel((1, 0)))  # half black over white


@pytest.mark.parametrize("mode,colour,expected", [("L", 77, (77, 77, 77)), ("LA", (77, 0), (255, 255, 255))])
def test_grayscale_modes(tmp_path, mode, colour, expected):
    path = tmp_path / f"{mode}.png"
    Image.new(mode, (5, 5), colour).save(path)
    loaded = load_image(path)
    assert (loaded.mode, loaded.getpixel((2, 2))) == ("RGB", expected)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 10))  # left half blue
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (10, 20)
    assert image_size_fast(path) == (20, 10)  # (height, width) as displayed
    top = loaded.getpixel((5, 2))
    assert top[2] > 200 and top[0] < 60  # the left (blue) half is now on top


def test_image_size_fast_plain(tmp_path):
    path = tmp_path / "plain.webp"
    noise_image(33, 17).save(path)
    assert image_size_fast(path) == (17, 33)
    assert load_image(path).size == (33, 17)


def test_truncated_flag_on_fails_loudly(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    noise_image(8, 8).save(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(path)


def write_caption(tmp_path, data: bytes):
    image = tmp_path / "pic.png"
    (tmp_path / "pic.txt").write_bytes(data)
    return image


def test_caption_plain_bom_crlf(tmp_path):
    assert read_caption(write_caption(tmp_path, b"1girl, solo\n")) == "1girl, solo"
    assert read_caption(write_caption(tmp_path, "\ufeffcafé, 猫".encode())) == "café, 猫"
    assert read_caption(write_caption(tmp_path, b"a, b\r\nc\r\n")) == "a, b\nc"


def test_caption_not_utf8(tmp_path):
    with pytest.raises(BadInputError, match="not valid UTF-8") as info:
        read_caption(write_caption(tmp_path, b"\xff\xfe\xfa"))
    assert info.value.path.endswith("pic.png")
    assert "pic.txt" in info.value.reason


def test_caption_missing(tmp_path):
    image = tmp_path / "alone.jpg"
    with pytest.raises(BadInputError, match="missing caption file") as info:
        read_caption(image)
    assert str(tmp_path / "alone.txt") in info.value.reason


def test_caption_empty(tmp_path):
    image = write_caption(tmp_path, b" \r\n\t ")
    with pytest.raises(BadInputError, match="empty caption"):
        read_caption(image)
    assert read_caption(image, allow_empty=True) == ""


def test_caption_beside_multi_dot_name(tmp_path):
    (tmp_path / "a.v2.txt").write_text("x, y", encoding="utf-8")
    assert read_caption(tmp_path / "a.v2.PNG") == "x, y"
