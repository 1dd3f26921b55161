"""What a person sees in the terminal: library noise silenced, user errors as one line, bugs with tracebacks.

Every script ends with

    if __name__ == "__main__":
        run_script(main, parse_args)

Library code raises `UserError` for problems the user can fix (a missing path, a model that cannot be loaded,
an empty data folder, a cache made with other settings); `run_script` prints those as one `error: ...` line
and exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

# argparse exits with 2 for a bad command line; a bad path or model is the same kind of mistake.
USER_ERROR_EXIT_CODE = 2
# 128 + SIGINT, what shells report for Ctrl-C.
INTERRUPTED_EXIT_CODE = 130

# Log records known to be harmless here, by emitting logger and message (regex, searched). Nothing else is hidden.
HARMLESS_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # ModelMixin.to(dtype) warns even when no module needs to stay in fp32 (the list it prints is empty).
    "diffusers.models.modeling_utils": (r"^There are modules in \w+ that should be kept in float32: \[\]",),
    # Only on AVX512-BF16 CPUs: bitsandbytes' optional 4-bit CPU GEMM from the `kernels` package, which
    # 8-bit Adam (the only bitsandbytes feature used here) does not need.
    "bitsandbytes.backends.cpu.ops": (r"^Failed to load CPU gemm_4bit_forward from kernels-community",),
    # transformers' rename of `torch_dtype` to `dtype` (the weights load the same either way).
    "transformers.modeling_utils": (r"^`torch_dtype` is deprecated",),
    "transformers.configuration_utils": (r"^`torch_dtype` is deprecated",),
}
# Python warnings known to be harmless here: (category, message regex matched at the start).
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # diffusers' rename of `torch_dtype` to `dtype`.
    (FutureWarning, r"`torch_dtype` is deprecated"),
    # diffusers still passes this retired argument to huggingface_hub on every Hub lookup.
    (UserWarning, r"The `local_dir_use_symlinks` argument is deprecated"),
)


class UserError(ValueError):
    """A problem the user can fix (a path, a model, the data, a cache); the message names it and the fix.

    Scripts print it as one line without a traceback (see run_script). A ValueError, so code that already
    catches ValueError for bad inputs keeps working.
    """


class _DropMessages(logging.Filter):
    """Drops records whose formatted message matches one of `patterns`; lets every other record through."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def _hub_progress_states() -> dict | None:
    """huggingface_hub's progress-bar switches (global and per group), or None where the layout differs."""
    try:  # the module: `huggingface_hub.utils.tqdm` as an attribute is the tqdm class it defines
        hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    except ImportError:
        return None
    states = getattr(hub_tqdm, "progress_bar_states", None)
    return states if isinstance(states, dict) else None


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library progress bars and the known-harmless messages above while loading, validating, exporting.

    diffusers' "Loading pipeline components", transformers' "Loading weights" / "Writing model shards" and
    datasets' bars are switched off; Hub download bars stay (a first download takes minutes and should show).
    Our own tqdm bars are untouched. Everything is restored on exit.
    """
    import datasets
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    hub_states = _hub_progress_states()
    saved_hub = dict(hub_states) if hub_states is not None else None
    saved = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
        datasets.are_progress_bars_disabled(),
    )

    def restore_hub() -> None:
        # transformers' switch also turns off huggingface_hub's bars globally; put those back as they were.
        if hub_states is not None:
            hub_states.clear()
            hub_states.update(saved_hub)

    filters = {name: _DropMessages(patterns) for name, patterns in HARMLESS_LOG_MESSAGES.items()}
    for name, log_filter in filters.items():
        logging.getLogger(name).addFilter(log_filter)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    restore_hub()
    if not saved[2]:
        datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            for category, message in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for name, log_filter in filters.items():
            logging.getLogger(name).removeFilter(log_filter)
        if saved[0]:
            diffusers_logging.enable_progress_bar()
        if saved[1]:
            transformers_logging.enable_progress_bar()
        restore_hub()
        if not saved[2]:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------------------------
# Models that cannot be loaded: diffusers and transformers raise OSError (EnvironmentError) with a message that
# often blames a file ("does not appear to have a file named config.json") when the id is wrong or the machine
# is offline. Say which of those it is, and the fix.

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXAMPLE_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def _first_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0].rstrip(".") if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def model_load_message(name_or_path: str, error: BaseException, component: str | None = None) -> str:
    """One line for a model that failed to load: which model, why (missing folder, offline, wrong id), the fix."""
    part = f" ({component})" if component else ""
    reason = _first_line(error)
    if Path(name_or_path).expanduser().exists():
        return (
            f"cannot load the model in {name_or_path}{part}: {reason}. It must be a diffusers SDXL pipeline "
            "folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, "
            "scheduler/)"
        )
    if not _HUB_ID.match(name_or_path):
        return (
            f"model {name_or_path!r}: no such folder, and it is not a Hugging Face Hub id (owner/name). "
            f"Pass a diffusers SDXL pipeline folder or a Hub id such as {_EXAMPLE_ID}"
        )
    if _hub_offline():
        return (
            f"model {name_or_path!r}{part} is not a local folder nor in the local Hugging Face cache, and this "
            f"machine is offline (HF_HUB_OFFLINE=1). If it is a folder, check the path; if it is a Hub id, check "
            f"its spelling, or download it where there is a network (`hf download {name_or_path}`)"
        )
    return (
        f"model {name_or_path!r}{part} could not be loaded from the Hugging Face Hub: {reason}. Check the id's "
        "spelling and the network; a gated or private model needs `hf auth login` (or HF_TOKEN)"
    )


@contextmanager
def loading_model(name_or_path: str | os.PathLike, component: str | None = None) -> Iterator[None]:
    """Turn the OSError a diffusers/transformers `from_pretrained` raises into a UserError that says why."""
    try:
        yield
    except OSError as error:
        raise UserError(model_load_message(str(name_or_path), error, component)) from error


def dataset_load_message(name: str, error: BaseException, flag: str = "--dataset_name") -> str:
    """One line for a dataset that failed to load: a missing folder, a Hub id offline or not found, the fix."""
    reason = _first_line(error)
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if Path(name).expanduser().exists():
        return (
            f"{flag} {name}: cannot be read as a dataset ({reason}); pass a datasets save_to_disk folder, "
            "a folder of data files (parquet, csv, json, images) or a Hub dataset id"
        )
    if looks_local or not _HUB_ID.match(name):
        return (
            f"{flag} {name}: no such folder, and it is not a Hugging Face Hub dataset id (owner/name) either"
        )
    if _hub_offline():
        return (
            f"{flag} {name}: not a local folder nor in the local datasets cache, and this machine is offline "
            f"(HF_HUB_OFFLINE=1); check the spelling, or download it where there is a network "
            f"(`hf download --repo-type dataset {name}`)"
        )
    return (
        f"{flag} {name}: could not be loaded from the Hugging Face Hub ({reason}); check the id and the "
        "network; a gated or private dataset needs `hf auth login` (or HF_TOKEN)"
    )


@contextmanager
def loading_dataset(name: str, flag: str = "--dataset_name") -> Iterator[None]:
    """Turn what `datasets.load_dataset` raises for a missing or unreachable dataset into a UserError."""
    try:
        yield
    except (OSError, ConnectionError) as error:  # FileNotFoundError and datasets' not-found errors among them
        raise UserError(dataset_load_message(name, error, flag)) from error


def make_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """``mkdir -p`` for an output folder; a UserError naming ``flag`` when a file or a permission is in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(
            f"{flag} {path}: a file is in the way (it, or a folder above it); pass a folder"
        ) from None
    except PermissionError as error:
        raise UserError(
            f"{flag} {path}: cannot be created ({error.strerror}); pass a folder you can write to"
        ) from None
    return path


