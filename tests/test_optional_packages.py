"""Packages imported only when a flag asks: bitsandbytes stays unloaded (and quiet) until 8-bit AdamW."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdxl_ztsnr import optional_packages
from sdxl_ztsnr.console import UserError

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True
    )


@pytest.mark.skipif(not optional_packages.installed("bitsandbytes"), reason="bitsandbytes is not installed")
def test_bitsandbytes_is_imported_only_for_8bit_adamw_and_silently():
    done = _python(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO)  # every library record would reach stderr
        import torch
        import sdxl_ztsnr.sampling, sdxl_ztsnr.lora  # diffusers' models and peft, as every script loads them
        from diffusers import UNet2DConditionModel
        from peft import LoraConfig, inject_adapter_in_model
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(4, 4)))
        print("before", sys.modules.get("bitsandbytes") is None)
        from sdxl_ztsnr.optimizers import build_optimizer
        optimizer = build_optimizer([torch.nn.Parameter(torch.ones(4096))], name="adamw8bit", learning_rate=1e-3)
        print("after", type(optimizer).__name__, sys.modules["bitsandbytes"] is not None)
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["before", "True", "after", "AdamW8bit", "True"]
    assert done.stderr == ""  # no Hub kernel lookup, no trust check, no fallback warning


def test_a_missing_bitsandbytes_is_one_line_naming_the_flag(monkeypatch):
    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(optional_packages.importlib, "import_module", not_installed)
    with pytest.raises(UserError, match="--optimizer adamw8bit needs bitsandbytes.*pip install bitsandbytes"):
        optional_packages.import_bitsandbytes()
    assert sys.modules["bitsandbytes"] is None  # still deferred: nothing half-imported is left behind


def test_installed_asks_the_metadata_not_the_import_system():
    assert optional_packages.installed("torch")
    assert not optional_packages.installed("no-such-package-here")
