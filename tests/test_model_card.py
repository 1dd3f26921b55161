"""The model card links a base model on the Hub, and only a Hub id: a local base is named, never linked."""

import pytest
import yaml

from sdxl_ztsnr.model_card import is_hub_id, model_card

HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def _metadata(card: str) -> dict:
    """The YAML block between the leading `---` lines."""
    return yaml.safe_load(card.split("---")[1])


def test_hub_base_model_is_linked_and_in_metadata():
    card = model_card("user/my-finetune", HUB_ID, {"learning_rate": 1e-5})
    assert _metadata(card)["base_model"] == HUB_ID
    assert f"[{HUB_ID}](https://huggingface.co/{HUB_ID})" in card


def test_existing_local_base_model_is_named_without_link(tmp_path, monkeypatch):
    # `demo/model` has the shape of a Hub id; it is the README's demo folder, so it must not be linked.
    (tmp_path / "demo" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("demo/model")
    card = model_card("my-finetune", "demo/model", {})
    assert "base_model" not in _metadata(card)
    assert "huggingface.co/demo/model" not in card
    assert "a local SDXL base model (`demo/model`)" in card


@pytest.mark.parametrize(
    "path", ["./models/sdxl", "/srv/models/sdxl-base", "~/models/sdxl", "models\\sdxl", "sdxl"]
)
def test_path_shaped_base_model_is_local_even_when_missing(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id(path)
    card = model_card("my-finetune", path, {})
    assert "base_model" not in _metadata(card) and "huggingface.co/" + path not in card
    # An absolute path is named by its last part: the trainer's directories stay out of a published card.
    assert "/srv/" not in card and "~/" not in card


def test_normalized_latents_note_only_when_asked():
    plain = model_card("m", HUB_ID, {})
    normalized = model_card("m", HUB_ID, {}, normalized_latents=True)
    assert "normalised latents" not in plain and "keep this VAE" in normalized
