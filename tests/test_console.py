"""A console a person can read: library noise silenced, user errors as one line, bugs keep their traceback."""

import contextlib
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sdxl_ztsnr import console
from sdxl_ztsnr.console import (
    INTERRUPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    UserError,
    loading_model,
    one_line,
    quiet_libraries,
    run_script,
)

REPO = Path(__file__).resolve().parents[1]
HUB_LIKE_ID = "someone/no-such-sdxl-model"  # owner/name shaped, in no local cache; the tests run offline


# --- run_script ---------------------------------------------------------------------------------------------


def _raise(error: BaseException):
    def main(args):
        raise error

    return main


def test_user_error_is_one_line_with_status_2(capsys):
    message = (
        "cache made with different settings:\n  resolution: cache has 128, expected 256\npass --overwrite"
    )
    with pytest.raises(SystemExit) as exit_info:
        run_script(_raise(UserError(message)), lambda: None, quiet=False)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert (
        err
        == "error: cache made with different settings: resolution: cache has 128, expected 256; pass --overwrite\n"
    )


def test_interrupt_exits_130_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(_raise(KeyboardInterrupt()), lambda: None, quiet=False)
    assert exit_info.value.code == INTERRUPTED_EXIT_CODE
    # Anything that is not a UserError is a bug: it propagates (Python prints the traceback).
    with pytest.raises(ZeroDivisionError):
        run_script(_raise(ZeroDivisionError("bug")), lambda: None, quiet=False)
    seen = []
    assert run_script(seen.append, lambda: "parsed", quiet=False) is None and seen == ["parsed"]


def test_one_line_joins_headed_lists_and_sentences():
    assert one_line("a:\n  x\n  y\nfix it") == "a: x; y; fix it"
    assert one_line("single") == "single"


# --- models that cannot be loaded ---------------------------------------------------------------------------


def test_loading_model_names_the_model_and_the_fix(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from huggingface_hub import constants

    # A folder that exists but holds no model: diffusers' own OSError, reworded.
    with pytest.raises(
        UserError, match=r"cannot load the model in .*\(vae\).*diffusers SDXL pipeline folder"
    ):
        with loading_model(tmp_path, "vae"):
            AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    # Not a folder and not owner/name: no Hub lookup can help.
    with pytest.raises(UserError, match=r"no such folder, and it is not a Hugging Face Hub id"):
        with loading_model("./models/missing"):
            AutoencoderKL.from_pretrained("./models/missing", subfolder="vae")
    # owner/name while offline: diffusers blames a missing config.json; we say offline or misspelt.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"offline \(HF_HUB_OFFLINE=1\).*hf download " + HUB_LIKE_ID) as info:
        with loading_model(HUB_LIKE_ID, "vae"):
            AutoencoderKL.from_pretrained(HUB_LIKE_ID, subfolder="vae")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    message = console.model_load_message(HUB_LIKE_ID, OSError("401 Client Error\nmore"), "unet")
    assert "could not be loaded from the Hugging Face Hub: 401 Client Error." in message
    assert "hf auth login" in message


# --- quiet_libraries: each known noise source reproduced, then silenced -------------------------------------


def test_library_noise_is_silenced_and_the_rest_kept(tiny_sdxl, capfd, caplog):
    """Loading a pipeline as validation does reproduces the bars and warnings of a demo run; inside
    quiet_libraries() only an unrelated warning remains, and everything is switched back on afterwards."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    def load(quiet: bool) -> list[str]:
        """Python warnings raised while loading; every warning is recorded unless quiet_libraries drops it."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_libraries() if quiet else contextlib.nullcontext():
                assert (
                    not are_progress_bars_disabled()
                )  # Hub download bars stay: first downloads take minutes
                pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float32)
                pipe.vae.to(torch.float32)  # AutoencoderKL warns of fp32 modules even when there are none
                with pytest.raises(OSError):  # diffusers' Hub lookup for an unknown id warns as well
                    AutoencoderKL.from_pretrained(HUB_LIKE_ID, subfolder="vae")
                warnings.warn("an unrelated warning", FutureWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    capfd.readouterr()
    noisy_warnings, noisy = load(quiet=False), capfd.readouterr().err  # bars go to stderr, logs to caplog
    assert "Loading pipeline components" in noisy and "Loading weights" in noisy
    assert any("should be kept in float32: []" in r.getMessage() for r in caplog.records)
    assert any("`torch_dtype` is deprecated" in m for m in noisy_warnings)
    assert any("local_dir_use_symlinks" in m for m in noisy_warnings)
    caplog.clear()
    quiet_warnings = load(quiet=True)
    assert capfd.readouterr().err == "" and not caplog.records
    assert quiet_warnings == ["an unrelated warning"]
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()


def test_log_filters_match_messages_not_loggers(caplog):
    # bitsandbytes emits this only on AVX512-BF16 CPUs without the `kernels` package (not this machine's);
    # transformers warns about `torch_dtype` once per process. Both are emitted here as those libraries do.
    sources = {
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: %s. "
        "Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
        "transformers.modeling_utils": "`torch_dtype` is deprecated! Use `dtype` instead!%s",
    }
    with quiet_libraries(), caplog.at_level(logging.WARNING):
        for name, message in sources.items():
            logging.getLogger(name).warning(message, "")
            logging.getLogger(name).warning("a real problem in %s", name)
    assert sorted(r.getMessage() for r in caplog.records) == sorted(f"a real problem in {n}" for n in sources)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # after the block, nothing is filtered any more
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            sources["bitsandbytes.backends.cpu.ops"], "x"
        )
    assert len(caplog.records) == 1


