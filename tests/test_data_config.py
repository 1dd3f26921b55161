"""--data_config: the file (ours, kohya's nesting, SimpleTuner's backend JSON), its one-line errors, and one cache
holding several sources (a changed source re-encoded alone, a new one added without redoing the others)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdxl_ztsnr import cache, precompute
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.data_config import load_data_config
from sdxl_ztsnr.source_cache import precompute_sources, row_sources, source_dir
from sdxl_ztsnr.source_inputs import open_source
from sdxl_ztsnr.text_encoding import load_text_encoders

SMALL = dict(resolution=128, bucket_step=32, shard_size=8, progress=False)


def _write(tmp_path: Path, text: str, name: str = "data.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the file ---------------------------------------------------------------------------------------------------


def test_our_layout_with_general_defaults(tmp_path):
    path = _write(
        tmp_path,
        """
[general]
keep_tokens = 1
caption_dropout = 0.05

[[datasets]]
name = "main"
train_data_dir = "images"

[[datasets]]
name = "char"
train_data_dir = "/data/char"
repeats = 10
caption_prefix = "mychar, "
keep_tokens = 2
caption_from = "instance_prompt"
instance_prompt = "mychar"

[[datasets]]
name = "reg"
dataset_name = "user/reg-images"
caption_column = "caption"
is_regularisation = true
prior_loss_weight = 0.5
resolution = 768
""",
    )
    config = load_data_config(path)
    main, char, reg = config.sources
    assert main.train_data_dir == str(tmp_path / "images")  # relative to the config file
    assert (main.keep_tokens, main.caption_dropout, main.repeats) == (1, 0.05, 1)
    assert (char.repeats, char.keep_tokens, char.caption_prefix, char.caption_from) == (
        10,
        2,
        "mychar, ",
        "instance_prompt",
    )
    assert (reg.kind, reg.caption_column, reg.loss_weight, reg.resolution) == ("dataset", "caption", 0.5, 768)
    assert main.loss_weight == 1.0 and config.online_captions


def test_kohya_nesting_maps_to_our_keys(tmp_path):
    path = _write(
        tmp_path,
        """
[general]
shuffle_caption = true
caption_extension = ".caption"
enable_bucket = true

[[datasets]]
resolution = [1024, 1024]
batch_size = 4
keep_tokens = 2
bucket_reso_steps = 64

  [[datasets.subsets]]
  image_dir = "hoge"
  class_tokens = "hoge girl"
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  image_dir = "reg"
  class_tokens = "girl"
  keep_tokens = 1
  caption_dropout_rate = 0.1
  caption_tag_dropout_rate = 0.2
