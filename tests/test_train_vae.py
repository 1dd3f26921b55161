"""train_vae.py end to end on the tiny VAE and the demo images: train → evaluate → save → resume → requeue,
bad inputs, offline LPIPS, the --finetune_vae stage of a pipeline, and two processes."""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_vae
from sdxl_ztsnr import launch, lifecycle, vae_finetune
from sdxl_ztsnr.vae_outputs import single_file_vae_state_dict

REPO = Path(__file__).resolve().parents[1]
LATENTS_MEAN, LATENTS_STD = [0.1, -0.2, 0.3, 0.0], [1.1, 0.9, 1.0, 1.2]
# 64² crops, LPIPS on a random AlexNet backbone (no download; same code path), a high lr for a random-init VAE.
VAE_COMMON = [
    "--crop_size", "64", "--train_batch_size", "2", "--learning_rate", "2e-3", "--lpips_net", "alex",
    "--_lpips_random_backbone", "--logging_steps", "5", "--dataloader_num_workers", "0", "--seed", "0",
]  # fmt: skip


def run(args) -> dict:
    """train_vae.main in this process with a fresh accelerate state, as a new process would have."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train_vae.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def logged_scalars(output_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(output_dir / "logs" / "sdxl_vae"))
    accumulator.Reload()
    tags = [t for t in accumulator.Tags()["scalars"] if t not in ("lr", "samples_per_s")]
    return {t: {e.step: e.value for e in accumulator.Scalars(t)} for t in tags}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def start_vae(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny pipeline's VAE with per-channel latent statistics in its config (kept by the fine-tune)."""
    out = tmp_path_factory.mktemp("start-vae")
    shutil.copytree(tiny_sdxl / "vae", out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def vae_args(start_vae, demo_data):
    def make(output_dir, *extra: str, data=demo_data):
        return train_vae.parse_args(
            ["--pretrained_vae_model_name_or_path", str(start_vae), "--train_data_dir", str(data),
             "--output_dir", str(output_dir), *VAE_COMMON, *extra]
        )  # fmt: skip

    return make


@pytest.fixture(scope="module")
def finished(vae_args, tmp_path_factory) -> tuple[Path, dict]:
    """30 decoder steps, MSE + 0.1·LPIPS, validation and checkpoints every 15."""
    out = tmp_path_factory.mktemp("vae-run")
    result = run(
        vae_args(out, "--max_train_steps", "30", "--validation_steps", "15", "--checkpointing_steps", "15")
    )
    return out, result


def test_decoder_finetune_raises_held_out_psnr_and_leaves_encoder_bit_identical(finished, start_vae):
    out, result = finished
    record = json.loads((out / "vae_metrics.json").read_text())
    start, final = record["starting"], record["final"]
    assert final["step"] == 30 and record["held_out_crops"] == 4 and record["crop_size"] == 64
    # a random-init decoder: its noisy output is far from the images; 30 MSE steps must close part of the gap
    assert final["psnr"] > start["psnr"] + 0.5, (start, final)
    assert final["ssim"] > start["ssim"] + 0.1, (start, final)
    assert {"psnr", "ssim", "lpips"} <= set(final) and [v["step"] for v in record["validations"]] == [15, 30]
    assert result["psnr"] == pytest.approx(final["psnr"])

    before, after = weights(start_vae), weights(out)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert len(frozen) > 20
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"{key} changed"
    assert all(not torch.equal(before[k], after[k]) for k in after if k.startswith("decoder.conv_out"))
    assert (
        sum(not torch.equal(before[k], after[k]) for k in after if k.startswith(("decoder.", "post_quant")))
        > 20
    )


def test_outputs_load_keep_the_starting_config_and_report(finished, start_vae):
    from diffusers import AutoencoderKL
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished
    vae = AutoencoderKL.from_pretrained(out)
    starting = json.loads((start_vae / "config.json").read_text())
    assert vae.config.latents_mean == LATENTS_MEAN and vae.config.latents_std == LATENTS_STD
    assert vae.config.scaling_factor == starting["scaling_factor"] and vae.config.force_upcast is True
    # single file: the same weights in the original layout
    single = load_file(str(out / f"{out.name}.safetensors"))
    expected = single_file_vae_state_dict(vae.state_dict())
    assert single.keys() == expected.keys()
    assert all(torch.equal(single[k], expected[k]) for k in expected)

    card = (out / "README.md").read_text()
    assert "| starting |" in card and "| fine-tuned (step 30) |" in card and "bit for bit" in card
    assert str(start_vae) not in card.split("## Training configuration")[0]  # no local path in the text
    assert (out / "skipped.jsonl").read_text() == ""
    assert lifecycle.read_outputs_marker(out)["step"] == 30
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-15", "checkpoint-30"]

    accumulator = EventAccumulator(str(out / "logs" / "sdxl_vae"), size_guidance={"images": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("val_psnr")] == [15, 30]
    assert [e.step for e in accumulator.Scalars("loss")] == [5, 10, 15, 20, 25, 30]
    (image,) = accumulator.Images("validation")[-1:]
    assert (image.width, image.height) == (
        3 * 64,
        4 * 64,
    )  # original | starting | fine-tuned, one row per crop


def test_latent_cached_before_finetuning_decodes_better_with_the_new_decoder(
    finished, train_cache, demo_data, tiny_sdxl
):
    from diffusers import AutoencoderKL

    from sdxl_ztsnr.cache import load_cache, rows_as_tensors
    from sdxl_ztsnr.precompute import FolderInputs, prepare_input

    dataset, _ = load_cache(train_cache)
    inputs = FolderInputs(demo_data)
    index_of = {inputs.source(i): i for i in range(len(inputs))}
    rows = rows_as_tensors(dataset, range(len(dataset)))
    old = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").eval()
    new = AutoencoderKL.from_pretrained(finished[0]).eval()
    errors = {"old": [], "new": []}
    with torch.no_grad():
        for row, source in zip(rows, dataset["source"], strict=True):
            item = prepare_input(inputs, index_of[source], [tuple(row["bucket"].tolist())])
            target = item["samples"][0]["pixels"].permute(2, 0, 1).float() / 127.5 - 1  # what was encoded
            latents = row["latents"].float()[None] / old.config.scaling_factor  # cached: scaled, fp16
            for name, vae in (("old", old), ("new", new)):
                decoded = vae.decode(latents).sample[0].clamp(-1, 1)
                errors[name].append((decoded - target).square().mean().item())
    # summed over all 24 rows; the fine-tuned decoder has never seen these 96-160 px bucket crops
    assert sum(errors["new"]) < 0.95 * sum(errors["old"]), errors


def test_requeue_of_a_finished_run_trains_nothing_and_rewrites_only_missing_outputs(
    finished, vae_args, tmp_path
):
    out = tmp_path / "requeued"
    shutil.copytree(finished[0], out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    result = run(vae_args(out, "--max_train_steps", "30", "--resume_from_checkpoint", "latest"))
    assert result == {"step": 30, "finished_before": True}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name in stamp} == stamp
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-15", "checkpoint-30"]

    # outputs lost (killed while saving): the requeue writes them from the last checkpoint, still training nothing
    before = weights(out)
    for name in ("outputs.json", "diffusion_pytorch_model.safetensors", "README.md"):
        (out / name).unlink()
    run(vae_args(out, "--max_train_steps", "30", "--resume_from_checkpoint", "latest"))
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lifecycle.read_outputs_marker(out)["step"] == 30 and (out / "README.md").is_file()

    # a fresh start over this run's checkpoints is refused
    with pytest.raises(lifecycle.RunDirectoryError, match="--overwrite_output_dir"):
        run(vae_args(out, "--max_train_steps", "30"))


def test_resumed_run_equals_an_unbroken_one(vae_args, tmp_path):
    """GAN from step 2, EMA, accumulation 2, sampled latents (keyed noise): every piece of state must resume."""
    extra = [
        "--max_train_steps", "5", "--checkpointing_steps", "3", "--validation_steps", "0", "--gan_start_step", "2",
        "--disc_channels", "8", "--use_ema", "--ema_decay", "0.9", "--gradient_accumulation_steps", "2",
        "--train_batch_size", "1",
    ]  # fmt: skip
    unbroken = tmp_path / "unbroken"
    run(vae_args(unbroken, *extra))
    resumed = tmp_path / "resumed"
    shutil.copytree(unbroken / "checkpoint-3", resumed / "checkpoint-3")
    assert run(vae_args(resumed, *extra, "--resume_from_checkpoint", "latest"))["step"] == 5
    for part in ("", "raw_weights"):  # the published EMA weights and the raw ones
        a, b = weights(unbroken / part), weights(resumed / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    for name in ("model.safetensors", "model_1.safetensors"):  # the VAE and the discriminator
        a, b = (
            load_file(str(unbroken / "checkpoint-5" / name)),
            load_file(str(resumed / "checkpoint-5" / name)),
        )
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ema, raw = weights(unbroken), weights(unbroken / "raw_weights")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("decoder."))

    # outputs lost after the last checkpoint of a GAN + EMA run: a requeue writes the same ones again
    (resumed / "outputs.json").unlink()
    (resumed / "diffusion_pytorch_model.safetensors").unlink()
    assert run(vae_args(resumed, *extra, "--resume_from_checkpoint", "latest"))["finished_before"]
    again = weights(resumed)
    assert all(torch.equal(again[k], ema[k]) for k in ema)


def test_bad_images_are_skipped_and_listed_and_compile_falls_back(
    demo_data, vae_args, tmp_path, monkeypatch, caplog
):
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted(demo_data.glob("*.png"))[:5]:
        shutil.copy(path, data / path.name)
    good = (data / sorted(p.name for p in data.iterdir())[0]).read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "empty.jpg").write_bytes(b"")
    (data / "sub").mkdir()
    (data / "sub" / "not_an_image.webp").write_text("hello")
    monkeypatch.setattr(
        launch, "compile_problem", lambda device: "InvalidCxxCompiler: No working C++ compiler found"
    )
    out = tmp_path / "out"
    args = vae_args(out, "--max_train_steps", "2", "--perceptual_weight", "0", "--latents", "mean", data=data)
    args.enable_compile = True
    with caplog.at_level("WARNING"):
        result = run(args)
    assert result["step"] == 2 and "lpips" in result  # not in the loss, still measured: its network is there
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {Path(e["path"]).name: e["kind"] for e in skipped} == {
        "empty.jpg": "empty file",
        "not_an_image.webp": "not an image",
        "truncated.png": "corrupt image",
    }
    assert sum("eager" in r.getMessage() for r in caplog.records) == 1  # on the CPU: no compile at all

    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg/.webp images found"):
        run(vae_args(tmp_path / "out2", "--max_train_steps", "1", data=tmp_path / "nothing"))
    shutil.rmtree(data)
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.png").write_bytes(b"")
    (data / "b.jpg").write_text("not a jpeg")
    with pytest.raises(SystemExit, match="every one of the 2 images was skipped"):
        run(vae_args(tmp_path / "out3", "--max_train_steps", "1", data=data))


def test_lpips_without_its_backbone_stops_before_training_naming_the_file(vae_args, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    args = vae_args(tmp_path / "out", "--max_train_steps", "2", "--lpips_net", "vgg")
    args._lpips_random_backbone = False
    with pytest.raises(SystemExit) as stop:
        run(args)
    message = str(stop.value)
    assert "\n" not in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--perceptual_weight 0" in message
    # stopped before any data work or training
    assert not (tmp_path / "out" / "skipped.jsonl").exists()
    assert not list((tmp_path / "out").glob("checkpoint-*"))

    # --perceptual_weight 0 trains without LPIPS and reports PSNR and SSIM only
    args = vae_args(
        tmp_path / "out", "--max_train_steps", "1", "--perceptual_weight", "0", "--validation_steps", "0"
    )
    args._lpips_random_backbone = False
    result = run(args)
    assert result["step"] == 1 and {"psnr", "ssim"} <= set(result) and "lpips" not in result
    assert "LPIPS" not in (tmp_path / "out" / "vae_metrics.md").read_text()


def test_finetune_vae_stage_puts_the_decoder_into_the_pipeline_and_its_single_file(
    tiny_sdxl, demo_data, tmp_path
):
    """What train_sdxl_ztsnr.py --finetune_vae calls after its UNet stage (vae_finetune.finetune_pipeline_vae)."""
    from diffusers import StableDiffusionXLPipeline

    from sdxl_ztsnr import export

    pipeline_dir = tmp_path / "run"
    shutil.copytree(tiny_sdxl, pipeline_dir)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    single = pipeline_dir / "run.safetensors"
    export.save_single_file(
        single, base.unet.state_dict(), base.vae.state_dict(), base.text_encoder.state_dict(),
        base.text_encoder_2.state_dict(),
    )  # fmt: skip
    (pipeline_dir / "README.md").write_text("# run\n\nA fine-tune.\n")
    argv = ["--data_dir", str(demo_data), *VAE_COMMON, "--max_train_steps", "3", "--validation_steps", "0"]

    from accelerate.state import AcceleratorState

    for _ in range(2):  # the second call is a requeue: nothing trains, the install is redone identically
        AcceleratorState._reset_state(reset_partial_state=True)
        vae_finetune.finetune_pipeline_vae(pipeline_dir, [*argv, "--resume_from_checkpoint", "latest"], single)
        AcceleratorState._reset_state(reset_partial_state=True)
        stage = weights(pipeline_dir / vae_finetune.VAE_STAGE_SUBFOLDER)
        installed = weights(pipeline_dir / "vae")
        assert all(torch.equal(stage[k], installed[k]) for k in stage)
    original = base.vae.state_dict()
    assert all(torch.equal(installed[k], original[k]) for k in installed if k.startswith("encoder."))
    assert not torch.equal(installed["decoder.conv_out.weight"], original["decoder.conv_out.weight"])

    pipeline = StableDiffusionXLPipeline.from_pretrained(pipeline_dir)
    assert torch.equal(pipeline.vae.decoder.conv_out.weight, installed["decoder.conv_out.weight"])
    packed = load_file(str(single))
    vae_keys = export.vae_to_original_state_dict(installed)
    for key, tensor in vae_keys.items():
        assert torch.equal(packed[key], tensor.half()), key
    unet_keys = export.unet_to_original_state_dict(base.unet.state_dict())
    assert all(torch.equal(packed[k], v.half()) for k, v in unet_keys.items())
    card = (pipeline_dir / "README.md").read_text()
    assert card.startswith("# run") and card.count("## VAE decoder fine-tune") == 1 and "| starting |" in card


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU launch; on GPUs the same path runs with NCCL")
def test_two_processes_train_what_one_process_with_the_whole_batch_trains(
    start_vae, demo_data, vae_args, tmp_path
):
    """Crops, latent noise, LPIPS, the GAN terms and λ (from the global batch's gradients) must not depend on the
    split. lr 1e-4 and ε 1e-6: AdamW's update ≈ lr·sign(g) for |g| ≲ ε turns the last-bit differences of summing
    a batch in two halves into lr-sized ones (see test_multiprocess.py). The random-init VAE with the adaptive GAN
    weight (a ratio of gradient norms) amplifies them further: measured here, logged values within 3e-4 relative
    (λ) and 1.3e-5 (loss) after 4 steps, weights within 1.6e-5 — tolerances 1e-3 and 5e-5 (a different crop,
    noise draw or split would differ by the whole update)."""
    extra = [
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "0", "--gan_start_step", "1",
        "--disc_channels", "8", "--adam_epsilon", "1e-6", "--learning_rate", "1e-4", "--logging_steps", "1",
    ]  # fmt: skip
    two = tmp_path / "two"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", str(REPO / "train_vae.py"),
        "--pretrained_vae_model_name_or_path", str(start_vae), "--train_data_dir", str(demo_data),
        "--output_dir", str(two), *VAE_COMMON, "--train_batch_size", "1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [p.name for p in sorted(two.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: the same kernels' summation order
    try:
        run(vae_args(one, *extra, "--train_batch_size", "2"))
    finally:
        torch.set_num_threads(threads)
    logged = {name: logged_scalars(tmp_path / name) for name in ("two", "one")}
    assert sorted(logged["two"]["loss"]) == [1, 2, 3, 4] and sorted(logged["two"]["g_loss"]) == [2, 3, 4]
    for tag, values in logged["one"].items():
        for step, value in values.items():
            assert logged["two"][tag][step] == pytest.approx(value, rel=1e-3, abs=1e-7), (tag, step)
    a, b = weights(two), weights(one)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - weights(start_vae)[k]).abs().max().item() for k in a)
    assert worst <= 5e-5 < moved / 5, f"VAEs differ by {worst:.3g} (training moved them by {moved:.3g})"
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))