# ---------------------------------------------------------------------------------------------------------------
# Script entry point.


def read_config_file(path: Path, flag: str) -> object:
    """A TOML file (JSON when it ends in .json) as Python data; a missing, unreadable or malformed file is one
    line naming ``flag`` and the file."""
    import json
    import tomllib

    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{flag} {path}: cannot be read ({error})") from None
    is_json = path.suffix.lower() == ".json"
    try:
        return json.loads(text) if is_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"{flag} {path}: not valid {'JSON' if is_json else 'TOML'} ({error})") from None


def one_line(message: str) -> str:
    """A multi-line message on one line: `head:` joins its list with spaces, other lines are joined by '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    out = ""
    for line in lines:
        out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def _rank_prefix() -> str:
    """'[rank N] ' under a multi-process launch (each rank reports its own error), '' otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def run_script(
    main: Callable[..., object],
    parse_args: Callable[[], object],
    quiet: bool = True,
) -> None:
    """Run `main(parse_args())` as a command: UserError -> one `error:` line on stderr and exit status 2,
    Ctrl-C -> exit status 130, any other exception -> its traceback (a bug). `quiet` wraps the run in
    quiet_libraries(). Returns normally (status 0) when main does."""
    try:
        args = parse_args()
        with quiet_libraries() if quiet else nullcontext():
            main(args)
    except UserError as error:
        print(f"{_rank_prefix()}error: {one_line(str(error))}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
