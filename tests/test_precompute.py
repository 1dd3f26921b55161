"""End-to-end precompute on the tiny model: demo data, every bad and special input, two simulated ranks,
kill -9 and resume, settings checks, HF dataset inputs, out-of-memory halving and the Hub staging."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_ztsnr import cache, precompute
from sdxl_ztsnr.buckets import resize_to_bucket
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.tags import load_tag_frequencies, tag_frequencies
from sdxl_ztsnr.text_encoding import CHUNK_LENGTH, load_text_encoders

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(resolution=128, bucket_step=32, shard_size=8, progress=False)  # buckets with sides 64..256


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # toy models: one thread is fastest on a busy 2-core machine
    vae = precompute.load_vae(str(tiny_sdxl))
    tokenizers, text_encoders = load_text_encoders(tiny_sdxl)
    yield vae, tokenizers, text_encoders
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, demo_data, models):
    """An uninterrupted single-rank run over the demo data (the reference for the other tests)."""
    out = tmp_path_factory.mktemp("demo_cache")
    result = precompute.precompute(precompute.FolderInputs(demo_data), out, *models, **SMALL)
    return out, result


def _rows_by_key(dataset) -> dict:
    rows = cache.rows_as_tensors(dataset, range(len(dataset)))
    return {(r["source"], r["flipped"]): r for r in rows}


def test_demo_data_end_to_end(demo_cache, demo_data, models):
    out, result = demo_cache
    vae, _, text_encoders = models
    assert result["status"] == "complete"
    dataset = datasets.load_from_disk(str(out))  # the plain datasets API works on the cache dir
    assert len(dataset) == 24
    required = {"latents", "prompt_embeds", "pooled_prompt_embeds", "original_size", "crop_top_left"}
    assert required | {"target_size", "bucket", "tags", "source"} <= set(dataset.column_names)
    dataset, metadata = cache.load_cache(out, expected={"resolution": 128, "text_online": False})
    hidden = sum(e.config.hidden_size for e in text_encoders)
    rows = cache.rows_as_tensors(dataset, range(len(dataset)))
    assert sorted(r["source"] for r in rows) == sorted(
        p.name for p in demo_data.glob("*") if p.suffix != ".txt"
    )
    for row in rows:
        h, w = row["bucket"].tolist()
        assert row["latents"].shape == (4, h // 8, w // 8) and row["latents"].dtype == torch.float16
        assert row["prompt_embeds"].shape[1] == hidden and row["prompt_embeds"].shape[0] % CHUNK_LENGTH == 0
        assert row["pooled_prompt_embeds"].shape == (text_encoders[1].config.projection_dim,)
        assert row["target_size"].tolist() == [h, w]
        with Image.open(demo_data / row["source"]) as image:
            assert row["original_size"].tolist() == [image.height, image.width]  # height first
        assert row["tags"] == [
            t.strip() for t in (demo_data / row["source"]).with_suffix(".txt").read_text().split(",")
        ]
    # A row's latents equal an independent encode of the same crop (pixel layout, range, scaling). A textured,
    # non-square image: flat ones sit at GroupNorm's variance ~ 0, where float rounding is amplified.
    row = next(r for r in rows if "stripes" in r["source"] and r["bucket"].tolist() != [128, 128])
    with Image.open(demo_data / row["source"]) as image:
        cropped, crop = resize_to_bucket(image.convert("RGB"), tuple(row["bucket"].tolist()))
    assert list(crop) == row["crop_top_left"].tolist()
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(row["latents"].float(), expected[0], rtol=0, atol=2e-3)
    # Latent statistics in the metadata are torch's mean/std over every stored latent.
    per_channel = torch.cat([r["latents"].double().reshape(4, -1) for r in rows], dim=1)
    torch.testing.assert_close(
        torch.tensor(metadata["latents_mean"], dtype=torch.float64),
        per_channel.mean(1),
        rtol=1e-9,
        atol=1e-12,
    )
    torch.testing.assert_close(
        torch.tensor(metadata["latents_std"], dtype=torch.float64), per_channel.std(1), rtol=1e-9, atol=1e-12
    )
    # Tag frequencies over the dataset; the pad chunk for batching prompts of different lengths.
    assert load_tag_frequencies(out / cache.TAG_FREQUENCIES_FILE) == tag_frequencies(r["tags"] for r in rows)
    assert cache.load_pad_chunk(out).shape == (CHUNK_LENGTH, hidden)
    assert (out / cache.SKIPPED_FILE).read_text() == ""
    assert metadata["counts"]["rows"] == 24 and metadata["settings"]["vae_dtype"] == "float32"


def test_finished_cache_is_left_alone_and_other_settings_refused(demo_cache, demo_data, models):
    out, _ = demo_cache
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = precompute.precompute(precompute.FolderInputs(demo_data), out, *models, **SMALL)
    assert again["status"] == "already complete"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(ValueError, match=r"(?s)resolution: cache has 128, expected 256.*--overwrite"):
        precompute.precompute(
            precompute.FolderInputs(demo_data), out, *models, **{**SMALL, "resolution": 256}
        )
    with pytest.raises(ValueError, match="max_token_chunks"):
        cache.load_cache(out, expected={"max_token_chunks": 2})


def test_two_ranks_equal_one_rank(demo_cache, demo_data, models, tmp_path):
    reference, _ = demo_cache
    inputs = precompute.FolderInputs(demo_data)
    # Rank 1 first: it writes its shards and leaves; rank 0 writes its own, sees all shards done and merges.
    first = precompute.precompute(inputs, tmp_path, *models, rank=1, world_size=2, **SMALL)
    assert first["status"] == "rank done" and sorted(cache.completed_shards(tmp_path)) == [1]
    second = precompute.precompute(inputs, tmp_path, *models, rank=0, world_size=2, **SMALL)
    assert second["status"] == "complete"
    got, metadata = cache.load_cache(tmp_path)
    want, want_metadata = cache.load_cache(reference)
    got_rows, want_rows = _rows_by_key(got), _rows_by_key(want)
    assert got_rows.keys() == want_rows.keys() and len(got) == len(want)
    for key, row in want_rows.items():
        assert torch.equal(got_rows[key]["latents"], row["latents"])
        assert torch.equal(got_rows[key]["prompt_embeds"], row["prompt_embeds"])
    torch.testing.assert_close(
        torch.tensor(metadata["latents_std"]), torch.tensor(want_metadata["latents_std"])
    )


def _write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width×height (a decompression bomb's signature) over a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _bad_and_special_folder(root: Path) -> tuple[dict[str, str], set[str]]:
    """Writes every bad input ({source: expected skip kind}) and every odd-but-valid image (set of sources)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))

    def caption(image_rel: str, text: bytes = b"1girl, solo") -> None:
        (root / image_rel).with_suffix(".txt").write_bytes(text)

    bad = {
        "zero_bytes.png": "empty file",
        "truncated.jpg": "corrupt image",
        "not_an_image.png": "not an image",
        "no_caption.png": "missing caption",
        "empty_caption.png": "empty caption",
        "latin1_caption.png": "caption not UTF-8",
        "bomb.png": "decompression bomb",
    }
    (root / "zero_bytes.png").write_bytes(b"")
    noise.save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "full.jpg").unlink()
    (root / "not_an_image.png").write_text("this is a text file with an image extension\n")
    for name in ("no_caption.png", "empty_caption.png", "latin1_caption.png"):
        noise.save(root / name)
    _write_png_header_only(root / "bomb.png", 60000, 60000)
    for name in bad:
        if name != "no_caption.png":
            caption(name)
    caption("empty_caption.png", b"  \r\n , ,\n")
    caption("latin1_caption.png", "café, crème brûlée".encode("latin-1"))

    special = {}
    special["cmyk.jpg"] = Image.new("CMYK", (96, 128), (0, 200, 200, 0))
    sixteen = (np.linspace(0, 65535, 128 * 96).reshape(128, 96)).astype(np.uint16)
    special["sixteen_bit.png"] = Image.fromarray(sixteen)
    palette = Image.new("P", (128, 128), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (32, 32, 96, 96))
    special["palette_transparent.png"] = palette
    special["grayscale.png"] = Image.fromarray(rng.integers(0, 256, (128, 160), dtype=np.uint8))
    rgba = np.concatenate([rng.integers(0, 256, (128, 128, 3)), np.full((128, 128, 1), 100)], axis=2)
    special["rgba.png"] = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    special["UPPER.JPG"] = noise.resize((160, 96))
    special["Shout.PNG"] = noise
    special["sub dir/ünï cödé 画像 x.png"] = noise
    special["tiny_20x24.png"] = noise.resize((24, 20))
    for name, image in special.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"transparency": 0} if name.startswith("palette") else {}
        image.save(root / name, **kwargs)
        caption(name, "\ufefftag one,  tag two ,\r\n".encode())
    rotated = Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8))  # stored 160 wide, 96 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: shown 96 wide, 160 high
    rotated.save(root / "exif_rotated.jpg", exif=exif)
    caption("exif_rotated.jpg")
    return bad, set(special) | {"exif_rotated.jpg"}


