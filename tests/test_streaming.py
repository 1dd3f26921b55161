"""Streamed precompute from WebDataset tar shards (as img2dataset writes them) on the tiny model: one rank and
simulated ranks equal a folder run over the same images, kill -9 and resume, bad images and unreadable tars."""

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_precompute import _load_script, _script  # the script runners the folder tests use

from sdxl_ztsnr import cache, precompute
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.streaming_inputs import RankStream, StreamingInputs, expand_braces
from sdxl_ztsnr.text_encoding import load_text_encoders

SMALL = dict(resolution=128, bucket_step=32, progress=False)
CORRUPT = 12  # example 12 (in the second tar) is a truncated JPEG
TAR_SLICES = ((0, 8), (8, 17), (17, 25))  # 25 examples in three tars of unequal size
PATTERN = "shards/{00000..00002}.tar"


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    vae = precompute.load_vae(str(tiny_sdxl))
    tokenizers, text_encoders = load_text_encoders(tiny_sdxl)
    yield vae, tokenizers, text_encoders
    torch.set_num_threads(previous)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory, demo_data):
    """The demo images as JPEGs plus one truncated JPEG, twice: WebDataset tars (key.jpg, key.txt, key.json as
    img2dataset writes them) under shards/, and a plain folder of the same bytes (key.jpg + key.txt)."""
    root = tmp_path_factory.mktemp("webdataset")
    (root / "shards").mkdir()
    (root / "folder").mkdir()
    images = sorted(p for p in demo_data.iterdir() if p.suffix != ".txt")
    examples = []
    for path in images:
        buffer = io.BytesIO()
        with Image.open(path) as image:
            image.convert("RGB").save(buffer, "JPEG", quality=95)
        examples.append((buffer.getvalue(), path.with_suffix(".txt").read_text(encoding="utf-8")))
    examples.insert(CORRUPT, (examples[0][0][:300], "1girl, broken"))
    for i, (data, caption) in enumerate(examples):
        (root / "folder" / f"{i:06d}.jpg").write_bytes(data)
        (root / "folder" / f"{i:06d}.txt").write_text(caption, encoding="utf-8")
    for number, (start, stop) in enumerate(TAR_SLICES):
        with tarfile.open(root / "shards" / f"{number:05d}.tar", "w") as tar:
            for i in range(start, stop):
                data, caption = examples[i]
                meta = {"key": f"{i:06d}", "caption": caption, "status": "success", "url": f"http://x/{i}"}
                _add(tar, f"{i:06d}.jpg", data)
                _add(tar, f"{i:06d}.txt", caption.encode("utf-8"))
                _add(tar, f"{i:06d}.json", json.dumps(meta).encode("utf-8"))
    return root


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory, webdataset, models):
    """The non-streaming reference: the same images as a folder."""
    out = tmp_path_factory.mktemp("folder_cache")
    precompute.precompute(precompute.FolderInputs(webdataset / "folder"), out, *models, shard_size=8, **SMALL)
    return out


def _stream(root: Path) -> StreamingInputs:
    return StreamingInputs("webdataset", str(root / PATTERN))


def _rows_by_key(cache_dir: Path) -> dict:
    """Rows keyed by (example key, flipped): '000003.jpg' in the folder run and '00000.tar/000003' streamed."""
    dataset = cache.load_cache(cache_dir)[0]
    rows = cache.rows_as_tensors(dataset, range(len(dataset)))
    return {(Path(r["source"]).stem, r["flipped"]): r for r in rows}


def _assert_same_rows(got_dir: Path, want_dir: Path) -> None:
    got, want = _rows_by_key(got_dir), _rows_by_key(want_dir)
    assert got.keys() == want.keys() and len(got) == 24
    for key, row in want.items():
        torch.testing.assert_close(got[key]["latents"], row["latents"], rtol=0, atol=1e-3)
        torch.testing.assert_close(got[key]["prompt_embeds"], row["prompt_embeds"], rtol=0, atol=1e-3)
        for name in ("original_size", "crop_top_left", "bucket"):
            assert got[key][name].tolist() == row[name].tolist()
        assert got[key]["tags"] == row["tags"]


