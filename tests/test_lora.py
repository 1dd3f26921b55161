"""LoRA: default targets, fp32 adapter on a bf16 base, both saved formats reload in diffusers, exact resume."""

import json
import logging
import re
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdxl_ztsnr.ema import EmaWeights
from sdxl_ztsnr.lora import (
    DEFAULT_TARGET_MODULES,
    DIFFUSERS_LORA_NAME,
    EMA_LORA_SUBFOLDER,
    LORA_STATE_NAME,
    add_lora,
    check_lora_base,
    diffusers_lora_state_dict,
    kohya_lora_state_dict,
    load_lora_state,
    lora_checkpoint_hooks,
    lora_modules,
    save_lora,
)
from sdxl_ztsnr.sdxl_architecture import SDXL_UNET

ATTENTION_PROJECTION = re.compile(
    r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"
    r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
)


def _tiny_unet(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")


def _inputs(seed: int, batch: int = 2) -> dict:
    """UNet inputs at the tiny model's widths: 8x8 latents, 96-wide text, 32-wide pooled text, 6 size numbers."""
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


def _train(unet, params, steps: range, backward=None) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    _steps(unet, optimizer, steps, backward)
    return optimizer


def _steps(unet, optimizer, steps: range, backward=None, ema=None) -> None:
    for step in steps:
        loss = unet(**_inputs(step)).sample.square().mean()
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.update(step)


def _output(unet, seed: int = 99) -> torch.Tensor:
    with torch.no_grad():
        return unet(**_inputs(seed)).sample


def test_default_targets_are_the_attention_projections_of_transformer_blocks(tiny_sdxl):
    from diffusers.models.attention import BasicTransformerBlock

    unet = _tiny_unet(tiny_sdxl)
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    before = _output(unet.to(torch.bfloat16).float())  # the base as bf16 holds it
    unet.to(torch.bfloat16)
    params = add_lora(unet, rank=4, alpha=8)
    modules = lora_modules(unet)
    assert len(modules) == 8 * blocks == 136  # attn1/attn2 x q/k/v/out per block; nothing else matched
    assert all(ATTENTION_PROJECTION.match(name) for name in modules)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(params) == len(trainable) == 2 * len(modules) and all(
        p is q for p, q in zip(params, trainable, strict=True)
    )
    assert all(p.dtype == torch.float32 for p in params)  # the adapter stays fp32 on a bf16 base
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters() if not p.requires_grad)
    # B starts at zero: the adapted UNet computes what the base does.
    unet.float()
    torch.testing.assert_close(_output(unet), before, atol=1e-6, rtol=0)


