"""Masked loss: where masks come from, that they follow their image's flip and crop to latent size, the
normalised weights, no gradient outside the mask, and a masked folder precomputed and trained end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_ztsnr import cache, masks, precompute
from sdxl_ztsnr.buckets import bucket_for, make_buckets
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.inputs import FolderInputs, prepare_input
from sdxl_ztsnr.losses import NoisedBatch, per_sample_mse, weighted_loss
from sdxl_ztsnr.training import training_loss

SMALL = dict(resolution=128, bucket_step=32, shard_size=8, progress=False)


def _image(path: Path, size=(96, 64), mode="RGB", value=128, caption="tag one, tag two") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _mask(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "L").save(path)
    return path


# --- discovery ------------------------------------------------------------------------------------------------


def test_mask_beside_the_image_is_its_mask_and_not_a_sample(tmp_path):
    _image(tmp_path / "a.png")
    _mask(tmp_path / "a.mask.png", np.full((64, 96), 255))
    _mask(tmp_path / "a.mask.jpg", np.full((64, 96), 255))  # a second mask of a.png: not a sample either
    _image(tmp_path / "b.jpg")
    _mask(tmp_path / "sub" / "c.MASK.webp", np.full((64, 96), 255))  # any case, any image extension
    _image(tmp_path / "sub" / "c.png")
    _image(tmp_path / "lonely.mask.png")  # no lonely.* beside it: a picture that happens to be named so
    inputs = FolderInputs(tmp_path)
    assert [inputs.source(i) for i in range(len(inputs))] == [
        "a.png",
        "b.jpg",
        "lonely.mask.png",
        "sub/c.png",
    ]
    assert {inputs.source(i): p.name for i, p in inputs.masks.items()} == {
        "a.png": "a.mask.jpg",  # of two, the first in name order
        "sub/c.png": "c.MASK.webp",
    }
    assert inputs.mask_settings()["masks"]["mask_files"] == 2  # masks of images, not mask files


def test_mask_dir_same_names_wins_and_is_never_a_sample(tmp_path):
    data = tmp_path / "data"
    _image(data / "a.png")
    _image(data / "sub" / "b.png")
    _image(data / "c.png")
    _mask(data / "a.mask.png", np.full((64, 96), 10))
    masks_dir = data / "masks"  # inside the image folder: its files must not become samples
    _mask(masks_dir / "a.jpg", np.full((64, 96), 200))
    _mask(masks_dir / "sub" / "b.png", np.full((64, 96), 200))
    inputs = FolderInputs(data, mask_dir=str(masks_dir))
    assert [inputs.source(i) for i in range(len(inputs))] == ["a.png", "c.png", "sub/b.png"]
    assert {inputs.source(i): p.relative_to(data).as_posix() for i, p in inputs.masks.items()} == {
        "a.png": "masks/a.jpg",  # mask_dir wins over a.mask.png
        "sub/b.png": "masks/sub/b.png",
    }
    with pytest.raises(UserError, match="--mask_dir .*nowhere: no such folder"):
        FolderInputs(data, mask_dir=str(tmp_path / "nowhere"))


def test_no_masks_leaves_the_settings_of_a_cache_made_before_masks(tmp_path):
    _image(tmp_path / "a.png")
    assert FolderInputs(tmp_path).mask_settings() == {}
    assert FolderInputs(tmp_path, alpha_mask=True).mask_settings()["masks"]["alpha_mask"] is True


def test_alpha_channel_is_the_mask_with_alpha_mask(tmp_path):
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[:, :48, 3] = 255  # left half opaque: trained
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    (tmp_path / "cut.txt").write_text("tag")
    _image(tmp_path / "opaque.png", mode="RGBA", value=255)  # fully opaque: no mask stored
    _image(tmp_path / "rgb.png")
    inputs = FolderInputs(tmp_path, alpha_mask=True)
    loaded = {inputs.source(i): inputs.load_masked(i, 10**8, False) for i in range(len(inputs))}
    image, mask, _, _ = loaded["cut.png"]
    assert image.mode == "RGB" and mask.mode == "L"
    assert np.array_equal(np.asarray(mask), rgba[..., 3])
    assert loaded["opaque.png"][1] is None and loaded["rgb.png"][1] is None
    assert FolderInputs(tmp_path).load_masked(0, 10**8, False)[1] is None  # without alpha_mask: none


def test_mask_file_wins_over_alpha_and_uses_the_red_channel(tmp_path):
    _image(tmp_path / "a.png", mode="RGBA", value=0)
    red = np.zeros((64, 96, 3), np.uint8)
    red[..., 0] = 77
    Image.fromarray(red).save(tmp_path / "a.mask.png")
    _, mask, _, _ = FolderInputs(tmp_path, alpha_mask=True).load_masked(0, 10**8, False)
    assert np.asarray(mask).min() == np.asarray(mask).max() == 77


def test_half_size_mask_is_resized_another_aspect_ratio_is_refused(tmp_path):
    from sdxl_ztsnr.images import BadInputError

    half = masks.fit_mask(Image.new("L", (48, 32), 255), (96, 64), "x.png")
    assert half.size == (96, 64)
    with pytest.raises(BadInputError, match="mask is 64x96 but the image is 96x64"):
        masks.fit_mask(Image.new("L", (64, 96), 255), (96, 64), "x.png")


# --- geometry -------------------------------------------------------------------------------------------------


def test_latent_mask_is_the_area_average_and_black_stays_exactly_zero():
    mask = np.zeros((16, 24), np.uint8)
    mask[:8, :8] = 255
    mask[:8, 8:16] = np.tile([255, 0], (8, 4))  # half the pixels of the block
    mask[8:, 16:] = 3
    assert masks.latent_mask(mask, 8).tolist() == [[255, 128, 0], [0, 0, 3]]
    with pytest.raises(ValueError, match="multiple"):
        masks.latent_mask(mask[:12], 8)


@pytest.mark.parametrize("flip", [False, True])
def test_mask_follows_the_flip_and_random_crop_of_its_image(tmp_path, flip):
    # The image is red where the mask is white and blue where it is black: after prepare_input each latent
    # pixel's mask must be the share of red pixels in its 8×8 block of the cropped (and mirrored) image.
    rng = np.random.default_rng(0)
    height, width = 150, 211  # off-bucket: resized and cropped on both sides
    weights = np.zeros((height, width), np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, height - 30), rng.integers(0, width - 30)
        weights[top : top + 30, left : left + 45] = 255
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = weights, 255 - weights
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("tag")
    _mask(tmp_path / "a.mask.png", weights)
    buckets = make_buckets(128, 32)
    item = prepare_input(FolderInputs(tmp_path), 0, buckets, crop="random", flip=flip, seed=3)
    assert item["skipped"] is None
    assert bucket_for(height, width, buckets) == item["samples"][0]["bucket"]
    for sample in item["samples"]:
        red = sample["pixels"][..., 0].numpy().astype(np.float32)
        bucket_h, bucket_w = sample["bucket"]
        expected = red.reshape(bucket_h // 8, 8, bucket_w // 8, 8).mean(axis=(1, 3))
        got = sample["mask"].numpy().astype(np.float32)
        assert got.shape == (bucket_h // 8, bucket_w // 8)
        assert np.abs(got - expected).max() < 20  # Lanczos image vs bilinear mask: edges differ a little
        assert 0.1 < (got > 128).mean() < 0.9  # the test image has both kinds of pixel in the crop
    if flip:
        plain, mirrored = item["samples"]
        assert not torch.equal(plain["mask"], mirrored["mask"])


# --- the loss -------------------------------------------------------------------------------------------------


def test_weights_have_mean_one_per_sample_and_a_constant_mask_is_the_plain_mse():
    loss_mask = torch.tensor([[[[0, 255], [255, 255]]], [[[7, 7], [7, 7]]]], dtype=torch.uint8)
    weights = masks.normalized_mask_weights(loss_mask)
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(2))
    assert weights[0, 0, 0, 0] == 0 and torch.allclose(weights[0, 0, 0, 1], torch.tensor(4 / 3))
    prediction, target = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    constant = torch.full((2, 1, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(
        masks.masked_per_sample_mse(prediction, target, constant), per_sample_mse(prediction, target)
    )
    masked = masks.masked_per_sample_mse(prediction, target, loss_mask)
    error = (prediction - target).pow(2)
    assert torch.allclose(masked[0], error[0, :, [0, 1, 1], [1, 0, 1]].mean())  # the three white pixels


def test_no_gradient_reaches_the_prediction_outside_the_mask():
    prediction = torch.randn(2, 4, 6, 6, requires_grad=True)
    target = torch.randn(2, 4, 6, 6)
    loss_mask = torch.full((2, 1, 6, 6), 255, dtype=torch.uint8)
    loss_mask[0, 0, :, :3] = 0  # sample 0: left half ignored; sample 1 has no mask (all 255)
    batch = NoisedBatch(torch.zeros_like(target), target, torch.full((2,), 0.5))
    loss, _ = weighted_loss(prediction, batch, "min_snr", 5.0, torch.tensor([1.0, 2.0]), loss_mask)
    loss.backward()
    grad = prediction.grad
    assert torch.count_nonzero(grad[0, :, :, :3]) == 0  # exactly zero, not merely small
    assert torch.count_nonzero(grad[0, :, :, 3:]) == grad[0, :, :, 3:].numel()
    assert torch.count_nonzero(grad[1]) == grad[1].numel()


class _PixelwiseUNet(torch.nn.Module):
    """A 1×1 convolution with the UNet's call signature: each latent pixel's prediction sees only that pixel."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs, return_dict=False):
        return (self.conv(x),)


