"""Session fixtures shared by the test suite: a tiny SDXL pipeline and a demo dataset, each built once."""

import os
from pathlib import Path

# Set before torch starts OpenMP: on a small shared machine spinning OpenMP threads make toy models many times
# slower (they wait actively for each other); passive waiting costs nothing measurable here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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


# The trainer's options every end-to-end test shares; a test's own options come after them and can override.
TRAINER_COMMON = [
    "--train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--checkpointing_steps", "2",
    "--validation_steps", "0", "--dataloader_num_workers", "0", "--report_to", "tensorboard", "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="session")
def trainer_args():
    """Parsed train_sdxl_ztsnr.py arguments for a model and output dir; extra options override the common ones."""
    import train_sdxl_ztsnr

    def make(model, output_dir, *extra: str):
        return train_sdxl_ztsnr.parse_args(
            [
                "--pretrained_model_name_or_path",
                str(model),
                "--output_dir",
                str(output_dir),
                *TRAINER_COMMON,
                *extra,
            ]
        )

    return make


@pytest.fixture(scope="session")
def train_cache(tiny_sdxl, demo_data, tmp_path_factory) -> Path:
    """The demo data precomputed for the tiny model at 128² (buckets of 32 px steps), as the trainer reads it."""
    import precompute_latents

    out = tmp_path_factory.mktemp("train-cache") / "cache"
    precompute_latents.main(
        precompute_latents.parse_args(
            [
                "--train_data_dir",
                str(demo_data),
                "--pretrained_model_name_or_path",
                str(tiny_sdxl),
                "--output_dir",
                str(out),
                "--resolution",
                "128",
                "--bucket_step",
                "32",
                "--no_progress",
            ]
        )  # fmt: skip
    )
    return out


@pytest.fixture
def fresh_accelerate_state():
    """Each main() builds its own Accelerator, as a new process would; accelerate's state is a singleton."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
