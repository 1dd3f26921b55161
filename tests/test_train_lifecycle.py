"""The trainer's lifecycle as a user meets it: requeue a finished run, a fresh start over old checkpoints,
accumulation across epoch ends, no-clipping, what a push uploads, which VAE validates, held-out images, the
logged loss."""

import json
import logging
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import precompute_latents
import train_sdxl_ztsnr
from sdxl_ztsnr import lifecycle
from sdxl_ztsnr.tiny import build_tiny_sdxl


@pytest.fixture(autouse=True)
def _fresh_state(fresh_accelerate_state):
    yield


def run(args):
    """One trainer invocation, as a new process would make it (accelerate's state is a per-process singleton)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return train_sdxl_ztsnr.main(args)


def unet_file(directory):
    return directory / "unet" / "diffusion_pytorch_model.safetensors"


def trained_state(path):
    return json.loads((path / "trainer_state.json").read_text())


def test_requeue_of_a_finished_run_trains_nothing_and_overwrites_nothing(
    tiny_sdxl, train_cache, trainer_args, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="train_sdxl_ztsnr")
    argv = ("--precomputed_dir", str(train_cache), "--max_train_steps", "2", "--no_single_file")
    first = run(trainer_args(tiny_sdxl, tmp_path, *argv, "--resume_from_checkpoint", "latest"))
    assert first["step"] == 2
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    weights = unet_file(tmp_path).read_bytes()

    requeued = run(trainer_args(tiny_sdxl, tmp_path, *argv, "--resume_from_checkpoint", "latest"))
    assert requeued["step"] == 2 and requeued.get("finished_before")
    assert any("already finished at step 2" in r.getMessage() for r in caplog.records)
    after = {
        p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "logs" not in p.parts
    }
    assert {k: v for k, v in before.items() if k in after} == after, "a finished run's files were rewritten"
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-2"]

    # Outputs lost (say a disk cleanup): the requeue writes them again from the final checkpoint.
    shutil.rmtree(tmp_path / "unet")
    (tmp_path / lifecycle.OUTPUTS_FILE).unlink()
    run(trainer_args(tiny_sdxl, tmp_path, *argv, "--resume_from_checkpoint", "latest"))
    assert unet_file(tmp_path).read_bytes() == weights
    assert lifecycle.read_outputs_marker(tmp_path)["step"] == 2


def test_fresh_start_over_old_checkpoints_is_refused_unless_overwritten(
    tiny_sdxl, train_cache, trainer_args, tmp_path
):
    argv = ("--precomputed_dir", str(train_cache), "--max_train_steps", "2", "--no_single_file")
    run(trainer_args(tiny_sdxl, tmp_path, *argv))
    old_run = trained_state(tmp_path / "checkpoint-2")["run_id"]
    with pytest.raises(lifecycle.RunDirectoryError, match="--overwrite_output_dir"):
        run(trainer_args(tiny_sdxl, tmp_path, *argv))
    result = run(trainer_args(tiny_sdxl, tmp_path, *argv, "--overwrite_output_dir"))
    assert result["step"] == 2
    assert trained_state(tmp_path / "checkpoint-2")["run_id"] != old_run


@pytest.mark.parametrize(
    ("limit", "expected_step"), [("--max_train_steps=4", 4), ("--num_train_epochs=1", None)]
)
def test_accumulation_runs_across_epoch_ends_and_reaches_the_last_step(
    tiny_sdxl, train_cache, trainer_args, tmp_path, limit, expected_step
):
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(train_cache),
        "--gradient_accumulation_steps",
        "5",
        limit,
        "--no_single_file",
    )
    result = run(args)
    state = trained_state(sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1])
    accelerator = train_sdxl_ztsnr.make_accelerator(args)
    data = train_sdxl_ztsnr.load_training_data(args, accelerator, train_sdxl_ztsnr.base_model(args, accelerator))
    batches_per_epoch = train_sdxl_ztsnr.BucketBatchSampler(data.train_buckets, 2).batches_per_epoch
    assert batches_per_epoch % 5, "the test needs an epoch that is not a whole number of cycles"
    if expected_step is None:  # one epoch = ceil(batches / 5) updates, the last one crossing the epoch end
        expected_step = -(-batches_per_epoch // 5)
    assert result["step"] == expected_step
    assert state["step"] == expected_step, "no final checkpoint at the last step"
    micro_batches = expected_step * 5
    assert (state["epoch"], state["batch_offset"]) == divmod(micro_batches, batches_per_epoch)
    assert lifecycle.read_outputs_marker(tmp_path)["step"] == expected_step


@pytest.mark.slow
def test_max_grad_norm_zero_means_no_clipping_not_no_training(tiny_sdxl, train_cache, trainer_args, tmp_path):
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(train_cache),
        "--max_train_steps",
        "2",
        "--max_grad_norm",
        "0",
    )
    result = run(args)
    assert result["step"] == 2 and result["skipped_steps"] == 0
    trained, initial = load_file(str(unet_file(tmp_path))), load_file(str(unet_file(tiny_sdxl)))
    moved = max((trained[k] - initial[k]).abs().max().item() for k in trained)
    assert moved > 1e-4, "--max_grad_norm 0 trained nothing"


def test_non_finite_steps_are_counted_without_clipping(tiny_sdxl, train_cache, trainer_args, tmp_path):
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(train_cache),
        "--max_train_steps",
        "8",
        "--max_bad_steps",
        "2",
        "--max_grad_norm",
        "0",
        "--adam_epsilon",
        "1e-30",
        "--learning_rate",
        "1e30",
    )
    with pytest.raises(SystemExit, match="non-finite steps in a row"):
        run(args)


def test_push_uploads_no_cache_and_validation_uses_the_vae_of_the_latents(
    tiny_sdxl, demo_data, trainer_args, tmp_path, monkeypatch
):
    from sdxl_ztsnr import hub, validation

    other_vae = build_tiny_sdxl(tmp_path / "other", seed=1) / "vae"
    uploaded, validation_vaes = [], []
    real_push = hub.push_to_hub

    def dry_push(folder, repo_id, **kwargs):
        uploaded.extend(real_push(folder, repo_id, **{**kwargs, "dry_run": True}))
        return uploaded

    def record_sampling(pipeline, *args, **kwargs):
        validation_vaes.append({k: v.clone() for k, v in pipeline.vae.state_dict().items()})
        return [Image.new("RGB", (64, 64))]

    monkeypatch.setattr(hub, "push_to_hub", dry_push)
    monkeypatch.setattr(validation, "sample_images", record_sampling)  # what the validation grid samples with
    out = tmp_path / "out"
    args = trainer_args(
        tiny_sdxl,
        out,
        "--train_data_dir",
        str(demo_data),
        "--pretrained_vae_model_name_or_path",
        str(other_vae),
        "--resolution",
        "128",
        "--bucket_step",
        "32",
        "--max_train_steps",
        "1",
        "--validation_prompt",
        "solid black",
        "--push_to_hub",
        "--hub_model_id",
        "user/model",
    )
    run(args)
    assert (out / "cache" / "cache_metadata.json").is_file()
    assert uploaded and "unet/diffusion_pytorch_model.safetensors" in uploaded
    assert not [f for f in uploaded if f.startswith(("cache/", "checkpoint-")) or f == "outputs.json"]
    expected = load_file(str(other_vae / "diffusion_pytorch_model.safetensors"))
    assert validation_vaes, "validation did not sample"
    for state in validation_vaes:
        assert all(torch.equal(state[k], expected[k]) for k in expected), (
            "validation decoded with another VAE"
        )
    saved = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_held_out_rows_are_never_mirrors_of_trained_rows(tiny_sdxl, demo_data, trainer_args, tmp_path):
    cache = tmp_path / "flip-cache"
    precompute_latents.main(
        precompute_latents.parse_args(
            [
                "--train_data_dir",
                str(demo_data),
                "--model_path",
                str(tiny_sdxl),
                "--output_dir",
                str(cache),
                "--resolution",
                "128",
                "--bucket_step",
                "32",
                "--random_flip",
                "--no_progress",
                "--num_workers",
                "0",
            ]
        )  # fmt: skip
    )
    args = trainer_args(
        tiny_sdxl, tmp_path / "out", "--precomputed_dir", str(cache), "--validation_rows", "4"
    )
    accelerator = train_sdxl_ztsnr.make_accelerator(args)
    data = train_sdxl_ztsnr.load_training_data(args, accelerator, train_sdxl_ztsnr.base_model(args, accelerator))
    sources = data.dataset.with_format("arrow")["source"].to_pylist()
    held = {sources[i] for i in data.validation_ids}
    assert len(data.validation_ids) == 4 and len(held) == 2, "each held-out image brings its mirror"
    assert not held & {sources[i] for i in data.train_ids}


def test_logged_loss_is_the_mean_of_the_micro_batches_seen(
    tiny_sdxl, train_cache, trainer_args, tmp_path, monkeypatch
):
    from accelerate import Accelerator

    losses, logged = [], {}
    real_loss, real_log = train_sdxl_ztsnr.training_loss, Accelerator.log

    def recording_loss(*args, **kwargs):
        loss, mse = real_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss, mse

    def recording_log(self, values, step=None, **kwargs):
        if "loss" in values:
            logged[step] = values["loss"]
        return real_log(self, values, step=step, **kwargs)

    monkeypatch.setattr(train_sdxl_ztsnr, "training_loss", recording_loss)
    monkeypatch.setattr(Accelerator, "log", recording_log)
    args = trainer_args(
        tiny_sdxl,
        tmp_path,
        "--precomputed_dir",
        str(train_cache),
        "--max_train_steps",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--logging_steps",
        "3",
        "--checkpointing_steps",
        "3",
        "--no_single_file",
    )
    run(args)
    assert len(losses) == 8 and sorted(logged) == [3, 4]
    assert logged[3] == pytest.approx(sum(losses[:6]) / 6, rel=1e-5)
    assert logged[4] == pytest.approx(sum(losses[6:]) / 2, rel=1e-5)  # a short last window of 1 step

    # The first window after a resume counts only what it saw.
    losses.clear(), logged.clear()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "checkpoint-3", resumed / "checkpoint-3")
    args.output_dir, args.resume_from_checkpoint, args.logging_steps = str(resumed), "latest", 2
    run(args)
    assert len(losses) == 2 and sorted(logged) == [4]
    assert logged[4] == pytest.approx(sum(losses) / 2, rel=1e-5)