def test_lora_gradients_survive_gradient_checkpointing(tiny_sdxl):
    """The base is frozen, so checkpointed blocks see inputs without grad; the LoRA must still get gradients."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = _tiny_unet(tiny_sdxl)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        params = add_lora(unet, rank=4)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.05)  # B != 0, so A gets a gradient too
        unet(**_inputs(0)).sample.square().mean().backward()
        grads.append([p.grad for p in params])
    assert all(g is not None and g.abs().max() > 0 for g in grads[1])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_kohya_names_on_the_real_sdxl_layout_and_diffusers_maps_them_back():
    """SDXL's real block counts (meta device): the 560 names kohya uses, and diffusers' converter inverts them."""
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    add_lora(unet, rank=32, alpha=16)
    assert len(lora_modules(unet)) == 560
    state = kohya_lora_state_dict(unet)
    # SGM's SDXL: transformer depth 2 at input_blocks 4, 5 and output_blocks 3-5; 10 at input_blocks 7, 8,
    # the middle block and output_blocks 0-2.
    depth = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10}
    depth |= {"middle_block_1": 10} | {f"output_blocks_{i}_1": 10 if i < 3 else 2 for i in range(6)}
    expected = {
        f"lora_unet_{block}_transformer_blocks_{j}_{attn}_{proj}"
        for block, n in depth.items()
        for j in range(n)
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0")
    }
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state} == expected
    assert state["lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k.lora_down.weight"].shape == (
        32,
        2048,
    )
    assert state["lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0.lora_up.weight"].shape == (
        640,
        32,
    )
    assert float(state["lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.alpha"]) == 16.0

    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet.config)
    # What load_lora_into_unet does next: diffusers' processor names -> peft's.
    as_peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in as_peft} == set(lora_modules(unet))
    assert set(alphas.values()) == {16.0}


@pytest.mark.slow
def test_trained_lora_reloads_in_diffusers_from_both_files(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    unet = _tiny_unet(tiny_sdxl)
    base = _output(unet)
    params = add_lora(unet, rank=4, alpha=2)  # alpha != rank: the scale must survive both formats
    _train(unet, params, range(1, 4))
    assert all(p.abs().max() > 0 for name, p in unet.named_parameters() if "lora_B" in name)
    unet.eval()
    ours = _output(unet)
    assert (ours - base).abs().max() > 1e-2  # the LoRA matters far beyond the tolerance below

    diffusers_path, kohya_path = save_lora(unet, tmp_path, "tiny_lora", base_model=str(tiny_sdxl))
    assert diffusers_path == tmp_path / DIFFUSERS_LORA_NAME
    for weight_name in (None, kohya_path.name):  # None: what load_lora_weights(output_dir) picks by itself
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(tmp_path, weight_name=weight_name)
        torch.testing.assert_close(_output(pipe.unet), ours, atol=1e-4, rtol=0, msg=str(weight_name))

    with safe_open(str(kohya_path), "pt") as f:
        meta = f.metadata()
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == (
        "4",
        "2.0",
        "sdxl_base_v1-0",
    )
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_zero_terminal_snr"] == "True"
    assert json.loads(meta["ss_network_args"])["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    _, half = save_lora(unet, tmp_path / "fp16", "tiny_lora", kohya_dtype=torch.float16)
    with safe_open(str(half), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".weight")} == {torch.float16}


# Every kind of layer --lora_target_modules can adapt, by group: peft adapts the UNet's Linear and Conv2d layers
# and refuses the rest (norms, whole blocks), and add_lora refuses names that match nothing.
TARGET_GROUPS = {
    "attention": DEFAULT_TARGET_MODULES,
    "resnet_convs": ("conv1", "conv2", "conv_shortcut"),
    # the resnets' timestep projections and the embeddings of the timestep and of SDXL's micro-conditioning
    "time_embedding": (
        "time_emb_proj",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
        "add_embedding.linear_2",
    ),
    "transformer_proj": ("proj_in", "proj_out"),
    "feed_forward": ("ff.net.0.proj", "ff.net.2"),
    "ends_and_resampling": ("conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv"),
}
ALL_TARGETS = tuple(t for group in TARGET_GROUPS.values() for t in group)
# A user adds targets to the default attention projections: each group beside them, and everything at once.
TARGET_SETS = {"attention": DEFAULT_TARGET_MODULES}
TARGET_SETS |= {
    f"attention+{name}": DEFAULT_TARGET_MODULES + g
    for name, g in TARGET_GROUPS.items()
    if g != DEFAULT_TARGET_MODULES
}
TARGET_SETS |= {"all": ALL_TARGETS}


def _adaptable_layers(unet) -> set[str]:
    """Names of the layers a LoRA can adapt (before one is added): every Linear and Conv2d."""
    return {name for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _perturb_lora_B(unet, seed: int) -> None:
    """B starts at zero; random B makes every adapted layer's update non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _lora_deltas(unet) -> dict[str, torch.Tensor]:
    """The effective weight update (alpha/rank)·B·A of each adapted layer's active adapter, by module name."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        return {
            name: m.get_delta_weight(m.active_adapters[0])
            for name, m in unet.named_modules()
            if isinstance(m, LoraLayer)
        }


@contextmanager
def _loading_warnings():
    """Collects what diffusers logs and peft warns while loading a LoRA (the text encoders' 'no keys' left out)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    diffusers_logger = logging.getLogger("diffusers")  # diffusers does not propagate to the root logger
    diffusers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        diffusers_logger.removeHandler(handler)
    messages[:] = [m for m in messages if not m.startswith("No LoRA keys associated to CLIPTextModel")]


@pytest.mark.slow
def test_the_target_groups_cover_every_layer_kind_and_kohya_names_map_back_on_the_real_sdxl_layout():
    """SDXL's real layout (meta device), every adaptable layer: one key format, kohya names diffusers inverts."""
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    adaptable = _adaptable_layers(unet)
    add_lora(unet, rank=8, alpha=4, target_modules=ALL_TARGETS)
    modules = set(lora_modules(unet))
    assert modules == adaptable  # the groups above name every layer kind a LoRA can adapt
    assert set(diffusers_lora_state_dict(unet)) == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}

    kohya = kohya_lora_state_dict(unet)
    assert len(kohya) == 3 * len(modules)  # down, up, alpha: no two modules share a kohya name
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(kohya), unet_config=unet.config)
    as_peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in as_peft} == modules
    assert len(alphas) == len(modules) and set(alphas.values()) == {4.0}


