"""LoRA variants (DoRA, LoHa, LoKr) and --lora_weights: both saved files reload to the trained adapter, the kohya
file's keys are ComfyUI's and its math is LyCORIS's, other trainers' files continue exactly, bad files are refused."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_ztsnr.console import UserError
from sdxl_ztsnr.export import UNET_PREFIX, unet_key_map
from sdxl_ztsnr.lora import add_lora, lora_modules, lora_settings, save_lora
from sdxl_ztsnr.lora_files import compact_targets, continue_lora, load_lora_file
from sdxl_ztsnr.lora_variants import LORA_TYPES

# One module of every kind a LoRA can adapt: attention projections, feed-forward, transformer in/out projections,
# resnet convs and shortcut, timestep projections and embeddings, the ends and the resamplers.
EVERY_KIND = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
    "conv_shortcut", "time_emb_proj", "time_embedding.linear_1", "add_embedding.linear_2", "conv_in", "conv_out",
    "downsamplers.0.conv", "upsamplers.0.conv",
)  # fmt: skip
# The keys each kind writes per module (LyCORIS's names, as ComfyUI's loaders look them up).
KIND_SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
}


def _tiny_unet(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")


def _inputs(seed: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, 7, 96, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.rand(batch, 6, generator=g),
        },
    }


def _output(unet, seed: int = 99) -> torch.Tensor:
    with torch.no_grad():
        return unet(**_inputs(seed)).sample


def _perturb(unet, seed: int) -> None:
    """Random adapter tensors: every adapted module's update is non-zero (B / one factor start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in unet.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _trained(tiny_sdxl, lora_type, rank=4, alpha=2.0, targets=EVERY_KIND):
    torch.manual_seed(0)
    unet = _tiny_unet(tiny_sdxl)
    add_lora(unet, rank, alpha, target_modules=targets, lora_type=lora_type)
    _perturb(unet, seed=1)
    unet.eval()
    return unet


def _merged_weights(unet) -> dict[str, torch.Tensor]:
    """Each adapted module's effective weight as peft computes it (merged into a copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    out = {}
    with torch.no_grad():
        for name, module in merged.named_modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
                out[name] = module.get_base_layer().weight.detach().clone()
    return out


def _comfy_key_table(unet) -> dict[str, str]:
    """ComfyUI's UNet table (model_lora_keys_unet): `lora_unet_` + the SGM weight's module path with `_` for `.`,
    and the same for the diffusers path; both name the SGM weight. Built from the base UNet's own keys."""
    base = {k.replace(".base_layer.", "."): k for k in unet.state_dict()}
    base = [k for k in base if not re.search(r"\.(lora_|hada_|lokr_)", k)]
    table = {}
    for diffusers_key, sgm_key in unet_key_map(base).items():
        if diffusers_key.endswith(".weight"):
            sgm = sgm_key.removeprefix(UNET_PREFIX)
            table["lora_unet_" + sgm.removesuffix(".weight").replace(".", "_")] = diffusers_key
            table["lora_unet_" + diffusers_key.removesuffix(".weight").replace(".", "_")] = diffusers_key
    return table