""",
    )
    config = load_data_config(path)
    hoge, reg = config.sources
    assert (hoge.name, hoge.repeats, hoge.instance_prompt, hoge.keep_tokens) == ("hoge", 10, "hoge girl", 2)
    assert (hoge.shuffle_tags, hoge.caption_extension, hoge.resolution, hoge.bucket_step) == (
        True,
        ".caption",
        1024,
        64,
    )
    assert (reg.is_regularisation, reg.keep_tokens, reg.caption_dropout, reg.tag_dropout) == (
        True,
        1,
        0.1,
        0.2,
    )
    assert any("enable_bucket ignored" in n for n in config.notes)
    assert any("batch_size ignored" in n for n in config.notes)


def test_simpletuner_backend_json(tmp_path):
    backends = [
        {
            "id": "subject",
            "type": "local",
            "instance_data_dir": "subject",
            "caption_strategy": "instanceprompt",
            "instance_prompt": "sks dog",
            "repeats": 9,
            "resolution": 1024,
            "resolution_type": "pixel_area",
            "crop": False,
            "cache_dir_vae": "cache/vae/subject",
        },
        {
            "id": "reg",
            "type": "local",
            "instance_data_dir": "reg",
            "caption_strategy": "filename",
            "is_regularisation_data": True,
            "repeats": 0,
        },
        {
            "id": "text-embeds",
            "dataset_type": "text_embeds",
            "default": True,
            "type": "local",
            "cache_dir": "x",
        },
    ]
    path = _write(tmp_path, json.dumps(backends), "multidatabackend.json")
    config = load_data_config(path)
    subject, reg = config.sources
    assert (subject.name, subject.repeats, subject.caption_from, subject.instance_prompt) == (
        "subject",
        10,  # SimpleTuner's repeats count extra passes
        "instance_prompt",
        "sks dog",
    )
    assert (reg.repeats, reg.caption_from, reg.is_regularisation) == (1, "filename", True)
    assert any("text_embeds" in n for n in config.notes)


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            '[[datasets]]\ntrain_data_dir = "a"\nrepeat = 3\n',
            r"datasets\[0\]: repeat: unknown key; did you mean 'repeats'",
        ),
        (
            '[[datasets]]\ntrain_data_dir = "a"\n[[datasets]]\ntrain_data_dir = "b"\nnum_repeat = 2\n',
            r"datasets\[1\]: num_repeat: unknown key; did you mean 'num_repeats'",
        ),
        (
            '[[datasets]]\ntrain_data_dir = "a"\nrepeats = 0\n',
            r"datasets\[0\]: repeats: 0 must be at least 1",
        ),
        (
            '[[datasets]]\ntrain_data_dir = "a"\nrepeats = "3"\n',
            r"datasets\[0\]: repeats: '3' is not a whole",
        ),
        (
            '[[datasets]]\ntrain_data_dir = "a"\ntag_dropout = 1.5\n',
            r"datasets\[0\]: tag_dropout: 1.5 must be in",
        ),
        ("[[datasets]]\nrepeats = 2\n", r"datasets\[0\]: train_data_dir: give exactly one of"),
        (
            '[[datasets]]\ntrain_data_dir = "a"\n[[datasets]]\ntrain_data_dir = "a"\n',
            r"datasets\[1\]: name: 'a' is also the name of .*datasets\[0\]",
        ),
        (
            '[[datasets]]\ntrain_data_dir = "a"\nweight = 2\n[[datasets]]\ntrain_data_dir = "b"\n',
            r"datasets\[1\]: weight: missing",
        ),
        (
            '[[datasets]]\ntrain_data_dir = "a"\ncaption_from = "instance_prompt"\n',
            r"datasets\[0\]: caption_from: \"instance_prompt\" needs instance_prompt",
        ),
        (
            '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nflip_aug = true\n',
            r"datasets\[0\]\.subsets\[0\]: flip_aug: not supported here: .*--random_flip",
        ),
        ('[[datasets]]\nname = "a/b"\ntrain_data_dir = "a"\n', r"datasets\[0\]: name: 'a/b'"),
        ('[[datasets]]\ntrain_data_dir = "a"\nresolution = [768, 512]\n', r"resolution: \[768, 512\]"),
        ("[genral]\nx = 1\n", r"genral: unknown table .*did you mean 'general'"),
        ('[[datasets]]\ntrain_data_dir = "a"\nis_regularisation = true\n', r"every source is regularisation"),
    ],
)
def test_bad_config_is_one_line_naming_file_table_and_key(tmp_path, body, expected):
    path = _write(tmp_path, body)
    with pytest.raises(UserError, match=expected) as error:
        load_data_config(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message


def test_simpletuner_errors_name_the_entry(tmp_path):
    path = _write(
        tmp_path, json.dumps([{"id": "x", "instance_data_dir": "a", "caption_strategy": "parquet"}]), "b.json"
    )
    with pytest.raises(UserError, match=r"b\.json: \[0\]: caption_strategy: 'parquet'"):
        load_data_config(path)
    path = _write(tmp_path, json.dumps([{"id": "x", "instance_data_dir": "a", "repats": 2}]), "c.json")
    with pytest.raises(UserError, match=r"\[0\]: repats: unknown or unsupported key; did you mean 'repeats'"):
        load_data_config(path)


# --- one cache, several sources ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    vae = precompute.load_vae(str(tiny_sdxl))
    tokenizers, text_encoders = load_text_encoders(tiny_sdxl)
    yield vae, tokenizers, text_encoders
    torch.set_num_threads(previous)


def split_demo(demo_data: Path, root: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """Copies of the demo images (and captions) in one folder per source, `sizes` images each."""
    images = sorted(p for p in demo_data.iterdir() if p.suffix != ".txt")
    folders, start = {}, 0
    for name, size in sizes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for image in images[start : start + size]:
            shutil.copy(image, folder / image.name)
            shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
        folders[name], start = folder, start + size
    return folders


def _run(config_path: Path, out: Path, models, **extra) -> dict:
    config = load_data_config(config_path)
    return precompute_sources(
        config,
        out,
        lambda inputs, directory, **kw: precompute.precompute(inputs, directory, *models, **kw),
        lambda source: open_source(source, config.path),
        **{**SMALL, **extra},
    )


def _arrow_files(out: Path, name: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in source_dir(out, name).rglob("*.arrow")}


def test_sources_in_one_cache_changed_alone_and_added(demo_data, models, tmp_path):
    folders = split_demo(demo_data, tmp_path / "data", {"main": 10, "char": 4, "extra": 3})
    (folders["char"] / sorted(folders["char"].glob("*.txt"))[0].name).write_text(
        "red hair, smile\nblue hair\n"
    )
    two = f"""
