"""Packages only some runs need, imported when a flag asks for them, with a one-line error when missing.

bitsandbytes is the one that matters at start-up: diffusers and peft import it whenever it is installed, and
its import looks up a CPU kernel on the Hugging Face Hub (through the ``kernels`` package) and logs about it —
on every run of every script, offline or online, 8-bit or not. ``defer_bitsandbytes()`` (called when this
package is imported) hides it from them until ``import_bitsandbytes()`` is asked for by ``--optimizer
adamw8bit``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from types import ModuleType

from sdxl_ztsnr.console import UserError

# Python's own mechanism to block an import: a None entry in sys.modules makes `import x` raise ImportError and
# `importlib.util.find_spec(x)` return None, which is how diffusers, transformers and peft ask "is it installed?".
_BLOCKED = None
_DEFERRED = "bitsandbytes"
# The log line bitsandbytes' import makes (on AVX512-BF16 CPUs) when its optional 4-bit CPU kernel is not
# loaded, which 8-bit AdamW does not use (logger name, message prefix).
_KERNEL_LOOKUP_LOGS = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),)


def installed(distribution: str) -> bool:
    """Whether a package is installed, asked of its metadata (find_spec says no for a deferred one)."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def defer_bitsandbytes() -> bool:
    """Hide bitsandbytes from the libraries until import_bitsandbytes(); False where it was already imported."""
    if _DEFERRED in sys.modules:
        return sys.modules[_DEFERRED] is _BLOCKED
    sys.modules[_DEFERRED] = _BLOCKED
    return True


class _DropPrefixes(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def import_bitsandbytes(flag: str = "--optimizer adamw8bit") -> ModuleType:
    """bitsandbytes, imported without its Hub lookup for a 4-bit CPU kernel; a UserError naming ``flag`` if missing."""
    if sys.modules.get(_DEFERRED, _BLOCKED) is not _BLOCKED:
        return sys.modules[_DEFERRED]
    sys.modules.pop(_DEFERRED, None)
    # transformers may have imported `kernels` already; blocked for the moment of the import, bitsandbytes
    # skips the kernel (its import catches the ImportError): no download, no trust check, nothing logged.
    saved_kernels = sys.modules.get("kernels", _BLOCKED)
    sys.modules["kernels"] = _BLOCKED
    filters = [(logging.getLogger(name), _DropPrefixes(prefix)) for name, prefix in _KERNEL_LOOKUP_LOGS]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)
    try:
        return importlib.import_module(_DEFERRED)
    except ImportError as error:
        sys.modules[_DEFERRED] = _BLOCKED
        raise UserError(
            f"{flag} needs bitsandbytes, which is not installed: pip install bitsandbytes"
        ) from error
    finally:
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)
        if saved_kernels is _BLOCKED:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved_kernels
