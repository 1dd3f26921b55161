"""Robust image and caption loading: every bad input becomes a BadInputError that the caller skips and
reports, and every odd-but-valid image (CMYK, 16-bit, palette, alpha, EXIF-rotated) comes back as RGB."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})

# PIL's own hard bomb limit (2 × the default Image.MAX_IMAGE_PIXELS): ~13.4k × 13.4k, 537 MB as 8-bit RGB.
# PIL's warning limit (Image.MAX_IMAGE_PIXELS, default 89.5 MP) also applies: load_image treats PIL's
# DecompressionBombWarning as a bad input, so raise Image.MAX_IMAGE_PIXELS too to admit bigger images.
DEFAULT_MAX_PIXELS = 178_956_970

# Formats sniffed from content, whatever the extension says (mis-named JPEGs are common in scraped data).
# "JPEG" also opens multi-picture (MPO) phone/camera JPEGs. EPS & co. are left out: they run Ghostscript.
_ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class BadInputError(Exception):
    """An input file that cannot be used; `path` names it and `reason` says why (and how to fix it)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def find_images(root: str | os.PathLike) -> list[Path]:
    """All files under `root` (recursive) whose extension is in IMAGE_EXTENSIONS, any case; sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Image.open with the empty-file, unreadable, not-an-image and decompression-bomb checks."""
    try:
        if path.stat().st_size == 0:
            raise BadInputError(path, "empty file (0 bytes)")
    except FileNotFoundError:
        raise BadInputError(path, "file not found") from None
    except OSError as e:
        raise BadInputError(path, f"cannot read file: {e}") from None
    try:
        # catch_warnings restores the filters on exit, so the global warning state does not leak.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path, formats=_ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInputError(path, f"decompression bomb guard: {e}") from None
    except UnidentifiedImageError:
        raise BadInputError(
            path, f"not an image PIL can identify (accepted formats: {', '.join(_ALLOWED_FORMATS)})"
        ) from None
    except OSError as e:
        raise BadInputError(path, f"cannot read file: {e}") from None
    except Exception as e:  # malformed headers surface as ValueError, struct.error, ... depending on plugin
        raise BadInputError(path, f"cannot parse image header: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadInputError(
            path,
            f"image is {width}x{height} = {width * height} pixels, over max_pixels={max_pixels} "
            "(decompression bomb guard); downscale it or raise max_pixels",
        )
    if width <= 0 or height <= 0:
        image.close()
        raise BadInputError(path, f"image has an empty size {width}x{height}")
    return image


def image_size_fast(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied) from the header alone, without decoding."""
    path = Path(path)
    with _open_checked(path, max_pixels) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # malformed EXIF: same fallback as load_image (treat as upright)
            orientation = 1
    # Orientations 5-8 rotate by 90 degrees, swapping the sides.
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale (I;16*, or I holding PNG 16-bit data) to 8 bits by value, not by clipping."""
    values = np.asarray(image)
    # PIL's convert("L") clips I;16 at 255, turning everything above 1/256 of full scale white.
    values = np.clip(values.astype(np.int64), 0, 65535)
    eight_bit = ((values * 255 + 32767) // 65535).astype(
        np.uint8
    )  # round(v·255/65535): 65535->255, 32768->128
    return Image.fromarray(eight_bit).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency (alpha or a tRNS/palette key) is composited on white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        return _sixteen_bit_to_rgb(image)
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        # Palette/L/RGB transparency keys become real alpha here (PIL's convert reads info["transparency"]).
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # CMYK (PIL undoes Adobe's inverted CMYK at decode), L, 1, P, YCbCr: PIL's converters are correct.
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully to an RGB image, EXIF orientation applied first; raises BadInputError.

    Truncated files fail (the pixels are decoded here, with PIL's LOAD_TRUNCATED_IMAGES left off) instead
    of loading half gray. `max_pixels` (width × height) guards against decompression bombs before decoding;
    PIL's own Image.MAX_IMAGE_PIXELS warning limit applies too (see DEFAULT_MAX_PIXELS).
    """
    image = decode_image(path, max_pixels)
    try:
        return _to_rgb(image)
    except Exception as e:
        raise BadInputError(path, f"cannot convert mode {image.mode} to RGB: {e}") from None


def load_image_and_alpha(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image as load_image gives it, its alpha as an "L" image or None without transparency) from one
    decode; raises BadInputError. The alpha of a transparency key (palette, tRNS) counts."""
    image = decode_image(path, max_pixels)
    try:
        alpha = None
        if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
            alpha = image.convert("RGBA").getchannel("A")
        return _to_rgb(image), alpha
    except Exception as e:
        raise BadInputError(path, f"cannot convert mode {image.mode} to RGB: {e}") from None


def decode_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully in its own mode, EXIF orientation applied (load_image's checks); raises
    BadInputError."""
    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some libraries flip this global; with it on, truncated files decode to gray and pass silently.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; set it back to False so truncated "
            "images are detected and skipped instead of trained on"
        )
    with _open_checked(path, max_pixels) as image:
        try:
            image.load()
        except Exception as e:  # OSError "image file is truncated", SyntaxError, zlib/struct errors, ...
            raise BadInputError(path, f"cannot decode image (truncated or corrupt): {e}") from None
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:
            # Malformed EXIF is common in scraped data and usually carries no rotation; keep the pixels.
            pass
        return image


def read_caption(image_path: str | os.PathLike, allow_empty: bool = False, extension: str = ".txt") -> str:
    """The caption in `<stem><extension>` (default `.txt`) beside the image, UTF-8 (a BOM is dropped), CRLF/CR as LF, stripped.

    Raises BadInputError (naming the image) for a missing, unreadable, non-UTF-8 or (unless allow_empty)
    empty caption file; undecodable captions are skipped, never stored as mojibake.
    """
    image_path = Path(image_path)
    caption_path = image_path.with_suffix(extension)
    try:
        data = caption_path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(image_path, f"missing caption file {caption_path}") from None
    except OSError as e:
        raise BadInputError(image_path, f"cannot read caption file {caption_path}: {e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInputError(
            image_path,
            f"caption file {caption_path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); re-save it as UTF-8",
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text and not allow_empty:
        raise BadInputError(
            image_path, f"empty caption file {caption_path}; write its tags or allow empty captions"
        )
    return text


def image_from_cell(value, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """RGB image of a dataset image cell ({"bytes", "path"}, bytes or a path); raises BadInputError."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = (value, None) if isinstance(value, bytes) else (None, value)
    if data is None and path:
        return load_image(path, max_pixels=max_pixels)
    if not data:
        raise BadInputError(source, "empty file (0 bytes) or no image in the row")
    with tempfile.NamedTemporaryFile(suffix=".img") as tmp:  # load_image's checks work on files
        tmp.write(data)
        tmp.flush()
        try:
            return load_image(tmp.name, max_pixels=max_pixels)
        except BadInputError as error:
            raise BadInputError(source, error.reason.replace(tmp.name, source)) from None
