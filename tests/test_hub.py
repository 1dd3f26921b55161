"""Model card text and Hub upload: what is sent, what never is (tokens), and how failures read."""

import pytest
from huggingface_hub import ModelCard

from sdxl_ztsnr.hub import HubUploadError, files_to_upload, push_to_hub
from sdxl_ztsnr.model_card import CARD_TAGS, model_card

FAKE_TOKEN = "hf_abcdefghijklmnopqrstuvwxyz012345"


def _output_folder(root):
    files = [
        "README.md",
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "sdxl-ztsnr.safetensors",
        "validation/step_100_0.png",
        "checkpoint-100/model.safetensors",
        "checkpoint-200.tmp/model.safetensors",
        "logs/events.out.tfevents.1",
        "unet_ema/logs/x.txt",
    ]
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    return root


def test_dry_run_lists_exactly_the_publishable_files(tmp_path):
    folder = _output_folder(tmp_path / "out")
    expected = [
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "sdxl-ztsnr.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "validation/step_100_0.png",
    ]
    assert push_to_hub(folder, "me/model", dry_run=True) == expected
    assert files_to_upload(folder, ignore_patterns=[]) != expected  # the defaults did the filtering
    # Custom patterns replace the defaults.
    custom = push_to_hub(folder, "me/model", dry_run=True, ignore_patterns=["*.png"])
    assert "validation/step_100_0.png" not in custom and "checkpoint-100/model.safetensors" in custom


def test_push_offline_gives_login_hint_without_token(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = _output_folder(tmp_path / "out")
    with pytest.raises(HubUploadError) as info:
        push_to_hub(folder, "me/model", token=FAKE_TOKEN)
    message = str(info.value)
    assert "huggingface-cli login" in message and "--hub_token" in message and "me/model" in message
    assert FAKE_TOKEN not in message


def test_push_rejected_by_hub_is_reworded_and_scrubbed(tmp_path, monkeypatch):
    import httpx2  # the HTTP client huggingface_hub uses; only needed to build a realistic 401
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def unauthorized(self, *args, **kwargs):
        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        response = httpx2.Response(401, request=request)
        raise HfHubHTTPError(f"401 Unauthorized for token {FAKE_TOKEN}", response=response)

    monkeypatch.setattr(HfApi, "create_repo", unauthorized)
    with pytest.raises(HubUploadError, match="huggingface-cli login") as info:
        push_to_hub(_output_folder(tmp_path / "out"), "me/model", token=FAKE_TOKEN)
    assert "401" in str(info.value) and FAKE_TOKEN not in str(info.value)


def test_push_without_any_token_fails_before_network(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubUploadError, match="no Hugging Face token"):
        push_to_hub(_output_folder(tmp_path / "out"), "me/model")


def test_model_card_metadata_usage_and_no_secrets():
    config = {
        "learning_rate": 1e-5,
        "max_token_length": 225,
        "hub_token": FAKE_TOKEN,
        "wandb_api_key": "0123456789abcdef",
        "notes": f"pushed with {FAKE_TOKEN}",
        "optimizer": {"name": "adamw", "token": "secret"},
    }
    text = model_card(
        "me/sdxl-ztsnr",
        "stabilityai/stable-diffusion-xl-base-1.0",
        config,
        validation_images=["validation/step_100_0.png"],
        metrics={"loss": 0.12},
    )
    data = ModelCard(text).data
    assert data.tags == CARD_TAGS
    assert data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image" and data.license
    assert "guidance_rescale=0.7" in text and 'from_pretrained(\n    "me/sdxl-ztsnr"' in text
    assert (
        "max_token_length" in text and "225" in text and "![validation 0](validation/step_100_0.png)" in text
    )
    for secret in (FAKE_TOKEN, "0123456789abcdef", "hub_token", "secret"):
        assert secret not in text


def test_model_card_keeps_local_base_model_path_out_of_metadata():
    text = model_card("out", "/data/models/sdxl-base", {"learning_rate": 1e-5})
    assert ModelCard(text).data.base_model is None and "/data/models" not in text