def test_bad_and_special_inputs_end_to_end(models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bad, good = _bad_and_special_folder(data)
    out = tmp_path / "cache"
    result = precompute.precompute(precompute.FolderInputs(data), out, *models, **SMALL)
    assert result["status"] == "complete"
    skipped = [
        json.loads(line) for line in (out / cache.SKIPPED_FILE).read_text(encoding="utf-8").splitlines()
    ]
    assert {Path(s["path"]).name: s["kind"] for s in skipped} == bad
    assert all(s["reason"] for s in skipped)
    dataset, metadata = cache.load_cache(out)
    rows = {r["source"]: r for r in cache.rows_as_tensors(dataset, range(len(dataset)))}
    assert set(rows) == good
    assert metadata["counts"]["skipped"] == len(bad) and metadata["counts"]["rows"] == len(good)
    assert metadata["counts"]["upscaled"] >= 1  # the 20x24 image
    assert rows["exif_rotated.jpg"]["original_size"].tolist() == [160, 96]  # orientation applied first
    assert rows["exif_rotated.jpg"]["bucket"].tolist() == [160, 96]
    assert rows["sub dir/ünï cödé 画像 x.png"]["tags"] == ["tag one", "tag two"]  # BOM, CR, spaces, empties
    for row in rows.values():
        assert torch.isfinite(row["latents"].float()).all()
    # The same folder with --min_image_side skips the small image instead of upscaling it.
    strict = precompute.precompute(
        precompute.FolderInputs(data), tmp_path / "strict", *models, min_image_side=32, **SMALL
    )
    assert strict["metadata"]["counts"]["skipped_by_kind"]["too small"] == 1


def test_all_inputs_bad_fails_clearly(models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"")
    (data / "a.txt").write_text("tag")
    (data / "b.jpg").write_text("not a jpeg")
    with pytest.raises(
        cache.NoUsableInputsError, match=r"every one of the 2 inputs was skipped.*skipped.jsonl"
    ):
        precompute.precompute(precompute.FolderInputs(data), tmp_path / "out", *models, **SMALL)
    assert len((tmp_path / "out" / cache.SKIPPED_FILE).read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="no .png"):
        precompute.FolderInputs(tmp_path / "out")


def _script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "precompute_latents.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("precompute_latents", REPO / "precompute_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kill_9_then_resume_equals_uninterrupted(demo_cache, demo_data, tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "cache"
    common = [
        "--data_dir", str(demo_data), "--model_path", str(tiny_sdxl), "--output_dir", str(out),
        "--resolution", "128", "--bucket_step", "32", "--shard_size", "8", "--num_workers", "0", "--no_progress",
    ]  # fmt: skip
    # Killed after shard 1 was saved under its .tmp name, before the rename.
    killed = _script([*common, "--_debug_kill_at", "shard_saved_tmp:2"], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(cache.completed_shards(out)) == [0]
    assert (out / "shards" / "shard-00001.tmp").is_dir()
    # Killed again in the merge, after the dataset files but before the metadata.
    killed = _script([*common, "--_debug_kill_at", "merge_data_written:1"], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / cache.METADATA_FILE).exists()
    # The same command finishes the cache (in this process, to save a start-up); publishing is checked
    # without network (dry run), with a decoding worker process this time.
    publish = ["--push_to_hub", "--hub_repo_id", "user/cache", "--hub_dry_run", "--num_workers", "1"]
    script = _load_script()
    assert script.main(script.parse_args([*common, *publish]))["status"] == "complete"
    printed = capsys.readouterr().out
    assert "would upload to dataset repo user/cache" in printed
    assert "data/train-00000-of-00001.parquet" in printed and "skipped.jsonl" not in printed
    assert not (out / "shards" / "shard-00001.tmp").exists()
    got, want = _rows_by_key(cache.load_cache(out)[0]), _rows_by_key(cache.load_cache(demo_cache[0])[0])
    assert got.keys() == want.keys() and len(got) == 24
    for key, row in want.items():
        torch.testing.assert_close(got[key]["latents"], row["latents"], rtol=0, atol=1e-3)
        assert got[key]["crop_top_left"].tolist() == row["crop_top_left"].tolist()


def test_hub_staging_loads_back(demo_cache, tmp_path):
    files = cache.stage_for_hub(demo_cache[0], tmp_path)
    assert {"README.md", cache.METADATA_FILE, cache.TAG_FREQUENCIES_FILE, cache.PAD_CHUNK_FILE} <= set(files)
    assert cache.SKIPPED_FILE not in files and not any(f.startswith("shards") for f in files)
    hub_view = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "data" / "*.parquet"), split="train"
    )
    local = datasets.load_from_disk(str(demo_cache[0]))
    assert hub_view.features == local.features and len(hub_view) == len(local)
    assert np.array_equal(
        hub_view.with_format("numpy")[3]["latents"], local.with_format("numpy")[3]["latents"]
    )


def test_dataset_inputs_text_online_flip_and_random_crop(demo_data, models, tmp_path):
    sources = sorted(p for p in demo_data.iterdir() if p.suffix != ".txt")[
        4:10
    ]  # stripes, noise, ...: asymmetric
    table = {
        "image": [str(p) for p in sources] + [str(sources[0])],
        "text": [p.with_suffix(".txt").read_text() for p in sources] + [None],
    }
    saved = tmp_path / "hf_dataset"
    datasets.Dataset.from_dict(table).cast_column("image", datasets.Image()).save_to_disk(str(saved))
    inputs = precompute.DatasetInputs(str(saved), image_column="image", caption_column="text")
    vae = models[0]
    options = {**SMALL, "crop": "random", "flip": True, "seed": 3}
    result = precompute.precompute(inputs, tmp_path / "cache", vae, **options)  # no encoders: --text_online
    dataset, metadata = cache.load_cache(tmp_path / "cache")
    assert "prompt_embeds" not in dataset.column_names and metadata["settings"]["text_online"]
    assert metadata["pad_chunk"] is None
    assert result["metadata"]["counts"] == {**result["metadata"]["counts"], "rows": 12, "skipped": 1}
    rows = _rows_by_key(dataset)
    assert {s for s, _ in rows} == {f"{saved}[{i}]" for i in range(6)}
    for source, _ in rows:
        plain, mirrored = rows[(source, False)], rows[(source, True)]
        assert plain["bucket"].tolist() == mirrored["bucket"].tolist()
    noise = f"{saved}[{[p.name for p in sources].index('007_noise.jpg')}]"
    assert (rows[(noise, False)]["latents"] - rows[(noise, True)]["latents"]).abs().max() > 1e-3
    # Random crops are drawn per image from the seed: a second run crops the same way.
    rerun = precompute.precompute(inputs, tmp_path / "cache2", vae, **options)
    assert rerun["status"] == "complete"
    again = _rows_by_key(cache.load_cache(tmp_path / "cache2")[0])
    assert all(again[k]["crop_top_left"].tolist() == rows[k]["crop_top_left"].tolist() for k in rows)
    with pytest.raises(ValueError, match="--caption_column 'caption'"):
        precompute.DatasetInputs(str(saved), caption_column="caption")


def test_imagefolder_dataset(demo_data, models, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = []
    for path in sorted(p for p in demo_data.iterdir() if p.suffix == ".png")[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
        lines.append(json.dumps({"file_name": path.name, "text": path.with_suffix(".txt").read_text()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    inputs = precompute.DatasetInputs(str(folder))
    result = precompute.precompute(inputs, tmp_path / "cache", models[0], **SMALL)
    assert result["metadata"]["counts"]["rows"] == 4


def test_out_of_memory_halves_the_batch():
    calls = []

    def fake_encode(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        if len(batch) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return batch * 2

    batch = torch.arange(10.0)
    out, working = precompute.encode_with_oom_retry(fake_encode, batch, batch_size=8)
    assert torch.equal(out, batch * 2) and working == 2
    assert calls[:3] == [8, 4, 2]
    with pytest.raises(torch.OutOfMemoryError):
        precompute.encode_with_oom_retry(lambda b: fake_encode(b.repeat(4)), batch, batch_size=2)


def test_out_of_memory_inside_a_run_loses_nothing(demo_cache, demo_data, models, tmp_path, monkeypatch):
    real = precompute.vae_latents

    def small_memory(vae, pixels):
        if len(pixels) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(vae, pixels)

    monkeypatch.setattr(precompute, "vae_latents", small_memory)
    result = precompute.precompute(precompute.FolderInputs(demo_data), tmp_path, *models, **SMALL)
    assert result["metadata"]["counts"]["rows"] == 24
    got, want = _rows_by_key(cache.load_cache(tmp_path)[0]), _rows_by_key(cache.load_cache(demo_cache[0])[0])
    for key, row in want.items():
        torch.testing.assert_close(got[key]["latents"], row["latents"], rtol=0, atol=1e-3)


def test_skip_kind_ignores_paths():
    assert cache.skip_kind("missing caption file /data/utf-8 truncated/x.txt") == "missing caption"
    assert (
        cache.skip_kind("cannot decode image (truncated or corrupt): broken data stream") == "corrupt image"
    )
    assert cache.skip_kind("something new") == "other"


def test_script_aliases_and_finished_cache(demo_cache, demo_data, tiny_sdxl, capsys):
    script = _load_script()
    out = demo_cache[0]
    argv = ["--data_dir", str(demo_data), "--model_path", str(tiny_sdxl), "--output_dir", str(out)]
    argv += ["--resolution", "128", "--bucket_step", "32", "--shard_size", "8", "--num_workers", "0"]
    args = script.parse_args(argv)
    assert args.train_data_dir == str(demo_data) and args.pretrained_model_name_or_path == str(tiny_sdxl)
    assert script.main(args)["status"] == "already complete"
    assert "cache already complete: 24 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.parse_args(["--model_path", "m", "--output_dir", "o"])  # no input given


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU launch; on GPUs the same path runs with NCCL")
def test_accelerate_launch_two_processes(demo_cache, demo_data, tiny_sdxl, tmp_path):
    out = tmp_path / "cache"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", str(REPO / "precompute_latents.py"),
        "--data_dir", str(demo_data), "--model_path", str(tiny_sdxl), "--output_dir", str(out),
        "--resolution", "128", "--bucket_step", "32", "--shard_size", "8", "--num_workers", "0", "--no_progress",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(int(n) for n in re.findall(r"this process: (\d+) inputs", done.stdout)) == [8, 16]
    got, want = _rows_by_key(cache.load_cache(out)[0]), _rows_by_key(cache.load_cache(demo_cache[0])[0])
    assert got.keys() == want.keys()
    for key, row in want.items():
        torch.testing.assert_close(got[key]["latents"], row["latents"], rtol=0, atol=1e-3)


def test_fp16_refused_for_a_vae_that_forces_upcast(tiny_sdxl):
    with pytest.raises(ValueError, match="force_upcast"):
        precompute.load_vae(str(tiny_sdxl), torch.float16)
    assert precompute.load_vae(str(tiny_sdxl), torch.bfloat16).dtype == torch.bfloat16


def _memory_mapped(dataset) -> bool:
    """Every block of the dataset's table is a memory-mapped arrow file (nothing read into RAM)."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    table = dataset.data
    blocks = [b for row in table.blocks for b in row] if isinstance(table, ConcatenationTable) else [table]
    return all(isinstance(b, MemoryMappedTable) for b in blocks)


def test_open_cache_local_staged_and_hub_id(demo_cache, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    local, local_metadata, side = cache.open_cache(demo_cache[0])
    assert side == demo_cache[0] and _memory_mapped(local)
    # A folder laid out for the Hub (parquet): converted to arrow once, then memory-mapped like a local cache.
    staged = tmp_path / "staged"
    cache.stage_for_hub(demo_cache[0], staged)
    dataset, metadata, side = cache.open_cache(staged, expected={"resolution": 128})
    assert side == staged and metadata == local_metadata
    assert _memory_mapped(dataset)
    assert all(Path(f["filename"]).is_relative_to(tmp_path / "hf_datasets") for f in dataset.cache_files)
    got = cache.rows_as_tensors(dataset, range(len(dataset)))
    want = cache.rows_as_tensors(local, range(len(local)))
    assert [r["source"] for r in got] == [r["source"] for r in want]
    assert all(torch.equal(g["prompt_embeds"], w["prompt_embeds"]) for g, w in zip(got, want, strict=True))
    assert torch.equal(cache.load_pad_chunk(side), cache.load_pad_chunk(demo_cache[0]))
    assert load_tag_frequencies(side / cache.TAG_FREQUENCIES_FILE) == load_tag_frequencies(
        demo_cache[0] / cache.TAG_FREQUENCIES_FILE
    )
    with pytest.raises(ValueError, match="max_token_chunks: cache has 3, expected 2"):
        cache.open_cache(staged, expected={"max_token_chunks": 2})
    # A Hub dataset id: fetched with snapshot_download (mocked: no network in tests), then opened the same way.
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(staged)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dataset, metadata, side = cache.open_cache("user/sdxl-cache", revision="v1", token="hf_x")
    assert side == staged and len(dataset) == len(local) and metadata == local_metadata
    repo_id, kwargs = calls[0]
    assert repo_id == "user/sdxl-cache" and kwargs["repo_type"] == "dataset"
    assert kwargs["revision"] == "v1" and kwargs["token"] == "hf_x"
    assert "data/*.parquet" in kwargs["allow_patterns"] and cache.SKIPPED_FILE not in kwargs["allow_patterns"]


def test_open_cache_missing_id_offline_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match=r"nobody-here/no-such-cache: no local directory.*Hub") as error:
        cache.open_cache("nobody-here/no-such-cache")  # tests run with HF_HUB_OFFLINE=1
    assert "\n" not in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)
    with pytest.raises(UserError, match="no such directory, and not a Hub dataset id"):
        cache.open_cache(str(tmp_path / "not" / "there"))
