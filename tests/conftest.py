"""Session fixtures shared by the test suite: a tiny SDXL pipeline and a demo dataset, each built once."""

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network: everything they load is built locally. Set before any test module
# imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# CI machines are small and shared; more threads only add contention for these toy models.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a random-weight tiny SDXL pipeline (diffusers format), seed 0."""
    from sdxl_ztsnr.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of 24 synthetic images with tag captions (name.png/.jpg + name.txt), seed 0."""
    from sdxl_ztsnr.demo_data import write_demo_dataset

    out_dir = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(out_dir, n=24, seed=0)
    return out_dir