# --- the scripts, as a user runs them ---------------------------------------------------------------------------


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from sdxl_ztsnr.demo_data import write_demo_dataset

    out = tmp_path_factory.mktemp("console-data")
    write_demo_dataset(out, n=4, seed=0)
    return out


@pytest.fixture(scope="module")
def cache_at_128(tiny_sdxl, small_data, tmp_path_factory) -> Path:
    """OUT/cache made at --resolution 128, as train_sdxl_ztsnr.py --train_data_dir would have left it."""
    import precompute_latents

    out = tmp_path_factory.mktemp("console-run") / "cache"
    argv = ["--train_data_dir", str(small_data), "--pretrained_model_name_or_path", str(tiny_sdxl)]
    argv += ["--output_dir", str(out), "--resolution", "128", "--bucket_step", "32", "--num_workers", "0"]
    precompute_latents.main(precompute_latents.parse_args([*argv, "--no_progress"]))
    return out


def _user_error_cases(tiny_sdxl, small_data, cache_at_128, tmp_path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments shared by both scripts, text the error line must hold)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing data path": (
            ["--data_dir", str(tmp_path / "nope"), "--model_path", str(tiny_sdxl)],
            "no such folder",
        ),
        "model offline": (["--data_dir", str(small_data), "--model_path", HUB_LIKE_ID], "offline"),
        "empty data folder": (["--data_dir", str(empty), "--model_path", str(tiny_sdxl)], "no .png/.jpg"),
        "cache at another resolution": (
            ["--data_dir", str(small_data), "--model_path", str(tiny_sdxl), "--resolution", "256"],
            "resolution: cache has 128, expected 256",
        ),
    }


