"""upscale.py and its library (tiling, colour fix, tiled img2img) on the tiny model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import upscale as upscale_script
from sdxl_ztsnr.color_fix import adain, color_fix, wavelet, wavelet_low_frequency
from sdxl_ztsnr.console import USER_ERROR_EXIT_CODE, UserError
from sdxl_ztsnr.sampling import load_pipeline, make_scheduler, pipeline_conditioning, training_alpha_bar
from sdxl_ztsnr.tiling import seam_energy, seam_passes, tile_edges, tile_passes
from sdxl_ztsnr.upscaling import (
    SeamsFixOptions,
    TileOptions,
    estimate_memory,
    job_seed,
    pixel_multiple,
    redraw_pass,
    upscale,
)

REPO = Path(__file__).resolve().parents[1]
# Two denoising steps per tile (half of a 4-step ladder), 64 px tiles: a second or two per upscale.
FAST = dict(num_steps=4, denoise_strength=0.5, color_fix_mode="none", tiles=TileOptions(64, 16, 8))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    return load_pipeline(tiny_sdxl)


def synthetic(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour pattern (gradients and waves), RGB."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    phase = np.random.default_rng(seed).uniform(0, 3, 3)
    channels = [0.5 + 0.4 * np.sin(5 * x + phase[0]), 0.5 + 0.4 * np.cos(4 * y + phase[1]), 0.3 + 0.5 * x * y]
    return Image.fromarray((np.stack(channels, -1) * 255).round().astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Layout and masks


@pytest.mark.parametrize("canvas", [(128, 128), (96, 160), (64, 64)])
def test_tile_masks_partition_the_canvas(canvas):
    for redraw in ("linear", "chess"):
        passes = tile_passes(canvas, 64, 16, 8, redraw, multiple=32)
        assert len(passes) == (1 if redraw == "linear" or canvas == (64, 64) else 2)
        total = torch.zeros(canvas)
        for jobs in passes:
            for job in jobs:
                top, left, height, width = job.window
                assert height % 32 == 0 and width % 32 == 0
                assert 0 <= top and top + height <= canvas[0] and 0 <= left and left + width <= canvas[1]
                total[top : top + height, left : left + width] += job.mask()
        torch.testing.assert_close(total, torch.ones(canvas))  # every pixel redrawn, weights summing to 1


def test_tile_larger_than_canvas_is_one_job():
    (jobs,) = tile_passes((64, 96), 1024, 32, 8, "linear", multiple=32)
    assert len(jobs) == 1 and jobs[0].window == (0, 0, 64, 96)
    assert seam_passes((64, 96), 1024, "half_tile_intersections", 64, 16, 8, 32) == []


@pytest.mark.parametrize("mode", ["band_pass", "half_tile", "half_tile_intersections"])
def test_seam_masks_peak_on_the_seams(mode):
    canvas = (128, 192)
    passes = seam_passes(canvas, 64, mode, 32, 16, 8, multiple=32)
    assert len(passes) == (3 if mode == "half_tile_intersections" else 2)
    coverage = torch.zeros(canvas)  # per pass the masks add up (pieces along a seam); passes take turns
    for jobs in passes:
        total = torch.zeros(canvas)
        for job in jobs:
            top, left, height, width = job.window
            total[top : top + height, left : left + width] += job.mask()
        assert total.max() <= 1 + 1e-5
        coverage = torch.maximum(coverage, total)
    for edge in (64, 128):  # vertical seams: the pixels on both sides are redrawn almost fully
        assert coverage[:, edge - 1 : edge + 1].min() > 0.95
    assert coverage[63:65].min() > 0.95
    if mode == "band_pass":
        assert coverage[:40, :40].max() == 0  # far from every seam nothing is touched


def test_seam_energy_measures_steps_at_borders():
    smooth = torch.linspace(0, 1, 128).repeat(3, 128, 1)
    edges = tile_edges(128, 64)
    border, inside = seam_energy(smooth, edges, edges)
    assert border == pytest.approx(inside, rel=0.05)
    stepped = smooth.clone()
    stepped[:, :, 64:] += 0.2
    border, inside = seam_energy(stepped, edges, edges)
    assert border > 10 * inside


# ---------------------------------------------------------------------------------------------------------------
# Colour fix


def test_color_fixes():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 64, 64, generator=generator) * 0.5 + 0.25
    result = (reference * 0.5 + 0.1).clamp(0, 1)
    fixed = adain(result, reference)
    torch.testing.assert_close(fixed.mean((1, 2)), reference.mean((1, 2)), atol=1e-3, rtol=0)
    torch.testing.assert_close(fixed.std((1, 2)), reference.std((1, 2)), atol=1e-3, rtol=0)
    # Wavelet: the reference's low frequencies under the result's high ones.
    ramp = torch.linspace(0.2, 0.8, 64).repeat(3, 64, 1)
    detail = 0.05 * torch.sign(torch.randn(3, 64, 64, generator=generator))
    mixed = wavelet((ramp + 0.2 + detail).clamp(0, 1), ramp)
    torch.testing.assert_close(
        wavelet_low_frequency(mixed)[:, 16:-16, 16:-16], ramp[:, 16:-16, 16:-16], atol=0.02, rtol=0
    )
    assert (mixed - ramp).abs().mean() > 0.02  # the detail stays
    torch.testing.assert_close(color_fix(reference, reference, "wavelet"), reference)
    assert color_fix(result, reference, "none") is result
    with pytest.raises(ValueError, match="shapes differ"):
        color_fix(result, reference[:, :32], "adain")


def test_adain_on_a_single_pixel_is_finite():
    """One value per channel: its std is 0, not NaN (the unbiased estimate divides by n - 1 = 0)."""
    reference, result = (
        torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1),
        torch.tensor([0.6, 0.1, 0.3]).view(3, 1, 1),
    )
    fixed = adain(result, reference)
    assert torch.isfinite(fixed).all()
    torch.testing.assert_close(fixed, reference)  # nothing to match but the mean


# ---------------------------------------------------------------------------------------------------------------
# Upscaling


def test_upscale_size_every_tile_redrawn_and_eps_model(pipe):
    image = synthetic(72, 40)
    out = upscale(pipe, image, 2.0, prompt="stripes", **FAST)
    assert out.size == (144, 80) and out.mode == "RGB"
    reference = pixels(image.resize((144, 80), Image.LANCZOS))
    change = np.abs(pixels(out) - reference).mean(-1)
    blocks = change[: 80 // 8 * 8, :].reshape(10, 8, 18, 8).mean((1, 3))  # 8×8 px blocks
    assert blocks.min() > 2.0, "a region kept its pre-upscaled pixels"


def test_ztsnr_and_eps_models_redraw_on_their_own_ladders(pipe):
    from diffusers import EulerDiscreteScheduler

    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    try:
        upscale(pipe, synthetic(32, 32), 2.0, **FAST)
        ztsnr_steps = sorted(set(seen), reverse=True)
        seen.clear()
        dpm = upscale(pipe, synthetic(32, 32), 2.0, sampler="dpmpp_2m", **FAST)
        dpm_steps = sorted(set(seen), reverse=True)
        seen.clear()
        eps = {**pipe.scheduler.config, "prediction_type": "epsilon", "rescale_betas_zero_snr": False}
        original = pipe.scheduler
        pipe.scheduler = EulerDiscreteScheduler.from_config({**eps, "timestep_spacing": "leading"})
        try:
            out = upscale(pipe, synthetic(32, 32), 2.0, **FAST)
        finally:
            pipe.scheduler = original
    finally:
        hook.remove()
    assert ztsnr_steps == dpm_steps == [499, 249]  # trailing 4-step ladder 999, 749, 499, 249: its last half
    assert np.abs(pixels(dpm) - pixels(synthetic(32, 32).resize((64, 64), Image.LANCZOS))).mean() > 2
    assert sorted(set(seen), reverse=True) == [251, 1]  # leading: 751, 501, 251, 1
    assert out.size == (64, 64)


def test_rgba_in_rgba_out_alpha_resized_on_its_own(pipe):
    rgb = synthetic(40, 32)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (32, 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    out = upscale(pipe, rgba, 2.0, **FAST)
    assert out.mode == "RGBA" and out.size == (80, 64)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(alpha.resize((80, 64), Image.LANCZOS)))
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(upscale(pipe, rgb, 2.0, **FAST)))


def test_batched_tiles_equal_one_by_one(pipe):
    canvas = torch.from_numpy(pixels(synthetic(128, 96)) / 255).permute(2, 0, 1)
    (jobs,) = tile_passes((96, 128), 64, 16, 8, "linear", pixel_multiple(pipe))
    assert len(jobs) == 4
    conditioning = pipeline_conditioning(pipe, ["cat"], [""])
    alpha_bar = training_alpha_bar(pipe.scheduler.config)

    def run(batch: int) -> torch.Tensor:
        return redraw_pass(
            pipe, canvas, jobs, conditioning, lambda: make_scheduler("euler", pipe.scheduler.config, 4, alpha_bar),
            0.5, 5.0, 0.7, [job_seed(3, 0, k) for k in range(len(jobs))], (96, 128), batch, None,
        )  # fmt: skip

    one_by_one, batched = run(1), run(3)
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-4)
    assert (one_by_one - canvas).abs().mean() > 0.01
    whole = upscale(pipe, synthetic(64, 48), 2.0, tile_batch=4, **FAST)
    assert (
        np.abs(pixels(whole) - pixels(upscale(pipe, synthetic(64, 48), 2.0, tile_batch=1, **FAST))).max() <= 1
    )


def test_seams_fix_lowers_border_energy(pipe):
    """Hard tile edges (no mask blur) leave steps at the borders; each seams fix lowers their energy."""
    image = synthetic(64, 64, seed=1)
    edges = tile_edges(128, 64)
    hard = dict(FAST, tiles=TileOptions(64, 16, 0))

    def ratio(mode: str) -> float:
        out = upscale(pipe, image, 2.0, seams=SeamsFixOptions(mode, 0.5, 32, 16, 8), seed=2, **hard)
        border, inside = seam_energy(torch.from_numpy(pixels(out)).permute(2, 0, 1), edges, edges)
        return border / inside

    none = ratio("none")
    assert none > 1.2  # visible seams to begin with (measured 2.0; 1.4 in the Lanczos image)
    for mode in ("band_pass", "half_tile"):
        assert ratio(mode) < 0.9 * none, mode


def test_memory_estimate_grows_with_output_and_batch(pipe):
    small = estimate_memory(pipe, (256, 256), 128, 1, None)
    assert estimate_memory(pipe, (512, 512), 128, 1, None).host_bytes == 4 * small.host_bytes
    assert estimate_memory(pipe, (256, 256), 128, 4, None).device_bytes > small.device_bytes


# ---------------------------------------------------------------------------------------------------------------
# The script


def run_script(*argv: str) -> Path:
    return upscale_script.main(upscale_script.parse_args(list(argv)))


def test_script_writes_png_with_parameters_and_webp(tiny_sdxl, tmp_path):
    source = tmp_path / "in.png"
    synthetic(40, 40).save(source)
    common = ["--model", str(tiny_sdxl), "--image", str(source), "--tile_size", "1024", "--steps", "2",
              "--denoise", "0.5", "--prompt", "cat, (solo:1.2)", "--seams_fix", "band_pass"]  # fmt: skip
    out = run_script(
        *common,
        "--out",
        str(tmp_path / "out.png"),
        "--scale",
        "1.5",
        "--side_by_side",
        str(tmp_path / "s.png"),
    )
    with Image.open(out) as image:
        assert image.size == (60, 60)  # a tile larger than the canvas is clamped to it
        text = image.text["parameters"]
    assert Image.open(tmp_path / "s.png").size == (120, 60)
    assert text.startswith("cat, (solo:1.2)\nSteps: 2, Sampler: Euler, CFG scale: 5.0, Seed: 0, Size: 60x60")
    assert "Denoising strength: 0.5" in text and "Upscale: 1.5x Lanczos" in text
    webp = run_script(*common, "--out", str(tmp_path / "out.webp"), "--scale", "1")
    assert Image.open(webp).size == (40, 40)  # scale 1 redraws in place


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "{tmp}/missing.png"], r"--image .*missing.png: no such file"),
        (["--image", "{tmp}/corrupt.png"], r"--image .*corrupt.png: not a readable image"),
        (["--scale", "0.5"], "--scale must be at least 1"),
        (["--scale", "100000"], r"output needs about .* GiB of memory, .* available; lower --scale"),
        (["--out", "{tmp}/out.jpg", "--image", "{tmp}/alpha.png"], "JPEG cannot keep the alpha channel"),
        (["--out", "{tmp}/out.gif"], "use a .png, .webp or .jpg name"),
        (["--mask_blur", "80"], r"--mask_blur \(80\) must be 0, or at most 2 × \(--padding − 1\)"),
        (["--denoise", "0"], r"--denoise must be in \(0, 1\]"),
        (["--tile_batch", "0"], "--tile_batch must be at least 1"),
        (["--model", "{tmp}/missing_model"], "--model .*missing_model: no such file or directory"),
    ],
)
def test_script_user_errors_are_one_line(tiny_sdxl, tmp_path, argv, message):
    synthetic(32, 32).save(tmp_path / "in.png")
    rgba = synthetic(32, 32)
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    defaults = {
        "--model": str(tiny_sdxl),
        "--image": str(tmp_path / "in.png"),
        "--out": str(tmp_path / "out.png"),
    }
    argv = [a.format(tmp=tmp_path) for a in argv]
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    with pytest.raises(UserError) as raised:
        run_script("--steps", "2", *argv)
    text = str(raised.value)
    assert re.search(message, text) and "\n" not in text
    assert not (tmp_path / "out.png").exists()


def test_upscaler_model_without_spandrel_says_how_to_get_it(tiny_sdxl, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # as if not installed (it is optional)
    synthetic(32, 32).save(tmp_path / "in.png")
    (tmp_path / "x.pth").write_bytes(b"")  # the file is there: what is missing is the package
    with pytest.raises(UserError, match=r"--upscaler_model .*x.pth: the spandrel package is needed"):
        run_script("--model", str(tiny_sdxl), "--image", str(tmp_path / "in.png"), "--out",
                   str(tmp_path / "o.png"), "--upscaler_model", str(tmp_path / "x.pth"))  # fmt: skip


@pytest.mark.slow
def test_corrupt_image_in_a_fresh_process_prints_one_line(tiny_sdxl, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "upscale.py"), "--model", str(tiny_sdxl), "--image", str(tmp_path / "bad.png"),
         "--out", str(tmp_path / "out.png")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == USER_ERROR_EXIT_CODE and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()  # the image is read before anything else prints
    assert line.startswith(f"error: --image {tmp_path / 'bad.png'}: not a readable image")


def test_upscaler_model_that_is_not_there_is_named_before_anything_loads(tiny_sdxl, tmp_path):
    synthetic(32, 32).save(tmp_path / "in.png")
    with pytest.raises(UserError, match=r"--upscaler_model .*nope.pth: no such file"):
        run_script("--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "in.png"), "--out",
                   str(tmp_path / "o.png"), "--upscaler_model", str(tmp_path / "nope.pth"))  # fmt: skip


def test_seed_minus_one_picks_a_random_seed_and_writes_it(tiny_sdxl, tmp_path):
    synthetic(32, 32).save(tmp_path / "in.png")
    seeds = []
    for name in ("a.png", "b.png"):
        out = run_script("--model", str(tiny_sdxl), "--image", str(tmp_path / "in.png"), "--out",
                         str(tmp_path / name), "--steps", "2", "--scale", "1", "--seed", "-1")  # fmt: skip
        with Image.open(out) as image:
            seeds.append(int(re.search(r"Seed: (\d+),", image.text["parameters"]).group(1)))
    assert seeds[0] != seeds[1]  # two draws from 2**32 values
