import math
import random

import pytest
from PIL import Image

from sdxl_ztsnr.buckets import bucket_for, make_buckets, resize_to_bucket

CONFIGS = [(1024, 64), (768, 64), (128, 32)]


@pytest.mark.parametrize("resolution,step", CONFIGS)
def test_buckets_respect_area_step_and_bounds(resolution, step):
    buckets = make_buckets(resolution, step)
    min_side, max_side = resolution // 2, resolution * 2
    assert len(buckets) >= 3
    assert buckets == sorted(set(buckets))
    for height, width in buckets:
        assert height * width <= resolution**2
        assert height % step == 0 and width % step == 0
        assert min_side <= height <= max_side and min_side <= width <= max_side
        assert (width, height) in buckets
    assert (resolution, resolution) in buckets


def test_buckets_are_the_largest_fitting_side():
    buckets = make_buckets(1024, 64)
    for height, width in buckets:
        # Either the other side is at max_side already or one more step would exceed the area.
        assert (
            height == 2048
            or (height + 64) * width > 1024**2
            or width == 2048
            or height * (width + 64) > 1024**2
        )
    assert (2048, 512) in buckets and (512, 2048) in buckets
    assert (1216, 832) in buckets  # the familiar SDXL 832x1216 portrait bucket


def test_bucket_sides_for_the_tiny_test_config():
    sides = {s for bucket in make_buckets(128, 32) for s in bucket}
    assert min(sides) == 64 and max(sides) == 256


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(resolution=1024, step=96),  # does not divide
        dict(resolution=1024, step=64, min_side=500),  # not a multiple
        dict(resolution=1024, step=64, min_side=1088),  # square impossible
        dict(resolution=1024, step=64, min_side=1024, max_side=512),
        dict(resolution=0, step=64),
    ],
)
def test_make_buckets_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        make_buckets(**kwargs)


@pytest.mark.parametrize("resolution,step", CONFIGS)
def test_bucket_for_is_nearest_in_log_aspect(resolution, step):
    buckets = make_buckets(resolution, step)
    rng = random.Random(0)
    for _ in range(300):
        height, width = rng.randint(16, 5000), rng.randint(16, 5000)
        chosen = bucket_for(height, width, buckets)
        assert chosen in buckets

        image_log_aspect = math.log(height / width)
        distances = {b: abs(image_log_aspect - math.log(b[0] / b[1])) for b in buckets}
        assert distances[chosen] == pytest.approx(min(distances.values()), abs=1e-12)


def test_bucket_for_exact_and_ties():
    buckets = make_buckets(1024, 64)
    assert bucket_for(3000, 3000, buckets) == (1024, 1024)
    assert bucket_for(832 * 3, 1216 * 3, buckets) == (832, 1216)
    # Equal aspect ratios: the larger area wins whatever the order.
    assert bucket_for(100, 100, [(512, 512), (1024, 1024), (768, 768)]) == (1024, 1024)
    # An image exactly between two buckets in log aspect (2:1 between 1:1 and 4:1) takes the larger area.
    assert bucket_for(200, 100, [(100, 100), (400, 100)]) == (400, 100)
    assert bucket_for(200, 100, [(400, 100), (100, 100)]) == (400, 100)
    assert bucket_for(200, 100, [(160, 40), (100, 100)]) == (100, 100)
    with pytest.raises(ValueError):
        bucket_for(0, 10, buckets)
    with pytest.raises(ValueError):
        bucket_for(10, 10, [])


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (1000, 90), (257, 129)])
@pytest.mark.parametrize("crop", ["center", "random"])
def test_resize_to_bucket_size_and_offsets(size, crop):
    buckets = make_buckets(128, 32)
    image = Image.new("RGB", size, (10, 200, 30))
    bucket = bucket_for(size[1], size[0], buckets)
    out, (top, left) = resize_to_bucket(image, bucket, crop=crop, rng=random.Random(1))
    assert out.size == (bucket[1], bucket[0])  # PIL is (width, height)
    scale = max(bucket[0] / size[1], bucket[1] / size[0])
    resized_w, resized_h = max(bucket[1], round(size[0] * scale)), max(bucket[0], round(size[1] * scale))
    assert 0 <= top <= resized_h - bucket[0]
    assert 0 <= left <= resized_w - bucket[1]
    assert top == 0 or left == 0  # resize to cover: only one side has spare pixels


def test_center_crop_picks_the_middle():
    # Left third red, middle third green, right third blue: a center crop of a square keeps green.
    image = Image.new("RGB", (300, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (100 * i, 0, 100 * (i + 1), 100))
    out, (top, left) = resize_to_bucket(image, (100, 100), crop="center")
    assert (top, left) == (0, 100)
    assert out.getpixel((50, 50)) == (0, 255, 0)


def test_random_crop_is_deterministic_by_seed():
    image = Image.new("RGB", (640, 128))

    def offsets(seed):
        rng = random.Random(seed)
        return [resize_to_bucket(image, (64, 64), "random", rng)[1] for _ in range(5)]

    assert offsets(3) == offsets(3)
    assert offsets(3) != offsets(4)
    many = {resize_to_bucket(image, (64, 64), "random", random.Random(s))[1] for s in range(20)}
    assert len(many) > 1  # the offset does vary across seeds
    assert all(top == 0 and 0 <= left <= 320 - 64 for top, left in many)


def test_random_crop_without_rng_fails():
    with pytest.raises(ValueError, match="rng"):
        resize_to_bucket(Image.new("RGB", (10, 20)), (64, 64), crop="random")
    with pytest.raises(ValueError, match="crop"):
        resize_to_bucket(Image.new("RGB", (10, 20)), (64, 64), crop="left")
