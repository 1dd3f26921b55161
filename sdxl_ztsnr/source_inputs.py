"""A data-config source as precompute's input: the folder, dataset or stream it names, with its own captions.
A streamed source names its rows the same way (`NamedStreamingInputs`) and takes its captions as they are.

`ConfiguredInputs` wraps a FolderInputs/DatasetInputs: every row's source becomes ``"<name>/<path>"`` (one image
identity across sources, the source readable from the row), captions come from the caption file (any extension;
kohya's class_tokens when it is missing), the file name, or the instance prompt, with the source's prefix and
suffix on every line; several lines are several captions (``caption_lines``, see inputs.prepare_input).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from PIL import Image

from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.data_config import SourceConfig
from sdxl_ztsnr.images import BadInputError, load_image, read_caption
from sdxl_ztsnr.inputs import DatasetInputs, FolderInputs
from sdxl_ztsnr.streaming_inputs import StreamingInputs


def filename_caption(path: Path) -> str:
    """SimpleTuner's "filename" strategy: the file's stem, underscores as spaces."""
    return " ".join(path.stem.replace("_", " ").split())


# Every source of a data config has the cache's mask column (empty where it has no masks), so the sources'
# caches have the same columns and merge into one.
NO_MASKS = {"masks": {"mask_files": 0, "mask_fingerprint": None, "alpha_mask": False}}


class NamedStreamingInputs(StreamingInputs):
    """A streamed source of a data config: rows named ``"<name>/<tar>/<key>"`` like the other sources' rows."""

    source_name = ""

    def mask_settings(self) -> dict:
        return NO_MASKS

    def source(self, example: dict, rank: int, position: int) -> str:
        return f"{self.source_name}/{super().source(example, rank, position)}"

    def describe(self) -> dict:
        return {**super().describe(), "source_name": self.source_name}


class ConfiguredInputs:
    """A folder or HF dataset source with the caption settings of its data-config table."""

    caption_lines = True

    def __init__(self, inner: FolderInputs | DatasetInputs, config: SourceConfig):
        self.inner, self.config = inner, config
        self.kind = inner.kind
        c = config
        # The folder source reads <stem>.txt itself (and whatever the mask support adds beside it): use it as is
        # whenever the captions are plain caption files.
        self._delegate = c.caption_from == "file" and c.caption_extension == ".txt" and not c.instance_prompt

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("inner", "config", "_delegate"):  # (unpickling: not set yet)
            raise AttributeError(name)
        return getattr(self.inner, name)  # e.g. what a mask-aware folder source offers

    def __len__(self) -> int:
        return len(self.inner)

    def source(self, index: int) -> str:
        return f"{self.config.name}/{self.inner.source(index)}"

    def describe(self) -> dict:
        return {**self.inner.describe(), "source_name": self.config.name}

    def _decorate(self, caption: str) -> str:
        prefix, suffix = self.config.caption_prefix, self.config.caption_suffix
        if not (prefix or suffix):
            return caption
        lines = [line for line in caption.split("\n") if line.strip()] or [""]
        return "\n".join(f"{prefix}{line}{suffix}" for line in lines)

    def mask_settings(self) -> dict:
        """The folder source's mask settings (what its rows' masks depend on), or those of no masks."""
        inner = getattr(self.inner, "mask_settings", None)
        return (inner() if inner is not None else {}) or NO_MASKS

    def _folder_caption(self, path: Path, allow_empty: bool) -> str:
        c = self.config
        if c.caption_from == "filename":
            return filename_caption(path)
        if c.caption_from == "instance_prompt":
            return c.instance_prompt
        try:
            return read_caption(path, allow_empty=allow_empty, extension=c.caption_extension)
        except BadInputError:
            if not c.instance_prompt:
                raise
            return c.instance_prompt  # kohya's DreamBooth subsets: class_tokens where no caption file is

    def load(self, index: int, max_pixels: int, allow_empty: bool) -> tuple[Image.Image, str, str]:
        """(RGB image, caption, path for messages); raises BadInputError (a skipped input, never a crash)."""
        c = self.config
        if self.inner.kind != "folder":
            lenient = allow_empty or c.caption_from != "file"
            image, caption, where = self.inner.load(index, max_pixels, lenient)
            if c.caption_from == "instance_prompt":
                caption = c.instance_prompt
            return image, self._decorate(caption), where
        if self._delegate:
            image, caption, where = self.inner.load(index, max_pixels, allow_empty)
            return image, self._decorate(caption), where
        path = self.inner.paths[index]
        caption = self._folder_caption(path, allow_empty)
        return load_image(path, max_pixels=max_pixels), self._decorate(caption), str(path)

    def load_masked(
        self, index: int, max_pixels: int, allow_empty: bool
    ) -> tuple[Image.Image, Image.Image | None, str, str]:
        """``load`` with the image's loss mask (or None), as FolderInputs.load_masked."""
        if self.inner.kind != "folder" or not hasattr(self.inner, "load_masked"):
            image, caption, where = self.load(index, max_pixels, allow_empty)
            return image, None, caption, where
        if self._delegate:
            image, mask, caption, where = self.inner.load_masked(index, max_pixels, allow_empty)
            return image, mask, self._decorate(caption), where
        from sdxl_ztsnr.masks import load_image_and_mask

        path = self.inner.paths[index]
        caption = self._folder_caption(path, allow_empty)  # first: cheap
        image, mask = load_image_and_mask(
            path, self.inner.masks.get(index), self.inner.alpha_mask, max_pixels
        )
        return image, mask, self._decorate(caption), str(path)


def open_source(config: SourceConfig, where: str = ""):
    """The precompute input of one source: folder and dataset sources wrapped, streams as they are."""
    where = f"{where}: source {config.name!r}" if where else f"source {config.name!r}"
    try:
        return _open_source(config, where)
    except UserError as error:
        message = str(error)
        raise UserError(message if message.startswith(where) else f"{where}: {message}") from None


def _open_source(config: SourceConfig, where: str):
    if config.kind == "stream":
        if config.caption_from != "file" or config.caption_prefix or config.caption_suffix:
            raise UserError(
                f"{where}: caption_from/caption_prefix/caption_suffix are not supported for a streamed source; "
                "write the captions into the stream"
            )
        stream = NamedStreamingInputs(
            config.dataset_name,
            list(config.data_files) if config.data_files else None,
            config.image_column,
            config.caption_column,
            config.dataset_split,
        )
        stream.source_name = config.name
        return stream
    if config.kind == "folder":
        extra = {}
        accepted = inspect.signature(FolderInputs.__init__).parameters
        for key in ("mask_dir", "alpha_mask"):
            value = getattr(config, key)
            if value and key not in accepted:
                raise UserError(f"{where}: {key}: masked loss is not available in this version yet")
            if key in accepted:
                extra[key] = value
        inner = FolderInputs(config.train_data_dir, **extra)
    else:
        if config.caption_from == "filename":
            raise UserError(f'{where}: caption_from = "filename" needs a folder (train_data_dir)')
        inner = DatasetInputs(
            config.dataset_name, config.image_column, config.caption_column, config.dataset_split
        )
    return ConfiguredInputs(inner, config)
