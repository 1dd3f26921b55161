"""The VAE fine-tuning library: losses, discriminator, LPIPS loading, metrics, crops and keyed sampling, outputs."""

import logging
import urllib.error
from pathlib import Path

import pytest
import torch

from sdxl_ztsnr import launch, vae_data, vae_metrics, vae_training
from sdxl_ztsnr.export import VAE_PREFIX, vae_to_original_state_dict
from sdxl_ztsnr.vae_outputs import single_file_vae_state_dict


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=4,
    )


# -- metrics ------------------------------------------------------------------------------------------------


def direct_ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    """Wang et al. 2004 summed window by window (float64): Gaussian weights, valid positions, C1/C2 at range 1."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()  # (11, 11)
    c1, c2 = 0.01**2, 0.03**2
    x, y = x.double(), y.double()
    size = 2 * radius + 1
    # every valid window as a row: (B, C, positions, 121)
    xs = x.unfold(2, size, 1).unfold(3, size, 1).flatten(-2).flatten(2, 3)
    ys = y.unfold(2, size, 1).unfold(3, size, 1).flatten(-2).flatten(2, 3)
    w = w.flatten()
    mx, my = (xs * w).sum(-1), (ys * w).sum(-1)
    vx = (xs * xs * w).sum(-1) - mx**2
    vy = (ys * ys * w).sum(-1) - my**2
    cxy = (xs * ys * w).sum(-1) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2))


def noisy_pair(seed: int = 0, shape=(3, 3, 20, 26)):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g)
    b = (a + 0.15 * torch.randn(shape, generator=g)).clamp(0, 1)
    return a, b


def test_ssim_is_the_usual_definition_not_torchmetrics_padded_border():
    a, b = noisy_pair()
    ours = vae_metrics.ssim(b, a)
    torch.testing.assert_close(ours.double(), direct_ssim(b, a), atol=1e-6, rtol=0)
    # torchmetrics' own mean includes the reflection-padded border: a different number (why we crop)
    from torchmetrics.functional.image import structural_similarity_index_measure

    padded = structural_similarity_index_measure(b.double(), a.double(), data_range=1.0, reduction="none")
    assert (padded - ours.double()).abs().max() > 1e-4
    assert vae_metrics.ssim(a, a).sub(1).abs().max() < 1e-6


def test_ssim_matches_scikit_image():
    from skimage import metrics

    a, b = noisy_pair(1)
    expected = [
        metrics.structural_similarity(
            a[i].permute(1, 2, 0).double().numpy(),
            b[i].permute(1, 2, 0).double().numpy(),
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(len(a))
    ]
    torch.testing.assert_close(
        vae_metrics.ssim(b, a).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_psnr_per_image_and_too_small_images_for_ssim():
    a, b = noisy_pair(2)
    mse = (a.double() - b.double()).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(vae_metrics.psnr(b, a).double(), 10 * torch.log10(1 / mse), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="SSIM needs images larger"):
        vae_metrics.ssim(a[..., :8, :8], b[..., :8, :8])


def test_metrics_markdown_marks_missing_values_and_direction():
    table = vae_metrics.metrics_markdown(
        {"psnr": 20.0, "ssim": 0.5}, {"psnr": 21.5, "ssim": 0.6}, "fine-tuned"
    )
    assert "PSNR (higher is better)" in table and "LPIPS" not in table
    assert "| fine-tuned | 21.5000 | 0.6000 |" in table


# -- losses ------------------------------------------------------------------------------------------------------


def test_kl_matches_diffusers_posterior_and_reconstruction_losses_are_per_sample():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = torch.randn(3, 8, 4, 5)
    posterior = DiagonalGaussianDistribution(params)
    torch.testing.assert_close(vae_training.kl_divergence(posterior.mean, posterior.logvar), posterior.kl())
    x, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    y[1] = 0.5
    assert vae_training.reconstruction_loss(y, x, "mse").tolist() == [0.0, 0.25]
    assert vae_training.reconstruction_loss(y, x, "l1").tolist() == [0.0, 0.5]


def test_hinge_losses_and_adaptive_weight():
    real = torch.tensor([[2.0, 0.5]]).view(1, 1, 1, 2)
    fake = torch.tensor([[-2.0, 0.0]]).view(1, 1, 1, 2)
    # real: relu(1-2)=0, relu(1-.5)=.5 -> .25 ; fake: relu(1-2)=0, relu(1+0)=1 -> .5 ; half the sum
    assert vae_training.hinge_discriminator_loss(real, fake).item() == pytest.approx(0.375)
    assert vae_training.hinge_generator_loss(fake).item() == pytest.approx(1.0)
    rec, gan = torch.full((3, 4), 2.0), torch.full((3, 4), 0.5)
    weight = vae_training.adaptive_gan_weight(rec, gan)
    assert weight.item() == pytest.approx(rec.norm().item() / (gan.norm().item() + 1e-4))
    assert vae_training.adaptive_gan_weight(rec, torch.zeros(3, 4)).item() == vae_training.ADAPTIVE_WEIGHT_MAX


def test_patch_discriminator_scores_each_sample_alone():
    disc = vae_training.PatchDiscriminator(3, channels=16, layers=3).eval()
    x = torch.randn(3, 3, 64, 64)
    logits = disc(x)
    assert logits.shape == (3, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 patches
    torch.testing.assert_close(
        disc(x[1:2]), logits[1:2], atol=1e-5, rtol=1e-5
    )  # GroupNorm: no batch coupling


def test_only_the_decoder_side_is_trainable_by_default():
    vae = tiny_vae()
    trainable = {id(p) for p in vae_training.select_trainable(vae)}
    for name, p in vae.named_parameters():
        decoding = name.startswith(("decoder.", "post_quant_conv."))
        assert (id(p) in trainable) == decoding == p.requires_grad, name
    everything = vae_training.select_trainable(tiny_vae(), train_encoder=True)
    assert len(everything) == len(list(tiny_vae().parameters()))


def test_reconstructor_keeps_no_encoder_graph_when_frozen():
    vae = tiny_vae()
    vae_training.select_trainable(vae)
    model = vae_training.Reconstructor(vae)
    pixels, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.zeros(2, 4, 8, 8)
    reconstruction, mean, _ = model(pixels, noise)
    assert reconstruction.shape == pixels.shape and reconstruction.requires_grad and not mean.requires_grad
    # noise 0 decodes the posterior mean: what a latent cache holds
    expected = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    torch.testing.assert_close(reconstruction, expected)


def test_generator_term_puts_no_gradient_into_the_discriminator():
    from accelerate import Accelerator

    vae = tiny_vae()
    trainable = vae_training.select_trainable(vae)
    disc = vae_training.PatchDiscriminator(3, channels=8, layers=2)
    step = vae_training.VaeStep(
        Accelerator(cpu=True),
        vae_training.Reconstructor(vae),
        torch.optim.SGD(trainable, lr=0.0),
        vae_training.VaeLossSettings(perceptual_weight=0.0, gan_start_step=0),
        disc=disc,
        disc_optimizer=torch.optim.SGD(disc.parameters(), lr=0.0),
    )
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    step._frozen_disc_logits(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    logs = step(
        {"pixels": torch.rand(2, 3, 32, 32) * 2 - 1, "noise": torch.randn(2, 4, 16, 16)}, gan_active=True
    )
    assert {"loss", "rec_loss", "g_loss", "gan_weight", "d_loss"} <= set(logs)
    assert logs["gan_weight"].item() > 0


# -- LPIPS ------------------------------------------------------------------------------------------------


def test_lpips_heads_come_from_the_package_and_backbone_can_be_random():
    import lpips

    model = vae_training.load_lpips("alex", random_backbone=True)
    heads = torch.load(
        Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True
    )
    for key, value in heads.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max() < 1e-6 and (model(x, -x) > 0).all()


@pytest.mark.parametrize(
    ("net", "file"), [("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")]
)
def test_lpips_offline_names_the_file_to_place(net, file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(vae_training.LpipsWeightsMissing) as error:
        vae_training.load_lpips(net)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / file) in message
    assert "--perceptual_weight 0" in message and "URLError" in message


# -- data: crops, keyed sampling, held-out split -------------------------------------------------------------------


def test_small_images_are_upscaled_to_cover_the_crop_and_crops_stay_inside():
    from PIL import Image

    image = Image.new("RGB", (40, 20), (10, 20, 30))
    covered = vae_data.cover_resize(image, 32)
    assert min(covered.size) == 32 and covered.size[0] >= 64
    assert vae_data.cover_resize(Image.new("RGB", (100, 50)), 32).size == (100, 50)
    for seed in range(50):
        top, left = vae_data.random_crop_box(40, 70, 32, seed)
        assert 0 <= top <= 8 and 0 <= left <= 38
    assert vae_data.crop_pixels(image, 32, None).shape == (3, 32, 32)
    assert vae_data.to_model_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_two_ranks_draw_what_one_rank_with_the_whole_batch_draws():
    one = vae_data.CropBatchSampler(10, batch_size=4, seed=3)
    ranks = [vae_data.CropBatchSampler(10, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch, start, micro in ((0, 0, 0), (1, 1, 7)):
        for sampler in (one, *ranks):
            sampler.set_position(epoch, start, micro)
        whole = list(one)
        split = [a + b for a, b in zip(*(list(r) for r in ranks), strict=True)]
        assert whole == split and len(whole) == len(one) - start
    # another seed or micro-batch gives other crops
    other = vae_data.CropBatchSampler(10, batch_size=4, seed=4)
    assert [s[1] for s in next(iter(other))] != [
        s[1] for s in next(iter(vae_data.CropBatchSampler(10, 4, seed=3)))
    ]


def test_held_out_split_takes_whole_images_within_limits():
    train, held = vae_data.split_held_out(24, 8, seed=0)
    assert len(held) == 4 and not set(train) & set(held) and sorted(train + held) == list(range(24))
    assert vae_data.split_held_out(24, 8, seed=0) == (train, held)
    assert len(vae_data.split_held_out(3, 8, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="at least 2 usable images"):
        vae_data.split_held_out(1, 8, seed=0)


def test_dataset_images_are_scanned_like_folders(demo_data, tmp_path):
    import datasets

    good = [p.read_bytes() for p in sorted(demo_data.glob("*.png"))[:3]]
    rows = [{"bytes": b, "path": None} for b in good] + [
        {"bytes": good[0][: len(good[0]) // 2], "path": None}
    ]
    dataset = datasets.Dataset.from_dict({"image": rows, "text": ["a"] * 4}).cast_column(
        "image", datasets.Image()
    )
    dataset.save_to_disk(str(tmp_path / "ds"))
    images = vae_data.DatasetImages(str(tmp_path / "ds"))
    scan = vae_data.scan_images(images)
    assert scan.usable == [0, 1, 2] and all(min(s) > 0 for s in scan.sizes)
    (skipped,) = scan.skipped
    assert skipped["path"] == f"{tmp_path / 'ds'}[3]" and skipped["kind"] == "corrupt image"
    assert str(tmp_path / "ds") + "[3]" in skipped["path"] and ".img" not in skipped["reason"]
    with pytest.raises(ValueError, match="--image_column 'picture'"):
        vae_data.DatasetImages(str(tmp_path / "ds"), image_column="picture")


def test_scans_of_ranks_merge_into_one_sorted_list():
    a = vae_data.ImageScan([0, 2], [(10, 10), (12, 12)], [{"path": "b", "reason": "x", "kind": "other"}])
    b = vae_data.ImageScan([1], [(11, 11)], [{"path": "a", "reason": "y", "kind": "other"}])
    merged = vae_data.merge_scans([a, b])
    assert merged.usable == [0, 1, 2] and merged.sizes == [(10, 10), (11, 11), (12, 12)]
    assert [e["path"] for e in merged.skipped] == ["a", "b"]


# -- outputs, compile fallback --------------------------------------------------------------------------------


def test_single_file_vae_uses_the_original_layout_without_checkpoint_prefix():
    state = tiny_vae().state_dict()
    single = single_file_vae_state_dict(state)
    assert "decoder.conv_in.weight" in single and "encoder.down.0.block.0.conv1.weight" in single
    assert not any(k.startswith(VAE_PREFIX) for k in single)
    assert single["decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convs as in ldm's AttnBlock
    assert {VAE_PREFIX + k for k in single} == set(vae_to_original_state_dict(state))


def test_compile_falls_back_to_eager_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(
        launch, "compile_problem", lambda device: "InvalidCxxCompiler: No working C++ compiler found"
    )
    module = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="sdxl_ztsnr.launch"):
        assert launch.compile_or_eager(module, "cuda") is module  # a GPU machine without a C++ toolchain
    lines = [r.getMessage() for r in caplog.records if r.name == "sdxl_ztsnr.launch"]
    assert len(lines) == 1 and "running eager" in lines[0] and "C++" in lines[0]


def test_compile_on_the_cpu_runs_eager_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(launch, "compile_problem", lambda device: pytest.fail("no compile probe on the CPU"))
    module = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="sdxl_ztsnr.launch"):
        assert launch.compile_or_eager(module, "cpu") is module
    lines = [r.getMessage() for r in caplog.records if r.name == "sdxl_ztsnr.launch"]
    assert len(lines) == 1 and "eager" in lines[0]


def test_compile_problem_reports_a_broken_backend(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(torch, "compile", broken)
    problem = launch.compile_problem("cpu")
    assert problem is not None and problem.startswith("RuntimeError") and "cc is not found" in problem