def test_training_loss_gives_masked_out_latents_no_gradient_and_ignores_them():
    torch.manual_seed(0)
    unet = _PixelwiseUNet()
    from sdxl_ztsnr.schedule import alphas_cumprod

    alpha_bar = alphas_cumprod()
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss_mask = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    loss_mask[:, :, 2:6, 2:6] = 0
    batch = {
        "latents": latents,
        "prompt_embeds": torch.zeros(2, 77, 8),
        "pooled_prompt_embeds": torch.zeros(2, 8),
        "time_ids": torch.zeros(2, 6),
        "loss_mask": loss_mask,
    }
    timesteps, noise = torch.tensor([300, 999]), torch.randn(2, 4, 8, 8)
    loss, _ = training_loss(unet, batch, alpha_bar, timesteps=timesteps, noise=noise)
    loss.backward()
    assert torch.count_nonzero(latents.grad[:, :, 2:6, 2:6]) == 0
    assert torch.count_nonzero(latents.grad[:, :, :2]) > 0
    weight_grad = unet.conv.weight.grad.clone()
    # Whatever the masked-out latents and noise hold, the loss and the weights' gradient are the same.
    unet.zero_grad()
    changed = latents.detach().clone()
    changed[:, :, 2:6, 2:6] = 100.0
    other_noise = noise.clone()
    other_noise[:, :, 2:6, 2:6] = -7.0
    again, _ = training_loss(
        unet, {**batch, "latents": changed}, alpha_bar, timesteps=timesteps, noise=other_noise
    )
    again.backward()
    assert torch.allclose(again, loss.detach()) and torch.allclose(unet.conv.weight.grad, weight_grad)
    unmasked, _ = training_loss(
        unet,
        {**batch, "loss_mask": None, "latents": changed},
        alpha_bar,
        timesteps=timesteps,
        noise=other_noise,
    )
    assert not torch.allclose(unmasked, loss.detach())  # without the mask those pixels do count


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    from sdxl_ztsnr.text_encoding import load_text_encoders

    vae = precompute.load_vae(str(tiny_sdxl))
    tokenizers, text_encoders = load_text_encoders(tiny_sdxl)
    yield vae, tokenizers, text_encoders
    torch.set_num_threads(previous)