def _lycoris_weight(weight: torch.Tensor, keys: dict[str, torch.Tensor]) -> torch.Tensor:
    """A module's weight as ComfyUI/A1111/LyCORIS compute it from the file's keys (independent reference).

    LoRA/DoRA: up·down with scale alpha/rank; LoHa: (w1a·w1b) ⊙ (w2a·w2b), alpha/rank; LoKr: w1 ⊗ w2, alpha/rank
    only when a factor is decomposed (rank from it), else 1. dora_scale of shape (out, 1...) normalises the
    merged weight per output channel (LyCORIS wd_on_out).
    """
    alpha = float(keys["alpha"]) if "alpha" in keys else None
    if "lora_up.weight" in keys:
        up, down = keys["lora_up.weight"], keys["lora_down.weight"]
        rank, diff = down.shape[0], up.flatten(1) @ down.flatten(1)
    elif "hada_w1_a" in keys:
        rank = keys["hada_w1_b"].shape[0]
        diff = (keys["hada_w1_a"] @ keys["hada_w1_b"]) * (keys["hada_w2_a"] @ keys["hada_w2_b"])
    else:
        rank = None
        w1 = keys.get("lokr_w1")
        if w1 is None:
            w1, rank = keys["lokr_w1_a"] @ keys["lokr_w1_b"], keys["lokr_w1_b"].shape[0]
        w2 = keys.get("lokr_w2")
        if w2 is None:
            w2, rank = keys["lokr_w2_a"] @ keys["lokr_w2_b"], keys["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    merged = weight + scale * diff.reshape(weight.shape)
    if "dora_scale" in keys:
        magnitude = keys["dora_scale"]
        assert magnitude.shape == (weight.shape[0], *[1] * (weight.dim() - 1)), magnitude.shape  # output axis
        norm = merged.flatten(1).norm(dim=1).reshape(magnitude.shape)
        merged = magnitude * merged / norm
    return merged


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", LORA_TYPES)
def test_each_type_reloads_from_both_files_to_the_trained_adapter(tiny_sdxl, tmp_path, lora_type):
    unet = _trained(tiny_sdxl, lora_type)
    base, ours = _output(_tiny_unet(tiny_sdxl)), _output(unet)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters far beyond the tolerance below
    assert lora_settings(unet)["type"] == lora_type
    diffusers_path, kohya_path = save_lora(unet, tmp_path, "tiny")
    for path in (diffusers_path, kohya_path):
        reloaded = _tiny_unet(tiny_sdxl)
        load_lora_file(reloaded, path)
        assert lora_modules(reloaded) == lora_modules(unet), path.name
        torch.testing.assert_close(_output(reloaded), ours, atol=1e-5, rtol=0, msg=path.name)
        settings = {k: v for k, v in lora_settings(reloaded).items() if k != "target_modules"}
        assert settings == {k: v for k, v in lora_settings(unet).items() if k != "target_modules"}
    if lora_type in ("lora", "dora"):  # diffusers' own loader reads the diffusers file of these two
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(tmp_path, weight_name=diffusers_path.name)
        torch.testing.assert_close(_output(pipe.unet), ours, atol=1e-5, rtol=0)
    else:  # plain peft: the config from the header, the tensors by their keys
        from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open

        with safe_open(str(diffusers_path), "pt") as f:
            header = json.loads(f.metadata()["lora_adapter_metadata"])
        config_class = LoHaConfig if lora_type == "loha" else LoKrConfig
        fields = {k.removeprefix("unet."): v for k, v in header.items()}
        config = config_class(
            **{k: v for k, v in fields.items() if k in config_class.__dataclass_fields__ and k != "peft_type"}
        )
        plain = _tiny_unet(tiny_sdxl)
        inject_adapter_in_model(config, plain, adapter_name="default")
        keys = {k.removeprefix("unet."): v for k, v in load_file(str(diffusers_path)).items()}
        assert not set_peft_model_state_dict(plain, keys, adapter_name="default").unexpected_keys
        torch.testing.assert_close(_output(plain), ours, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", LORA_TYPES)
def test_kohya_file_keys_map_in_comfyuis_table_and_its_math_gives_the_trained_weights(
    tiny_sdxl, tmp_path, lora_type
):
    unet = _trained(tiny_sdxl, lora_type)
    _, kohya_path = save_lora(unet, tmp_path, "tiny")
    state = load_file(str(kohya_path))
    table = _comfy_key_table(_tiny_unet(tiny_sdxl))
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        assert name in table, key  # ComfyUI finds the weight this key patches
        assert suffix in KIND_SUFFIXES[lora_type], key
        by_module.setdefault(table[name].removesuffix(".weight"), {})[suffix] = tensor
    assert set(by_module) == set(lora_modules(unet))
    kinds = {m.split(".")[-1] if not m.endswith(".0") else m.split(".")[-2] for m in by_module}
    assert {"to_q", "to_out", "proj_in", "conv1", "conv_shortcut", "conv_in", "conv"} <= kinds
    merged = _merged_weights(unet)
    base = dict(_tiny_unet(tiny_sdxl).named_modules())
    for module, keys in by_module.items():
        expected = merged[module]
        assert (expected - base[module].weight).abs().max() > 1e-4, module
        torch.testing.assert_close(
            _lycoris_weight(base[module].weight.detach(), keys), expected, atol=1e-5, rtol=1e-5, msg=module
        )


def _kohya_other_trainer(unet) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A kohya file as other trainers write it: SGM names and diffusers-style names mixed, ranks 2 and 4, one
    alpha per module (one left out: scale 1); and the merged weights it means."""
    table = {v: k for k, v in _comfy_key_table(unet).items() if "input_blocks" in k or "output_blocks" in k}
    g = torch.Generator().manual_seed(5)
    layers = dict(unet.named_modules())
    state, merged = {}, {}
    picks = [m for m in layers if m.endswith(("attn1.to_q", "attn2.to_v", "ff.net.2", "resnets.0.conv1"))]
    for i, module in enumerate(sorted(picks)):
        weight = layers[module].weight.detach()
        rank = 2 if i % 3 == 0 else 4
        down = 0.1 * torch.randn(rank, *weight.shape[1:], generator=g)
        up = 0.1 * torch.randn(weight.shape[0], rank, *[1] * (weight.dim() - 2), generator=g)
        name = table.get(f"{module}.weight") if i % 2 else None
        name = name or "lora_unet_" + module.replace(".", "_")
        keys = {"lora_down.weight": down, "lora_up.weight": up}
        if i != 1:
            keys["alpha"] = torch.tensor(float(1 + i % 4))
        state |= {f"{name}.{suffix}": tensor for suffix, tensor in keys.items()}
        merged[module] = _lycoris_weight(weight, keys)
    return state, merged


def test_another_trainers_kohya_file_continues_exactly(tiny_sdxl, tmp_path):
    unet = _tiny_unet(tiny_sdxl)
    state, merged = _kohya_other_trainer(unet)
    save_file(state, str(tmp_path / "theirs.safetensors"))
    reference = _tiny_unet(tiny_sdxl)  # the file's meaning: its deltas merged into the base
    with torch.no_grad():
        layers = dict(reference.named_modules())
        for module, weight in merged.items():
            layers[module].weight.copy_(weight)
    params = continue_lora(unet, tmp_path / "theirs.safetensors")
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert set(lora_modules(unet)) == set(merged)
    settings = lora_settings(unet)
    assert settings["rank"] == 4 and settings["rank_pattern"]  # per-module ranks and alphas kept
    torch.testing.assert_close(_output(unet), _output(reference), atol=1e-5, rtol=0)
    # Saved again, per-module ranks and alphas included: the kohya file means what the original did.
    _, kohya_path = save_lora(unet, tmp_path / "again", "again")
    table, layers = _comfy_key_table(_tiny_unet(tiny_sdxl)), dict(_tiny_unet(tiny_sdxl).named_modules())
    again: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(kohya_path)).items():
        name, _, suffix = key.partition(".")
        again.setdefault(table[name].removesuffix(".weight"), {})[suffix] = tensor
    assert again.keys() == merged.keys()
    for module, keys in again.items():
        weight = _lycoris_weight(layers[module].weight.detach(), keys)
        torch.testing.assert_close(weight, merged[module], atol=1e-6, rtol=1e-6, msg=module)


def test_diffusers_older_key_forms_and_bare_alphas_continue_like_peft_keys(tiny_sdxl, tmp_path):
    targets = ("to_q", "to_out.0", "proj_in")
    for alpha, form in [(4.0, "older"), (2.0, "alphas")]:
        unet = _trained(tiny_sdxl, "lora", alpha=alpha, targets=targets)
        ours = _output(unet)
        diffusers_path, _ = save_lora(unet, tmp_path / form, "tiny")
        keys = load_file(str(diffusers_path))  # re-saved without the header that holds alpha
        if form == "older":  # diffusers' older key names; no alpha anywhere: scale 1 (alpha = rank 4)
            keys = {
                k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
                for k, v in keys.items()
            }
        else:  # peft keys with kohya's alpha tensors beside them
            keys |= {
                k.replace(".lora_A.weight", ".alpha"): torch.tensor(alpha) for k in keys if ".lora_A." in k
            }
        save_file(keys, str(tmp_path / f"{form}.safetensors"))
        reloaded = _tiny_unet(tiny_sdxl)
        continue_lora(reloaded, tmp_path / f"{form}.safetensors")
        torch.testing.assert_close(_output(reloaded), ours, atol=1e-5, rtol=0, msg=form)


def test_compact_targets_match_exactly_the_chosen_modules(tiny_sdxl):
    unet = _tiny_unet(tiny_sdxl)
    names = [n for n, _ in unet.named_modules()]
    attention = [n for n in names if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n)]
    assert compact_targets(names, attention) == ["to_k", "to_out.0", "to_q", "to_v"]
    one = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert compact_targets(names, [one]) == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]


def test_bad_lora_files_are_refused_in_one_line_naming_the_file(tiny_sdxl, tmp_path):
    def _one_line_error(path, match):
        with pytest.raises(UserError, match=match) as caught:
            continue_lora(_tiny_unet(tiny_sdxl), path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)

    unet = _tiny_unet(tiny_sdxl)
    good_state, _ = _kohya_other_trainer(unet)
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    down, up = torch.zeros(4, 48), torch.zeros(48, 4)

    def write(name, state):
        path = tmp_path / name
        save_file(state, str(path))
        return path

    _one_line_error(tmp_path / "missing.safetensors", "no such file")
    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x02")
    _one_line_error(tmp_path / "lora.ckpt", "not a .safetensors")
    _one_line_error(
        write("full.safetensors", {"model.diffusion_model.conv_in.weight": torch.zeros(1)}), "not a LoRA"
    )
    sd15 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down}
    _one_line_error(write("sd15.safetensors", sd15), "names no module of this SDXL UNet")
    locon = {
        f"{q}.lora_down.weight": down,
        f"{q}.lora_up.weight": up,
        f"{q}.lora_mid.weight": torch.zeros(4, 4),
    }
    _one_line_error(write("locon.safetensors", locon), "Tucker core")
    wrong = {f"{q}.lora_down.weight": torch.zeros(4, 40), f"{q}.lora_up.weight": up}
    _one_line_error(write("shape.safetensors", wrong), r"attn1\.to_q\.lora_down\.weight: shape \(4, 40\)")
    input_axis = {
        f"{q}.lora_down.weight": down,
        f"{q}.lora_up.weight": up,
        f"{q}.dora_scale": torch.ones(1, 48),
    }
    _one_line_error(write("input_axis.safetensors", input_axis), "input axis")
    te = {**good_state, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down}
    _one_line_error(write("te.safetensors", te), "text_encoder LoRA tensors")
    _one_line_error(write("other.safetensors", {"something": torch.zeros(1)}), "no LoRA layout")
    path = write("good.safetensors", good_state)
    for kwargs, match in [
        ({"rank": 8}, "--lora_rank 8"),
        ({"lora_type": "loha"}, "--lora_type loha"),
        ({"alpha": 16.0}, "--lora_alpha 16"),
        ({"target_modules": ["to_k"]}, "--lora_target_modules"),
    ]:
        with pytest.raises(UserError, match=f"{re.escape(match)}.*disagrees") as caught:
            continue_lora(_tiny_unet(tiny_sdxl), path, **kwargs)
        assert "\n" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("lora_type", LORA_TYPES)
def test_kohya_keys_of_every_kind_map_in_comfyuis_table_on_the_real_sdxl_layout(lora_type):
    """SDXL's real block counts (meta device): each adapted module of every kind gets keys ComfyUI looks up."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from sdxl_ztsnr.lora import kohya_lora_state_dict
    from sdxl_ztsnr.sdxl_architecture import SDXL_UNET

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    table = _comfy_key_table(unet)
    add_lora(unet, 8, 4, target_modules=EVERY_KIND, lora_type=lora_type)
    state = kohya_lora_state_dict(unet)
    names = {key.partition(".")[0] for key in state}
    assert len(names) == len(lora_modules(unet)) == 792  # one kohya name per adapted module, none shared
    assert names <= set(table), sorted(names - set(table))[:3]
    assert {table[name].removesuffix(".weight") for name in names} == set(lora_modules(unet))
    assert {key.partition(".")[2] for key in state} <= KIND_SUFFIXES[lora_type]
