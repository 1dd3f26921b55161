"""Single-file SDXL bases: our export and other writers' files load back exactly, with their schedule."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdxl_ztsnr.base_schedule import BaseSchedule, read_base_schedule, scheduler_config_for
from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.export import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    original_state_dict,
    save_single_file,
)
from sdxl_ztsnr.single_file import (
    SOURCE_RECORD,
    as_diffusers_dir,
    file_schedule,
    load_single_file,
    materialize_as_diffusers_dir,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def trained(tiny_sdxl):
    """The tiny model's four state dicts with every float perturbed: loading the config dir's own weights back
    cannot pass for reading the file."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    generator = torch.Generator().manual_seed(3)
    return {
        name: {
            k: v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in getattr(pipe, name).state_dict().items()
        }
        for name in COMPONENTS
    }


def assert_same_weights(base, expected: dict, dtype: torch.dtype | None = None, names=COMPONENTS):
    """Every key of each model equal in dtype and value to `expected` (floats cast to `dtype` when given)."""
    for name in names:
        got = getattr(base, name).state_dict()
        assert set(got) == set(expected[name]), name
        for key, want in expected[name].items():
            if dtype is not None and want.is_floating_point():
                want = want.to(dtype)
            assert got[key].dtype == want.dtype and torch.equal(got[key], want), (name, key)


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(UserError) as raised:
        call()
    text = str(raised.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# ---------------------------------------------------------------------------------------------------------------
# Round trip and other writers' files


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_our_export_loads_back_bit_exact(tiny_sdxl, trained, tmp_path, dtype):
    path = save_single_file(tmp_path / "model.safetensors", *trained.values(), dtype=dtype)
    base = load_single_file(path, tiny_sdxl)
    assert_same_weights(base, trained, dtype)
    assert base.schedule == BaseSchedule("v_prediction", True, "marker tensor v_pred, marker tensor ztsnr")
    assert base.borrowed == ()
    # What export adds and no diffusers model holds: CLIP-L's position_ids, open_clip's logit_scale, the markers.
    assert set(base.ignored_keys) == {
        CLIP_L_PREFIX + "text_model.embeddings.position_ids",
        CLIP_G_PREFIX + "logit_scale",
        "v_pred",
        "ztsnr",
    }
    # dtype= casts: the fp32 load of an fp16 file holds the fp16 values.
    if dtype is not None:
        cast = load_single_file(path, tiny_sdxl, dtype=torch.float32, components=("unet",))
        assert cast.vae is None and cast.tokenizer is None
        want = {k: v.to(dtype).float() for k, v in trained["unet"].items()}
        assert all(torch.equal(cast.unet.state_dict()[k], v) for k, v in want.items())


def test_fp8_file_loads_cast_to_the_asked_dtype(tiny_sdxl, trained, tmp_path):
    """ComfyUI saves fp8 (e4m3) checkpoints; dtype= brings them to a dtype the models compute in."""
    path = save_single_file(tmp_path / "fp8.safetensors", *trained.values(), dtype=torch.float8_e4m3fn)
    base = load_single_file(path, tiny_sdxl, dtype=torch.float32, components=("unet", "text_encoder_2"))
    fp8 = {name: {k: v.to(torch.float8_e4m3fn).float() for k, v in trained[name].items()} for name in trained}
    assert_same_weights(base, fp8, names=("unet", "text_encoder_2"))


def _other_writers_file(trained, path, metadata):
    """The tiny model as kohya / ComfyUI / A1111 saves write it: bf16 weights with an fp32 VAE, no CLIP-L
    position_ids (kohya on recent transformers), ComfyUI's stray clip_g position_ids, VAE attention as linears
    (some converters), an EMA and sgm's `denoiser.sigmas`, and no marker tensors."""
    sd = original_state_dict(*trained.values(), v_pred=False, ztsnr=False)
    sd.pop(CLIP_L_PREFIX + "text_model.embeddings.position_ids")
    sd[CLIP_G_PREFIX + "transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors = {}
    for key, tensor in sd.items():
        if key.startswith(VAE_PREFIX) and ".mid.attn_1." in key and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        if tensor.is_floating_point() and not key.startswith(VAE_PREFIX):
            tensor = tensor.to(torch.bfloat16)
        tensors[key] = tensor.contiguous()
    tensors["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.diffusion_modelout2weight"] = tensors[UNET_PREFIX + "out.2.weight"].clone()
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_other_writers_file_loads_the_same_weights(tiny_sdxl, trained, tmp_path):
    kohya = {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True", "ss_sd_model_name": "base"}
    path = _other_writers_file(trained, tmp_path / "kohya.safetensors", kohya)
    base = load_single_file(path, tiny_sdxl)
    bf16 = {name: {k: v.to(torch.bfloat16) for k, v in sd.items()} for name, sd in trained.items()}
    assert_same_weights(base, {**bf16, "vae": trained["vae"]})
    assert base.schedule.prediction_type == "v_prediction" and base.schedule.zero_terminal_snr
    assert "ss_v_parameterization=True" in base.schedule.source
    assert base.scheduler_config["prediction_type"] == "v_prediction"
    assert base.scheduler_config["rescale_betas_zero_snr"] is True
    assert base.scheduler_config["timestep_spacing"] == "trailing"
    assert {"denoiser.sigmas", "model_ema.decay", "model_ema.diffusion_modelout2weight"} <= set(
        base.ignored_keys
    )


def test_eps_base_gets_an_eps_scheduler_and_samples(tiny_sdxl, trained, tmp_path):
    from sdxl_ztsnr.sampling import generate

    path = save_single_file(
        tmp_path / "eps.safetensors", *trained.values(), v_pred=False, ztsnr=False, dtype=None
    )
    base = load_single_file(path, tiny_sdxl)
    assert base.schedule == BaseSchedule("epsilon", False, "metadata modelspec.prediction_type=epsilon")
    assert base.schedule.label == "ε"
    pipeline = base.pipeline()
    config = pipeline.scheduler.config
    # The tiny config dir is ZTSNR: an ε base goes back to SDXL's own schedule and spacing.
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "epsilon",
        False,
        "leading",
    )
    (image,) = generate(pipeline, ["cat"], [""], [0], height=64, width=64, num_steps=2)
    assert image.size == (64, 64)


def test_a_file_without_vae_borrows_the_config_dirs_and_says_so(tiny_sdxl, trained, tmp_path):
    sd = original_state_dict(*trained.values())
    path = tmp_path / "no_vae.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith(VAE_PREFIX)}, str(path))
    base = load_single_file(path, tiny_sdxl)
    assert base.borrowed == ("vae",)
    from diffusers import AutoencoderKL

    own = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").state_dict()
    assert_same_weights(base, {**trained, "vae": own})
    # A config dir without VAE weights cannot stand in: one line that says what to pass.
    bare = tmp_path / "configs"
    shutil.copytree(tiny_sdxl, bare)
    for weights in (bare / "vae").glob("*.safetensors"):
        weights.unlink()
    one_line_error(lambda: load_single_file(path, bare), str(path), "no VAE weights", "--config DIR")


def test_materialized_directory_loads_with_from_pretrained_and_is_reused(tiny_sdxl, trained, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = save_single_file(tmp_path / "model.safetensors", *trained.values(), dtype=torch.float16)
    out = materialize_as_diffusers_dir(path, tiny_sdxl, tmp_path / "base")
    record = json.loads((out / SOURCE_RECORD).read_text())
    assert record["prediction_type"] == "v_prediction" and record["zero_terminal_snr"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(out, dtype=torch.float16)
    assert_same_weights(pipe, trained, torch.float16)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    stamp = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert materialize_as_diffusers_dir(path, tiny_sdxl, out) == out
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".base.tmp-*"))
    one_line_error(lambda: materialize_as_diffusers_dir(path, tiny_sdxl, tiny_sdxl), "is not a conversion of")


def test_as_diffusers_dir_passes_directories_and_caches_files_by_content(
    tiny_sdxl, trained, tmp_path, monkeypatch
):
    monkeypatch.setenv("SDXL_ZTSNR_CACHE", str(tmp_path / "cache"))
    assert as_diffusers_dir(tiny_sdxl) == str(tiny_sdxl)
    assert as_diffusers_dir("owner/hub-model") == "owner/hub-model"
    path = save_single_file(tmp_path / "a.safetensors", *trained.values(), dtype=torch.float16)
    copy = shutil.copy(path, tmp_path / "b.safetensors")
    out = as_diffusers_dir(path, tiny_sdxl)
    assert out.startswith(str(tmp_path / "cache" / "a-")) and (Path(out) / SOURCE_RECORD).is_file()
    assert as_diffusers_dir(copy, tiny_sdxl) != out  # another name: another folder, same content
    save_single_file(path, *trained.values(), dtype=torch.bfloat16)  # the file changes: a new conversion
    assert as_diffusers_dir(path, tiny_sdxl) != out


# ---------------------------------------------------------------------------------------------------------------
# Prediction type and schedule


@pytest.mark.parametrize(
    ("keys", "metadata", "expected"),
    [
        ({"v_pred", "ztsnr"}, {}, ("v_prediction", True, "marker tensor v_pred, marker tensor ztsnr")),
        ({"v_pred"}, {}, ("v_prediction", False, "marker tensor v_pred")),
        ({"v_pred"}, {"modelspec.prediction_type": "epsilon"}, ("v_prediction", False, "over metadata")),
        (set(), {"modelspec.prediction_type": "v"}, ("v_prediction", False, "modelspec.prediction_type=v")),
        (set(), {"modelspec.predict_key": "epsilon"}, ("epsilon", False, "modelspec.predict_key=epsilon")),
        (
            set(),
            {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"},
            ("v_prediction", True, "ss_zero_terminal_snr=True"),
        ),
        (set(), {"ss_v_parameterization": "False"}, ("epsilon", False, "ss_v_parameterization=False")),
        (set(), {"ss_zero_terminal_snr": "True"}, ("epsilon", False, "default")),
        ({"ztsnr"}, {}, ("epsilon", False, "ztsnr marker ignored")),
        (set(), {"modelspec.prediction_type": "flow"}, ("epsilon", False, "default")),
    ],
)
def test_base_schedule_from_markers_and_metadata(keys, metadata, expected):
    schedule = read_base_schedule(keys | {UNET_PREFIX + "out.2.weight"}, metadata)
    assert (schedule.prediction_type, schedule.zero_terminal_snr) == expected[:2]
    assert expected[2] in schedule.source


def test_scheduler_config_follows_the_schedule():
    sdxl = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False, "timestep_spacing": "leading"}
    ztsnr = scheduler_config_for(sdxl, BaseSchedule("v_prediction", True, "test"))
    assert ztsnr == {
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    }
    assert (
        scheduler_config_for(sdxl, BaseSchedule("v_prediction", False, "test"))["timestep_spacing"]
        == "leading"
    )
    assert scheduler_config_for(ztsnr, BaseSchedule("epsilon", False, "test")) == sdxl
    assert sdxl["prediction_type"] == "epsilon"  # the input is not changed


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the file


def _save(path, tensors, metadata=None):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def original(trained):
    return original_state_dict(*trained.values())


def test_files_that_are_not_sdxl_bases_are_refused(tiny_sdxl, original, tmp_path):
    text = tmp_path / "text.safetensors"
    text.write_text("not safetensors")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    w = torch.zeros(4, 4)
    kohya_lora = _save(
        tmp_path / "lora.safetensors",
        {
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": w,
            "lora_te1_x.alpha": torch.tensor(4.0),
        },
        {"ss_network_module": "networks.lora"},
    )
    peft_lora = _save(
        tmp_path / "peft.safetensors", {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": w}
    )
    sd15 = _save(
        tmp_path / "sd15.safetensors",
        {
            UNET_PREFIX + "input_blocks.0.0.weight": w,
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": w,
            VAE_PREFIX + "decoder.conv_in.weight": w,
        },
    )
    refiner = _save(
        tmp_path / "refiner.safetensors",
        {UNET_PREFIX + "label_emb.0.0.weight": w, "conditioner.embedders.0.model.ln_final.weight": w},
    )
    edm = _save(tmp_path / "edm.safetensors", {**original, "edm_vpred.sigma_max": torch.tensor(120.0)})
    diffusers_unet = _save(tmp_path / "unet.safetensors", {"down_blocks.0.resnets.0.conv1.weight": w})
    for path, needle in [
        (tmp_path / "missing.safetensors", "no such file"),
        (text, "not a readable .safetensors file"),
        (pickle, "pickle"),
        (kohya_lora, "LoRA"),
        (peft_lora, "LoRA"),
        (sd15, "SD 1.x/2.x"),
        (refiner, "refiner"),
        (edm, "EDM"),
        (diffusers_unet, "diffusers-layout UNet"),
    ]:
        one_line_error(lambda path=path: load_single_file(path, tiny_sdxl), str(path), needle)
    one_line_error(lambda: file_schedule(sd15), str(sd15), "SD 1.x/2.x")


def test_truncated_or_mismatched_weights_are_refused(tiny_sdxl, original, tmp_path):
    truncated = dict(original)
    del truncated[UNET_PREFIX + "out.2.weight"]
    path = _save(tmp_path / "truncated.safetensors", truncated)
    one_line_error(lambda: load_single_file(path, tiny_sdxl), str(path), "UNet: 1 of", "out.2.weight")
    key = CLIP_G_PREFIX + "ln_final.weight"
    wider = _save(tmp_path / "wider.safetensors", {**original, key: torch.zeros(65)})
    one_line_error(lambda: load_single_file(wider, tiny_sdxl), str(wider), key, "(65,)", "(64,)")
    not_a_config = tmp_path / "empty"
    not_a_config.mkdir()
    path = _save(tmp_path / "ok.safetensors", original)
    one_line_error(lambda: load_single_file(path, not_a_config), str(not_a_config), "unet/config.json")


def test_offline_without_config_says_to_pass_config(original, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    path = _save(tmp_path / "model.safetensors", original)
    one_line_error(lambda: load_single_file(path), str(path), "--config DIR")