@pytest.mark.slow
@pytest.mark.parametrize("targets", TARGET_SETS.values(), ids=TARGET_SETS.keys())
def test_both_files_reload_every_adapted_layer_in_diffusers(tiny_sdxl, tmp_path, targets):
    """Issue 16.6: beyond the attention projections the diffusers file mixed two key formats and loaded in part."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = _tiny_unet(tiny_sdxl)
    adaptable = _adaptable_layers(unet)
    add_lora(unet, rank=4, alpha=2, target_modules=targets)  # alpha != rank: the 0.5 scale must survive
    _perturb_lora_B(unet, seed=1)
    unet.eval()
    trained, ours = _lora_deltas(unet), _output(unet)
    assert all(delta.abs().max() > 1e-3 for delta in trained.values())
    if targets == ALL_TARGETS:
        assert set(trained) == adaptable
    diffusers_path, kohya_path = save_lora(unet, tmp_path, "tiny_lora")

    for path in (diffusers_path, kohya_path):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        with _loading_warnings() as messages:
            pipe.load_lora_weights(tmp_path, weight_name=path.name)
        assert messages == [], path.name  # unexpected / missing keys, targets without weights
        loaded = _lora_deltas(pipe.unet)
        assert loaded.keys() == trained.keys(), (path.name, sorted(trained.keys() - loaded.keys())[:3])
        for name, delta in trained.items():
            torch.testing.assert_close(loaded[name], delta, atol=1e-6, rtol=1e-5, msg=f"{path.name}: {name}")
        torch.testing.assert_close(_output(pipe.unet), ours, atol=1e-5, rtol=0, msg=path.name)
        if path == diffusers_path:  # every tensor in the file is one the loaded adapter holds, unchanged
            held = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
            saved = load_file(str(path))
            assert saved.keys() == {f"unet.{k}" for k in held}
            assert all(torch.equal(saved[f"unet.{k}"], v) for k, v in held.items())


@pytest.mark.slow
def test_ema_of_the_lora_saves_the_averaged_adapter(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    unet = _tiny_unet(tiny_sdxl)
    params = add_lora(unet, rank=4)
    ema = EmaWeights(params, decay=0.5, warmup="none")
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    _steps(unet, optimizer, range(1, 5), ema=ema)
    unet.eval()
    raw = _output(unet)
    with ema.swapped_in():
        averaged = _output(unet)
        save_lora(unet, tmp_path / EMA_LORA_SUBFOLDER, "tiny_lora_ema")
    assert (averaged - raw).abs().max() > 1e-3
    torch.testing.assert_close(_output(unet), raw, atol=0, rtol=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(tmp_path / EMA_LORA_SUBFOLDER)
    torch.testing.assert_close(_output(pipe.unet), averaged, atol=1e-4, rtol=0)


def test_checkpoint_hooks_store_only_the_lora_and_resume_exactly(tiny_sdxl, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def setup(seed: int, rank: int = 4):
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.manual_seed(seed)  # a different A init than the saved run: the resume must overwrite it
        accelerator = Accelerator(cpu=True)
        unet = _tiny_unet(tiny_sdxl)
        params = add_lora(unet, rank=rank)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        prepared, optimizer = accelerator.prepare(unet, optimizer)
        save_hook, load_hook = lora_checkpoint_hooks(unet, accelerator.is_main_process)
        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
        return accelerator, unet, prepared, optimizer

    def lora_weights(unet):
        return {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}

    try:
        accelerator, unet, prepared, optimizer = setup(seed=0)
        _steps(prepared, optimizer, range(1, 3), accelerator.backward)
        accelerator.save_state(str(tmp_path / "ckpt"))
        _steps(prepared, optimizer, range(3, 5), accelerator.backward)
        expected = lora_weights(unet)

        files = {p.name for p in (tmp_path / "ckpt").iterdir()}
        assert LORA_STATE_NAME in files and not any(name.startswith("model") for name in files)
        lora_bytes = sum(4 * p.numel() for p in unet.parameters() if p.requires_grad)
        unet_bytes = sum(4 * p.numel() for p in unet.parameters())
        size = (tmp_path / "ckpt" / LORA_STATE_NAME).stat().st_size
        assert lora_bytes <= size < lora_bytes + 100_000 and size < unet_bytes / 10

        accelerator, unet, prepared, optimizer = setup(seed=1)
        accelerator.load_state(str(tmp_path / "ckpt"))
        _steps(prepared, optimizer, range(3, 5), accelerator.backward)
        resumed = lora_weights(unet)
        assert resumed.keys() == expected.keys()
        assert all(torch.equal(resumed[k], expected[k]) for k in expected)

        other = _tiny_unet(tiny_sdxl)
        add_lora(other, rank=8)
        with pytest.raises(ValueError, match="lora_rank"):
            load_lora_state(other, tmp_path / "ckpt")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_check_lora_base_refuses_epsilon_bases(tiny_sdxl):
    tiny = json.loads((tiny_sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert check_lora_base(tiny) is None  # the tiny model ships our v-prediction ZTSNR scheduler
    for config in ({**tiny, "prediction_type": "epsilon"}, {"_class_name": "EulerDiscreteScheduler"}):
        message = check_lora_base(config)
        assert "'epsilon'" in message and "v-prediction ZTSNR" in message
    assert "'sample'" in check_lora_base({"prediction_type": "sample"})


def test_bad_inputs_are_refused(tiny_sdxl, tmp_path):
    unet = _tiny_unet(tiny_sdxl)
    for kwargs, match in [
        ({"rank": 0}, "lora_rank"),
        ({"rank": 4, "alpha": 0}, "lora_alpha"),
        ({"rank": 4, "dropout": 1.0}, "lora_dropout"),
        ({"rank": 4, "target_modules": []}, "lora_target_modules"),
        ({"rank": 4, "target_modules": ["to_q", "to_qq"]}, r"\['to_qq'\] match no module"),
        ({"rank": 4, "target_modules": r".*\.nothing"}, "match no module"),
    ]:
        with pytest.raises(ValueError, match=match):
            add_lora(unet, **kwargs)
    add_lora(unet, rank=2)
    with pytest.raises(ValueError, match="already has"):
        add_lora(unet, rank=2)
    for name in ("pytorch_lora_weights", "", "a/b", "x.safetensors"):
        with pytest.raises(ValueError, match="file stem"):
            save_lora(unet, tmp_path, name)
    with pytest.raises(FileNotFoundError, match="not saved by a LoRA run"):
        load_lora_state(unet, tmp_path)


def _saved_bytes_and_grads(unet, params) -> tuple[int, list[torch.Tensor]]:
    """Bytes of activations autograd keeps for backward in one bf16-autocast forward (each storage once; the
    weights themselves left out), and the LoRA grads."""
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = unet(**_inputs(0)).sample.float().square().mean()
    loss.backward()
    return sum(storages.values()), [p.grad for p in params]


def test_under_autocast_the_adapter_keeps_its_input_not_a_copy_with_the_same_gradients(tiny_sdxl):
    results = []
    for under_autocast in (False, True):
        torch.manual_seed(0)
        unet = _tiny_unet(tiny_sdxl).to(torch.bfloat16)  # the trainer's LoRA base under bf16 mixed precision
        params = add_lora(unet, rank=4, under_autocast=under_autocast)
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.05)  # B != 0, so A gets a gradient too
        results.append(_saved_bytes_and_grads(unet, params))
    (copied, plain_grads), (kept, grads) = results
    assert kept < 0.95 * copied, (kept, copied)  # the tiny UNet: 7% less
    for plain, grad in zip(plain_grads, grads, strict=True):
        torch.testing.assert_close(grad, plain, atol=0, rtol=0)  # the same values reach the same matmuls


def test_without_autocast_a_bf16_base_still_gets_fp32_adapter_inputs_cast(tiny_sdxl):
    unet = _tiny_unet(tiny_sdxl).to(torch.bfloat16)
    add_lora(unet, rank=4)
    output = unet(**{k: _cast(v, torch.bfloat16) for k, v in _inputs(0).items()}).sample
    assert output.dtype == torch.bfloat16 and torch.isfinite(output.float()).all()


def _cast(value, dtype):
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value.to(dtype) if value.is_floating_point() else value