def test_expand_braces():
    assert expand_braces("s/{00008..00011}.tar") == [
        "s/00008.tar",
        "s/00009.tar",
        "s/00010.tar",
        "s/00011.tar",
    ]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain/*.tar") == ["plain/*.tar"]


def test_one_rank_stream_equals_folder_run(webdataset, folder_cache, models, tmp_path):
    out = tmp_path / "cache"
    # Shards of 5 examples cut across the tars' boundaries.
    result = precompute.precompute(_stream(webdataset), out, *models, shard_size=5, **SMALL)
    assert result["status"] == "complete" and result["run"]["inputs"] == 25
    _assert_same_rows(out, folder_cache)
    skipped = [json.loads(line) for line in (out / cache.SKIPPED_FILE).read_text().splitlines()]
    assert [(s["path"], s["kind"]) for s in skipped] == [(f"00001.tar/{CORRUPT:06d}", "corrupt image")]
    metadata = cache.load_cache(out)[1]
    settings = metadata["settings"]
    assert settings["stream_dataset_name"] == "webdataset" and settings["stream_num_data_files"] == 3
    assert settings["stream_world_size"] == 1 and settings["input_kind"] == "stream"
    assert metadata["input"]["data_files"] == [str(webdataset / PATTERN)]
    assert metadata["counts"]["inputs"] == 25 and metadata["counts"]["shards"] == 6  # 5 full + 1 empty last
    # A finished streamed cache is left alone.
    again = precompute.precompute(_stream(webdataset), out, *models, shard_size=5, **SMALL)
    assert again["status"] == "already complete"


@pytest.mark.parametrize("world_size", [2, 4])  # 3 files: whole files per rank (2), every rank reads all (4)
def test_simulated_ranks_equal_folder_run(webdataset, folder_cache, models, tmp_path, world_size):
    inputs = _stream(webdataset)
    assert inputs.strategy(world_size) == ("shards" if world_size == 2 else "examples")
    out = tmp_path / "cache"
    counts = {}
    for rank in reversed(range(world_size)):  # rank 0 last: it merges once every rank marked its last shard
        result = precompute.precompute(
            inputs, out, *models, shard_size=4, rank=rank, world_size=world_size, **SMALL
        )
        counts[rank] = result["run"]["inputs"]
    assert result["status"] == "complete"
    _assert_same_rows(out, folder_cache)
    if world_size == 2:
        assert counts == {0: 16, 1: 9}  # rank 0 read the first and third tar, rank 1 the second
        # The split depends on the number of processes: another number is refused, naming it.
        with pytest.raises(ValueError, match=r"(?s)stream_world_size: cache has 2, expected 1.*--overwrite"):
            precompute.precompute(_stream(webdataset), out, *models, shard_size=4, **SMALL)
    else:
        assert sorted(counts.values()) == [6, 6, 6, 7]
    skipped = (out / cache.SKIPPED_FILE).read_text().splitlines()
    assert len(skipped) == 1 and f"{CORRUPT:06d}" in skipped[0]


@pytest.mark.slow
def test_kill_9_then_resume_skips_finished_shards(webdataset, folder_cache, tiny_sdxl, tmp_path):
    out = tmp_path / "cache"
    common = [
        "--dataset_name", "webdataset", "--streaming", "--data_files", PATTERN, "--model_path", str(tiny_sdxl),
        "--output_dir", str(out), "--resolution", "128", "--bucket_step", "32", "--shard_size", "5",
        "--num_workers", "0", "--no_progress",
    ]  # fmt: skip
    # Killed after the second shard was saved under its .tmp name, before the rename: one shard finished.
    killed = _script([*common, "--_debug_kill_at", "shard_saved_tmp:2"], webdataset)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(cache.completed_shards(out)) == [0]
    state = json.loads((cache.shard_dir(out, 0) / cache.SHARD_SUMMARY_FILE).read_text())["stream_state"]
    assert state  # where the stream stood after the shard's last example
    # The same command finishes the cache (in this process; decoding in a worker process this time) and
    # reads only what was not finished: 25 − 5 examples.
    script = _load_script()
    cwd = os.getcwd()
    os.chdir(webdataset)  # the relative --data_files pattern, as the killed run saw it
    try:
        args = script.parse_args([*common, "--num_workers", "1"])
        result = script.main(args)
    finally:
        os.chdir(cwd)
    assert result["status"] == "complete"
    assert result["run"]["inputs"] == 20 and result["run"]["shards_resumed"] == 1
    assert not (cache.shard_dir(out, 1).with_name("shard-00001.tmp")).exists()
    _assert_same_rows(out, folder_cache)


def _copy_tar(source: Path, target: Path, change) -> None:
    """Copy a tar member by member, `change(name, data)` returning the new data (or None to stop there)."""
    with tarfile.open(source) as reader, tarfile.open(target, "w") as writer:
        for member in reader.getmembers():
            data = change(member.name, reader.extractfile(member).read())
            if data is None:
                return
            _add(writer, member.name, data)


def test_unreadable_tar_is_reported_and_the_stream_goes_on(webdataset, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for number in range(3):
        (shards / f"{number:05d}.tar").write_bytes((webdataset / "shards" / f"{number:05d}.tar").read_bytes())
    # The second tar is cut inside its fourth example; the third holds a caption that is not UTF-8.
    data = (shards / "00001.tar").read_bytes()
    with tarfile.open(shards / "00001.tar") as tar:
        cut = tar.getmembers()[9].offset_data + 10
    (shards / "00001.tar").write_bytes(data[:cut])
    latin1 = lambda name, data: "café".encode("latin-1") if name == "000019.txt" else data  # noqa: E731
    _copy_tar(webdataset / "shards" / "00002.tar", shards / "00002.tar.new", latin1)
    os.replace(shards / "00002.tar.new", shards / "00002.tar")
    inputs = StreamingInputs("webdataset", str(shards / "{00000..00002}.tar"))
    stream = RankStream(inputs, rank=0, world_size=1)
    keys = []
    while (example := stream.next()) is not None:
        keys.append(example["__key__"])
    assert keys == [f"{i:06d}" for i in [*range(0, 11), 17, 18]]  # up to the cut, then up to the bad caption
    errors = stream.take_errors()
    assert [Path(e["path"]).name for e in errors] == ["00001.tar", "00002.tar"]
    assert "ReadError" in errors[0]["reason"] and "UnicodeDecodeError" in errors[1]["reason"]
    assert all("rest of this file is skipped" in e["reason"] for e in errors)


def test_resume_state_skips_to_the_file_it_ended_in(webdataset):
    inputs = _stream(webdataset)
    stream = RankStream(inputs, 0, 1)
    for _ in range(10):
        stream.next()
    state = stream.state()
    resumed = RankStream(inputs, 0, 1, state)
    assert resumed.next()["__key__"] == "000010"


def test_bad_columns_and_flags(webdataset, tiny_sdxl):
    with pytest.raises(ValueError, match=r"--image_column 'image_png'.*columns: \['jpg'"):
        StreamingInputs("webdataset", str(webdataset / PATTERN), image_column="image_png")
    with pytest.raises(UserError, match="--dataset_name webdataset --streaming --data_files"):
        StreamingInputs("webdataset", str(webdataset / "missing-{0..1}.tar"))
    script = _load_script()
    base = ["--model_path", str(tiny_sdxl), "--output_dir", "out"]
    for bad in (
        ["--data_dir", "d", "--streaming"],
        ["--dataset_name", "webdataset", "--data_files", "a.tar"],  # without --streaming
    ):
        with pytest.raises(SystemExit):
            script.parse_args([*base, *bad])
    args = script.parse_args(
        [*base, "--dataset_name", "webdataset", "--streaming", "--data_files", "a.tar", "b"]
    )
    assert args.data_files == ["a.tar", "b"]


def test_json_caption_when_no_txt(tmp_path):
    """img2dataset without a caption column writes the caption into key.json only."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, "PNG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(2):
            _add(tar, f"{i:06d}.png", buffer.getvalue())
            _add(tar, f"{i:06d}.json", json.dumps({"caption": f"tag{i}, solo"}).encode())
    inputs = StreamingInputs("webdataset", str(tmp_path / "00000.tar"))
    assert inputs.image_columns == ["png"] and inputs.caption_column == "json"
    example = RankStream(inputs, 0, 1).next()
    image, caption = inputs.cells(example)
    assert caption == "tag0, solo" and image["bytes"] == buffer.getvalue()