def _masked_folder(demo_data: Path, root: Path) -> dict[str, str]:
    """A copy of the demo data with masks beside six images, one corrupt mask and one of another aspect ratio;
    returns {image name: expected skip kind}."""
    shutil.copytree(demo_data, root)
    images = sorted(p for p in root.iterdir() if p.suffix in (".png", ".jpg"))
    for path in images[:6]:
        width, height = Image.open(path).size
        weights = np.zeros((height, width), np.uint8)
        weights[:, : width // 2] = 255  # left half trained
        _mask(path.with_name(path.stem + ".mask.png"), weights)
    corrupt, rotated = images[6], images[7]
    (root / f"{corrupt.stem}.mask.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    width, height = Image.open(rotated).size
    _mask(root / f"{rotated.stem}.mask.png", np.full((width + 40, height), 255))
    return {corrupt.name: "bad mask", rotated.name: "bad mask"}


@pytest.fixture(scope="module")
def masked_cache(demo_data, models, tmp_path_factory):
    root = tmp_path_factory.mktemp("masked") / "data"
    bad = _masked_folder(demo_data, root)
    out = root.parent / "cache"
    result = precompute.precompute(FolderInputs(root), out, *models, flip=True, **SMALL)
    return out, result, bad


def test_masked_folder_precomputes_masks_beside_latents_and_lists_bad_masks(masked_cache):
    out, result, bad = masked_cache
    assert result["status"] == "complete"
    skipped = [json.loads(line) for line in (out / cache.SKIPPED_FILE).read_text().splitlines()]
    assert {Path(s["path"]).name: s["kind"] for s in skipped} == bad
    assert any("mask" in s["reason"] and ".mask.png" in s["reason"] for s in skipped)
    dataset, metadata = cache.load_cache(out)
    assert metadata["counts"]["rows"] == 2 * (24 - 2)  # flipped copies too; no mask file became a sample
    assert metadata["counts"]["masked"] == 2 * 6
    assert metadata["settings"]["masks"]["mask_files"] == 8
    rows = cache.rows_as_tensors(dataset, range(len(dataset)))
    assert not any(".mask." in r["source"] for r in rows)
    with_mask = [r for r in rows if r["mask"] is not None]
    assert len(with_mask) == 12
    for row in with_mask:
        assert row["mask"].dtype == torch.uint8 and row["mask"].shape == row["latents"].shape[1:]
        width = row["mask"].shape[1]
        trained = row["mask"][:, : width // 2] if not row["flipped"] else row["mask"][:, width - width // 2 :]
        ignored = row["mask"][:, width - width // 2 :] if not row["flipped"] else row["mask"][:, : width // 2]
        assert (
            trained.float().mean() > 200 and ignored.float().mean() < 55
        )  # left half, mirrored when flipped


def test_masked_batches_carry_loss_mask_and_mask_less_batches_nothing(masked_cache):
    from sdxl_ztsnr.train_data import BucketBatchSampler, TrainingRows

    out, _, _ = masked_cache
    dataset, metadata = cache.load_cache(out)
    ids = np.arange(len(dataset))
    rows = TrainingRows(dataset, metadata, ids, ids[:0], torch.ones(len(dataset)), cache.load_pad_chunk(out))
    sampler = BucketBatchSampler(rows.train_buckets, 2, seed=0)
    masked_rows = {i for i, m in enumerate(dataset.with_format("arrow")["mask"].to_pylist()) if m is not None}
    stream = rows.stream(sampler, torch.device("cpu"), seed=0)
    seen_with, seen_without = 0, 0
    for (_, batch), ids_in_batch in zip(
        (next(stream) for _ in range(len(sampler))), sampler.epoch_batches(0), strict=True
    ):
        if masked_rows & set(ids_in_batch):
            assert batch["loss_mask"].shape == (2, 1, *batch["latents"].shape[2:])
            for position, row in enumerate(ids_in_batch):
                if row not in masked_rows:
                    assert (batch["loss_mask"][position] == 255).all()
            seen_with += 1
        else:
            assert "loss_mask" not in batch
            seen_without += 1
    assert seen_with and seen_without
    # A cache without the column (made before masks, or with --no_masked_loss) gives no loss_mask at all.
    plain = TrainingRows(
        dataset.remove_columns("mask"), metadata, ids, ids[:0], torch.ones(len(dataset)), rows.pad_chunk
    )
    plain_stream = plain.stream(BucketBatchSampler(plain.train_buckets, 2), torch.device("cpu"), 0)
    assert not any("loss_mask" in next(plain_stream)[1] for _ in range(len(sampler)))


def test_masked_loss_flag_refuses_a_cache_without_masks(train_cache, tiny_sdxl):
    from sdxl_ztsnr.base_model import BaseModel
    from sdxl_ztsnr.training_cache import CaptionSettings, open_training_rows

    with pytest.raises(UserError, match="--masked_loss: the cache .* holds no masks"):
        open_training_rows(
            train_cache, BaseModel(str(tiny_sdxl)), torch.device("cpu"), CaptionSettings(), None,
            masked_loss="require",
        )  # fmt: skip


def test_train_on_a_masked_folder_end_to_end(
    demo_data, tiny_sdxl, trainer_args, tmp_path, fresh_accelerate_state
):
    import train_sdxl_ztsnr

    data = tmp_path / "data"
    _masked_folder(demo_data, data)
    args = trainer_args(
        tiny_sdxl, tmp_path / "run", "--train_data_dir", str(data), "--resolution", "128", "--bucket_step", "32",
        "--max_train_steps", "2", "--validation_steps", "0", "--no_single_file", "--masked_loss",
    )  # fmt: skip
    result = train_sdxl_ztsnr.main(args)
    assert result["step"] == 2 and result["skipped_steps"] == 0
    metadata = json.loads((tmp_path / "run" / "cache" / cache.METADATA_FILE).read_text())
    assert metadata["counts"]["masked"] == 6 and metadata["counts"]["skipped_by_kind"] == {"bad mask": 2}
    assert np.isfinite(result["val_loss"])


def test_mask_flags_need_a_folder(tiny_sdxl, trainer_args, tmp_path):
    with pytest.raises(SystemExit):
        trainer_args(tiny_sdxl, tmp_path, "--precomputed_dir", str(tmp_path), "--alpha_mask")
    with pytest.raises(SystemExit):
        trainer_args(
            tiny_sdxl, tmp_path, "--precomputed_dir", str(tmp_path), "--masked_loss", "--no_masked_loss"
        )
    args = trainer_args(
        tiny_sdxl, tmp_path, "--train_data_dir", str(tmp_path), "--conditioning_data_dir", "m"
    )
    assert args.mask_dir == "m"


def test_no_masked_loss_drops_the_column_and_auto_keeps_it(masked_cache):
    from sdxl_ztsnr.training_cache import _masks_as_asked

    out, _, _ = masked_cache
    dataset, metadata = cache.load_cache(out)
    assert "mask" in _masks_as_asked(dataset, metadata, "auto", out).column_names
    assert "mask" in _masks_as_asked(dataset, metadata, "require", out).column_names
    assert "mask" not in _masks_as_asked(dataset, metadata, "ignore", out).column_names
    old = dataset.remove_columns("mask")  # a cache made before masks: no column, no "masked" count
    old_metadata = {**metadata, "counts": {k: v for k, v in metadata["counts"].items() if k != "masked"}}
    assert _masks_as_asked(old, old_metadata, "auto", out).column_names == old.column_names
    with pytest.raises(UserError, match="holds no masks"):
        _masks_as_asked(old, old_metadata, "require", out)
