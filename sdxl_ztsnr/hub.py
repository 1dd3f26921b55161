"""Publish an output folder (pipeline, single file, model card) or a latent cache to the Hugging Face Hub."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS as HUB_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

# Training leftovers that do not belong in a published repo: accelerate checkpoints (optimizer state is
# 2-3x the weights), unfinished `.tmp` saves, tracker logs, the latent cache a raw-folder run builds in
# OUTPUT_DIR/cache (arrow shards, skipped.jsonl with local paths) and the run's bookkeeping. Patterns match
# paths relative to the folder; a trailing "/" means "everything below".
DEFAULT_IGNORE_PATTERNS = (
    "cache/",
    "vae_finetune/",
    "outputs.json",
    "checkpoint-*",
    "*/checkpoint-*",
    "checkpoints/",
    "logs/",
    "*/logs/",
    "wandb/",
    "*.tmp/",
    "__pycache__/",
    ".cache/",
    ".git/",
)


class HubUploadError(RuntimeError):
    """Pushing to the Hub failed (offline, not logged in, no permission); the message says how to fix it."""


def files_to_upload(
    folder: str | Path, ignore_patterns: tuple[str, ...] | list[str] = DEFAULT_IGNORE_PATTERNS
) -> list[str]:
    """Relative POSIX paths under `folder` that an upload would send, filtered as upload_folder filters them.

    upload_folder adds the hub's own ignore list (`.git`, `.cache/huggingface`) to ours; so does this listing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"push_to_hub: {folder} is not a directory; pass the output folder to upload."
        )
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=[*ignore_patterns, *HUB_IGNORE_PATTERNS]))


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not talk to the Hub": HTTP status errors, offline mode, transport errors."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    errors: list[type[BaseException]] = [HfHubHTTPError, LocalTokenNotFoundError, OSError]
    # The HTTP client under huggingface_hub differs between releases; catch whichever is installed.
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _login_hint(repo_id: str, repo_type: str, reason: str) -> str:
    return (
        f"push_to_hub: could not push to the {repo_type} repo '{repo_id}': {reason}\n"
        "Check that you are online (unset HF_HUB_OFFLINE) and logged in with write access: run "
        "`huggingface-cli login` (or `hf auth login`), set HF_TOKEN, or pass --hub_token."
    )


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    repo_type: Literal["model", "dataset"] = "model",
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SDXL ZTSNR fine-tune",
    dry_run: bool = False,
    ignore_patterns: tuple[str, ...] | list[str] = DEFAULT_IGNORE_PATTERNS,
) -> list[str]:
    """Create the repo if needed and upload `folder` (huggingface_hub create_repo + upload_folder).

    Returns the uploaded paths; with `dry_run=True` returns them without touching the network.
    The token is never logged or put in an error message.
    """
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"push_to_hub: repo_type must be 'model' or 'dataset', got {repo_type!r}.")
    files = files_to_upload(folder, ignore_patterns)
    if not files:
        raise ValueError(
            f"push_to_hub: nothing to upload in {folder} (all files matched {list(ignore_patterns)})."
        )
    if dry_run:
        return files

    from huggingface_hub import HfApi, get_token

    if token is None and get_token() is None:
        raise HubUploadError(_login_hint(repo_id, repo_type, "no Hugging Face token found."))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type=repo_type,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns),
        )
    except _hub_errors() as error:
        reason = f"{type(error).__name__}: {error}"
        if token:
            reason = reason.replace(token, "<token>")
        raise HubUploadError(_login_hint(repo_id, repo_type, reason)) from None
    return files