[[datasets]]
name = "main"
train_data_dir = "{folders["main"]}"

[[datasets]]
name = "char"
train_data_dir = "{folders["char"]}"
repeats = 5
caption_prefix = "mychar, "
"""
    out = tmp_path / "cache"
    result = _run(_write(tmp_path, two), out, models)
    assert result["status"] == "complete"
    dataset, metadata = cache.load_cache(out)
    names, index = row_sources(metadata, len(dataset))
    assert names == ["main", "char"] and index.tolist() == [0] * 10 + [1] * 4
    assert [(e["name"], e["rows"], e["inputs"]) for e in metadata["sources"]] == [
        ("main", 10, 10),
        ("char", 4, 4),
    ]
    rows = dataset.select_columns(["source", "prompt"]).to_list()
    assert all(r["source"].startswith("main/") for r in rows[:10]) and all(
        r["source"].startswith("char/") for r in rows[10:]
    )
    assert all(r["prompt"].startswith("mychar, ") for r in rows[10:])
    prompts = [r["prompt"] for r in rows[10:]]
    assert "mychar, red hair, smile\nmychar, blue hair" in prompts  # one caption per line
    # with cached text the first line is what is encoded (the others need --text_online)
    from sdxl_ztsnr.text_encoding import encode_prompts

    row = next(i for i, r in enumerate(rows) if "\n" in r["prompt"])
    stored = cache.rows_as_tensors(dataset, [row])[0]["pooled_prompt_embeds"].float()
    first, both = (
        encode_prompts([p], *models[1:], 3)[1][0] for p in ("mychar, red hair, smile", rows[row]["prompt"])
    )
    torch.testing.assert_close(stored, first, atol=2e-3, rtol=0)
    assert not torch.allclose(stored, both, atol=2e-3)

    # Training-time settings (repeats) change nothing on disk; an encoding setting re-encodes that source alone.
    main_files = _arrow_files(out, "main")
    assert (
        _run(_write(tmp_path, two.replace("repeats = 5", "repeats = 2")), out, models)["status"]
        == "already complete"
    )
    changed = two.replace('caption_prefix = "mychar, "', 'caption_prefix = "otherchar, "')
    assert _run(_write(tmp_path, changed), out, models)["status"] == "complete"
    assert _arrow_files(out, "main") == main_files
    dataset, _ = cache.load_cache(out)
    assert all(p.startswith("otherchar, ") for p in dataset["prompt"][10:])

    # A new source: encoded and merged; the others untouched.
    char_files = _arrow_files(out, "char")
    three = changed + f'\n[[datasets]]\nname = "extra"\ntrain_data_dir = "{folders["extra"]}"\n'
    _run(_write(tmp_path, three), out, models)
    assert _arrow_files(out, "main") == main_files and _arrow_files(out, "char") == char_files
    dataset, metadata = cache.load_cache(out)
    assert len(dataset) == 17 and [e["name"] for e in metadata["sources"]] == ["main", "char", "extra"]
    assert [e["first_row"] for e in metadata["sources"]] == [0, 10, 14]


def test_bad_images_of_one_source_are_skipped_and_counted_by_source(demo_data, models, tmp_path):
    folders = split_demo(demo_data, tmp_path / "data", {"main": 4, "other": 3})
    (folders["other"] / "broken.png").write_bytes(b"not an image")
    (folders["other"] / "broken.txt").write_text("tag")
    (folders["main"] / "nocaption.png").write_bytes((next(folders["main"].glob("*.png"))).read_bytes())
    path = _write(
        tmp_path,
        f'[[datasets]]\nname = "main"\ntrain_data_dir = "{folders["main"]}"\n'
        f'[[datasets]]\nname = "other"\ntrain_data_dir = "{folders["other"]}"\n',
    )
    out = tmp_path / "cache"
    _run(path, out, models)
    _, metadata = cache.load_cache(out)
    by_name = {e["name"]: e for e in metadata["sources"]}
    assert (by_name["main"]["rows"], by_name["main"]["skipped"]) == (4, 1)
    assert (by_name["other"]["rows"], by_name["other"]["skipped"]) == (3, 1)
    assert by_name["other"]["skipped_files"] == ["other/broken.png"]  # no folder of this machine
    skipped = [json.loads(line) for line in (out / cache.SKIPPED_FILE).read_text().splitlines()]
    assert sorted((s["source_name"], Path(s["path"]).name) for s in skipped) == [
        ("main", "nocaption.png"),
        ("other", "broken.png"),
    ]


def test_caption_from_filename_and_instance_prompt_fallback(demo_data, models, tmp_path):
    folders = split_demo(demo_data, tmp_path / "data", {"named": 2, "db": 2})
    image = sorted(folders["named"].glob("*.png"))[0]
    image.rename(folders["named"] / "blue_sky_over_sea.png")
    caption = sorted(folders["db"].glob("*.txt"))[0]
    caption.unlink()  # kohya's class_tokens stand in for a missing caption file
    path = _write(
        tmp_path,
        f'[[datasets]]\nname = "named"\ntrain_data_dir = "{folders["named"]}"\ncaption_from = "filename"\n'
        f'[[datasets]]\nname = "db"\ntrain_data_dir = "{folders["db"]}"\nclass_tokens = "sks dog"\n',
    )
    out = tmp_path / "cache"
    _run(path, out, models)
    dataset, metadata = cache.load_cache(out)
    prompts = dict(zip(dataset["source"], dataset["prompt"], strict=True))
    assert prompts["named/blue_sky_over_sea.png"] == "blue sky over sea"
    assert (
        prompts[f"db/{caption.stem}.png"] == "sks dog" or prompts.get(f"db/{caption.stem}.jpg") == "sks dog"
    )
    assert metadata["counts"]["skipped"] == 0


def test_two_processes_build_the_cache_one_process_builds(demo_data, models, tiny_sdxl, tmp_path):
    import os
    import subprocess
    import sys

    folders = split_demo(demo_data, tmp_path / "data", {"main": 12, "char": 5})
    path = _write(
        tmp_path,
        f'[[datasets]]\nname = "main"\ntrain_data_dir = "{folders["main"]}"\n'
        f'[[datasets]]\nname = "char"\ntrain_data_dir = "{folders["char"]}"\nrepeats = 4\n',
    )
    single = tmp_path / "single"
    _run(path, single, models)
    out = tmp_path / "two"
    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", str(repo / "precompute_latents.py"),
        "--data_config", str(path), "--model_path", str(tiny_sdxl), "--output_dir", str(out),
        "--resolution", "128", "--bucket_step", "32", "--shard_size", "8", "--num_workers", "0", "--no_progress",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "source char: 5 rows from 5 inputs" in done.stdout
    (got, got_meta), (want, want_meta) = cache.load_cache(out), cache.load_cache(single)
    assert got["source"] == want["source"] and got["prompt"] == want["prompt"]
    assert [(e["name"], e["first_row"], e["rows"]) for e in got_meta["sources"]] == [
        (e["name"], e["first_row"], e["rows"]) for e in want_meta["sources"]
    ]
    a, b = cache.rows_as_tensors(got, range(len(got))), cache.rows_as_tensors(want, range(len(want)))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x["latents"], y["latents"], rtol=0, atol=1e-3)


def test_mask_keys_reach_the_folder_source(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    path = _write(
        tmp_path,
        f'[[datasets]]\nimage_dir = "{folder}"\nconditioning_data_dir = "masks"\nalpha_mask = true\n',
    )
    source = load_data_config(path).sources[0]  # kohya's spellings
    assert source.mask_dir == str(tmp_path / "masks") and source.alpha_mask
    seen = {}

    class MaskFolder:  # stands in for FolderInputs: the keys are passed through
        kind = "folder"

        def __init__(self, root, mask_dir=None, alpha_mask=False):
            seen.update(root=root, mask_dir=mask_dir, alpha_mask=alpha_mask)

    monkeypatch.setattr("sdxl_ztsnr.source_inputs.FolderInputs", MaskFolder)
    open_source(source, str(path))
    assert seen == {"root": str(folder), "mask_dir": str(tmp_path / "masks"), "alpha_mask": True}


def test_a_masked_source_beside_unmasked_ones_in_one_cache(demo_data, models, tmp_path):
    import numpy as np
    from PIL import Image

    folders = split_demo(demo_data, tmp_path / "data", {"plain": 3, "masked": 3})
    image = sorted(p for p in folders["masked"].iterdir() if p.suffix != ".txt")[0]
    with Image.open(image) as pixels:
        size = pixels.size
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, : size[0] // 2] = 255  # the left half trains
    Image.fromarray(mask).save(folders["masked"] / f"{image.stem}.mask.png")
    body = f'[[datasets]]\nname = "plain"\ntrain_data_dir = "{folders["plain"]}"\n' + (
        f'[[datasets]]\nname = "masked"\ntrain_data_dir = "{folders["masked"]}"\n'
    )
    out = tmp_path / "cache"
    _run(_write(tmp_path, body), out, models)
    dataset, metadata = cache.load_cache(out)
    assert metadata["counts"]["masked"] == 1 and len(dataset) == 6  # the mask file is no sample
    masks = dict(zip(dataset["source"], dataset["mask"], strict=True))
    assert [s for s, m in masks.items() if m is not None] == [f"masked/{image.name}"]
    # a mask file added later re-encodes that source alone
    plain_files = _arrow_files(out, "plain")
    other = sorted(p for p in folders["masked"].iterdir() if p.suffix != ".txt" and ".mask" not in p.name)[1]
    with Image.open(other) as pixels:
        Image.fromarray(np.full((pixels.size[1], pixels.size[0]), 255, np.uint8)).save(
            folders["masked"] / f"{other.stem}.mask.png"
        )
    _run(_write(tmp_path, body), out, models)
    assert _arrow_files(out, "plain") == plain_files
    assert cache.load_cache(out)[1]["counts"]["masked"] == 2


def test_a_streamed_webdataset_source_beside_a_folder(demo_data, models, tmp_path):
    import io
    import tarfile

    from PIL import Image

    folders = split_demo(demo_data, tmp_path / "data", {"main": 4, "stream": 5})
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:  # key.jpg + key.txt, as img2dataset writes them
        for i, image in enumerate(sorted(p for p in folders["stream"].iterdir() if p.suffix != ".txt")):
            buffer = io.BytesIO()
            with Image.open(image) as pixels:
                pixels.convert("RGB").save(buffer, "JPEG", quality=95)
            for name, data in (
                (f"{i:06d}.jpg", buffer.getvalue()),
                (f"{i:06d}.txt", image.with_suffix(".txt").read_bytes()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = _write(
        tmp_path,
        f'[[datasets]]\nname = "main"\ntrain_data_dir = "{folders["main"]}"\n'
        f'[[datasets]]\nname = "web"\ndataset_name = "webdataset"\nstreaming = true\n'
        f'data_files = ["{shards}/{{00000..00000}}.tar"]\nrepeats = 2\n',
    )
    out = tmp_path / "cache"
    _run(path, out, models)
    dataset, metadata = cache.load_cache(out)
    assert [(e["name"], e["rows"]) for e in metadata["sources"]] == [("main", 4), ("web", 5)]
    assert all(s.startswith("web/00000.tar/") for s in dataset["source"][4:])