def test_seed_basic_training_command_makes_a_unet_and_a_vae_finetune(tiny_sdxl, demo_data, tmp_path, caplog):
    """The seed README's "Basic Training" command, as written, plus sizes for a CPU test (and LPIPS offline)."""
    import logging

    import train_sdxl_ztsnr
    from sdxl_ztsnr import export

    caplog.set_level(logging.WARNING, logger="sdxl_ztsnr.launch")
    out = tmp_path / "O"
    seed_command = [
        "--model_path", str(tiny_sdxl), "--data_dir", str(demo_data), "--output_dir", str(out),
        "--learning_rate", "1e-6", "--batch_size", "1", "--enable_compile", "--finetune_vae",
    ]  # fmt: skip
    sizes = [
        "--resolution",
        "128",
        "--bucket_step",
        "32",
        "--max_train_steps",
        "2",
        "--vae_max_train_steps",
        "2",
    ]
    args = train_sdxl_ztsnr.parse_args(
        [*seed_command, *sizes, "--_lpips_random_backbone", "--report_to", "none"]
    )
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train_sdxl_ztsnr.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result["step"] == 2
    compile_lines = [r for r in caplog.records if "--enable_compile" in r.getMessage()]
    assert compile_lines and all("eager" in r.getMessage() for r in compile_lines)  # one line per stage
    base_unet, unet = weights(tiny_sdxl / "unet"), weights(out / "unet")
    assert any(not torch.equal(unet[k], base_unet[k]) for k in unet), "no UNet fine-tune"
    base_vae, vae = weights(tiny_sdxl / "vae"), weights(out / "vae")
    assert not torch.equal(vae["decoder.conv_out.weight"], base_vae["decoder.conv_out.weight"]), (
        "no VAE fine-tune"
    )
    assert all(torch.equal(vae[k], base_vae[k]) for k in vae if k.startswith(("encoder.", "quant_conv.")))
    packed = load_file(str(out / "O.safetensors"))  # the single file carries the fine-tuned decoder
    for key, tensor in export.vae_to_original_state_dict(vae).items():
        assert torch.equal(packed[key], tensor.half()), key
    assert "## VAE decoder fine-tune" in (out / "README.md").read_text()