def _assert_one_line_error(done: subprocess.CompletedProcess, expected: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == USER_ERROR_EXIT_CODE, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr


# Each script runs one case as a user does, in a fresh process (its imports, its console); the other cases run
# through the same run_script in this process: a traceback there is an exception that fails the test.
IN_A_FRESH_PROCESS = "model offline"
CASES = ["missing data path", IN_A_FRESH_PROCESS, "empty data folder", "cache at another resolution"]


def _run_here(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``script``'s run_script(main, parse_args) on ``argv``, in this process."""
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_script(module.main, lambda: module.parse_args(argv))
    return exited.value.code, capsys.readouterr().err


def _check_user_error(script, argv, expected, tmp_path, capsys, fresh_process: bool) -> None:
    if fresh_process:
        _assert_one_line_error(_run(script, *argv, cwd=tmp_path), expected)
    else:
        code, stderr = _run_here(script, argv, capsys)
        _assert_one_line_error(subprocess.CompletedProcess([script], code, "", stderr), expected)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_precompute_script_user_errors(
    case, tiny_sdxl, small_data, cache_at_128, tmp_path, capsys, fresh_accelerate_state
):
    args, expected = _user_error_cases(tiny_sdxl, small_data, cache_at_128, tmp_path)[case]
    out = ["--output_dir", str(cache_at_128 if "resolution" in case else tmp_path / "out")]
    argv = [*args, *out, "--bucket_step", "32", "--num_workers", "0"]
    _check_user_error("precompute_latents.py", argv, expected, tmp_path, capsys, case == IN_A_FRESH_PROCESS)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_train_script_user_errors(
    case, tiny_sdxl, small_data, cache_at_128, tmp_path, capsys, fresh_accelerate_state
):
    args, expected = _user_error_cases(tiny_sdxl, small_data, cache_at_128, tmp_path)[case]
    # The trainer precomputes --train_data_dir into OUTPUT_DIR/cache: there the 128 cache already is.
    out = cache_at_128.parent if "resolution" in case else tmp_path / "out"
    train = ["--output_dir", str(out), "--bucket_step", "32", "--max_train_steps", "1"]
    argv = [*args, *train, "--dataloader_num_workers", "0"]
    _check_user_error("train_sdxl_ztsnr.py", argv, expected, tmp_path, capsys, case == IN_A_FRESH_PROCESS)
    assert not (out / "unet").exists()


# --- the sweep: each script, each kind of bad path or model, one line ------------------------------------------


def _sweep_cases(tiny_sdxl, small_data, cache_at_128, tmp_path) -> dict[str, list[str]]:
    """name -> [script, *argv, text the error line must hold]."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a model, not a folder")
    fake_single_file = tmp_path / "model.safetensors"
    fake_single_file.write_text("not safetensors")
    image = next(small_data.glob("*.png"))
    model = ["--model_path", str(tiny_sdxl)]
    train = ["train_sdxl_ztsnr.py", "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1"]
    precompute = ["precompute_latents.py", "--bucket_step", "32", "--num_workers", "0"]
    vae = ["train_vae.py", "--max_train_steps", "1", "--perceptual_weight", "0", "--_lpips_random_backbone"]
    vae += ["--output_dir", str(tmp_path / "v"), "--pretrained_model_name_or_path"]
    upscale = ["upscale.py", "--image", str(image), "--model", str(tiny_sdxl)]
    return {
        "train: no such cache": [*train, *model, "--precomputed_dir", "DOES_NOT_EXIST", "DOES_NOT_EXIST: no such"],
        "train: cache is a file": [*train, *model, "--precomputed_dir", str(a_file), "no such directory"],
        "train: output is a file": [
            train[0], *model, "--precomputed_dir", str(cache_at_128), "--output_dir", str(a_file), "a file is in the way"
        ],
        "train: no tag frequency file": [
            *train, *model, "--precomputed_dir", str(cache_at_128), "--tag_frequency_path", "missing.json", "missing.json: tag frequency file not found"
        ],
        "train: tag class map not JSON": [
            *train, *model, "--precomputed_dir", str(cache_at_128), "--tag_class_map", str(a_file), "not valid UTF-8 JSON"
        ],
        "precompute: no local dataset": [
            *precompute, *model, "--dataset_name", "./no-such-dataset", "--output_dir", str(tmp_path / "p"), "no such folder"
        ],
        "precompute: Hub dataset offline": [
            *precompute, *model, "--dataset_name", HUB_LIKE_ID, "--output_dir", str(tmp_path / "p"), "offline"
        ],
        "precompute: output is a file": [
            *precompute, *model, "--train_data_dir", str(small_data), "--output_dir", str(a_file), "a file is in the way"
        ],
        "vae: model offline": [*vae, HUB_LIKE_ID, "--train_data_dir", str(small_data), "offline"],
        "vae: no such data folder": [*vae, str(tiny_sdxl), "--train_data_dir", "nope", "no such folder"],
        "vae: output is a file": [
            vae[0], "--perceptual_weight", "0", "--pretrained_model_name_or_path", str(tiny_sdxl),
            "--train_data_dir", str(small_data), "--output_dir", str(a_file), "a file is in the way"
        ],
        "upscale: output under a file": [*upscale, "--out", str(a_file / "x.png"), "a file is in the way"],
        "upscale: no upscaler file": [
            *upscale, "--out", str(tmp_path / "x.png"), "--upscaler_model", "nope.pth", "nope.pth: no such file"
        ],
        "upscale: not a safetensors file": [
            "upscale.py", "--image", str(image), "--model", str(fake_single_file), "--out", str(tmp_path / "x.png"), "not a readable .safetensors file"
        ],
    }  # fmt: skip


SWEEP = [
    "train: no such cache",
    "train: cache is a file",
    "train: output is a file",
    "train: no tag frequency file",
    "train: tag class map not JSON",
    "precompute: no local dataset",
    "precompute: Hub dataset offline",
    "precompute: output is a file",
    "vae: model offline",  # in a fresh process: the script's own entry point
    "vae: no such data folder",
    "vae: output is a file",
    "upscale: output under a file",
    "upscale: no upscaler file",
    "upscale: not a safetensors file",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP)
def test_every_script_says_what_is_wrong_in_one_line(
    case, tiny_sdxl, small_data, cache_at_128, tmp_path, capsys, fresh_accelerate_state, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    script, *argv = _sweep_cases(tiny_sdxl, small_data, cache_at_128, tmp_path)[case]
    expected = argv.pop()
    _check_user_error(script, argv, expected, tmp_path, capsys, case == "vae: model offline")
