"""Training SDXL's two text encoders beside the UNet (--train_text_encoder): whole, or with a LoRA each.

The trainer sees one small interface, and an object that does nothing when the encoders stay frozen:

    text = TrainedTextEncoders.load(base_path, TextEncoderSettings(...))   # or TrainedTextEncoders.frozen()
    optimizer over [UNet group, *text.param_groups(scale)]; clipping over weights.parameters + text.parameters
    text.register_checkpoint_hooks(accelerator)      # before the UNet's: see there
    models = text.prepare(accelerator)               # the trained encoders, after the UNet's prepare
    with accelerator.accumulate(unet, *models): embeds = text.encode_in_step(prompts)   # with gradients
    text.pipeline_components()                       # what exports and validation put in the pipeline
    text.save_lora(out, unet_lora_files)             # LoRA: lora_te1_/lora_te2_ keys, text_encoder(_2). keys

As kohya's sd-scripts (sdxl_train.py --learning_rate_te1/te2, train_network.py --text_encoder_lr): each encoder
has its own learning rate and a learning rate of 0 leaves that encoder frozen. SDXL reads encoder 1's
penultimate layer only, so its last layer and final layer norm never get a gradient: they stay frozen (kohya
does the same), which also keeps DDP from waiting for gradients that never come. The text is encoded inside
``accelerator.accumulate`` (sdxl_ztsnr.train_data.TrainingRows.encode_text), so gradients reach the encoders.
An EMA (--use_ema) follows the UNet only.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdxl_ztsnr.lora import ADAPTER_NAME
from sdxl_ztsnr.text_encoding import encode_prompts_with_grad, load_text_encoders

# kohya's LoRA targets in CLIP (its CLIPAttention and CLIPMLP modules): every linear layer of each block.
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA_PREFIXES = ("lora_te1_", "lora_te2_")  # what kohya, ComfyUI, A1111 and Forge call the two encoders
# The pipeline's component names, which are also the key prefixes of the diffusers LoRA file.
PIPELINE_NAMES = ("text_encoder", "text_encoder_2")
TEXT_LORA_STATE_NAME = "text_encoder_lora_state.safetensors"  # in checkpoint directories
_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)$")


@dataclass(frozen=True)
class TextEncoderSettings:
    """What trains in the two encoders: their learning rates (0 freezes one) and an optional LoRA."""

    learning_rates: tuple[float, float]  # encoder 1 (CLIP ViT-L), encoder 2 (OpenCLIP ViT-bigG)
    lora_rank: int | None = None  # with the UNet's --lora_rank: a LoRA on each trained encoder too
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False


def text_encoder_learning_rates(
    learning_rate: float, text_encoder_lr: float | None, text_encoder_2_lr: float | None
) -> tuple[float, float]:
    """(encoder 1, encoder 2) learning rates with kohya's defaults: encoder 1 the UNet's, encoder 2 encoder 1's."""
    first = learning_rate if text_encoder_lr is None else text_encoder_lr
    return first, first if text_encoder_2_lr is None else text_encoder_2_lr


def unread_modules(encoder: torch.nn.Module) -> list[str]:
    """Names of encoder 1's modules SDXL never reads: its last layer and final layer norm (it takes the
    penultimate hidden states and no pooled output of encoder 1)."""
    layers = {int(m.group(1)): name for name, _ in encoder.named_modules() if (m := _LAYER.search(name))}
    norms = [name for name, _ in encoder.named_modules() if name.split(".")[-1] == "final_layer_norm"]
    return [layers[max(layers)], *norms]


def _lora_target_names(encoder: torch.nn.Module, skip: Sequence[str]) -> list[str]:
    """Full names of the linear layers TEXT_LORA_TARGETS selects, outside the modules in ``skip``."""
    return [
        name
        for name, module in encoder.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.split(".")[-1] in TEXT_LORA_TARGETS
        and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def add_text_encoder_lora(
    encoder: torch.nn.Module, rank: int, alpha: float | None, dropout: float, skip: Sequence[str] = ()
) -> list[torch.nn.Parameter]:
    """Freeze ``encoder`` and add a peft LoRA (fp32) on its attention and MLP linears; returns its parameters.

    Through peft itself (transformers' own add_adapter wants a newer peft than diffusers does), recording the
    config as ``peft_config`` the way transformers and diffusers do, so peft's state-dict functions read it."""
    from peft import LoraConfig, inject_adapter_in_model

    encoder.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=dropout,
        target_modules=_lora_target_names(encoder, skip),
    )
    inject_adapter_in_model(config, encoder, ADAPTER_NAME)
    encoder.peft_config = {ADAPTER_NAME: config}
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    for p in parameters:
        p.data = p.data.float()
    return parameters


def kohya_text_encoder_state_dict(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A text encoder's LoRA in kohya's layout: `<prefix>text_model_<module path, _ for .>.lora_down.weight`,
    `.lora_up.weight`, `.alpha` (kohya names the modules as transformers did with the `text_model.` level)."""
    from peft.utils import get_peft_model_state_dict

    alpha = float(encoder.peft_config[ADAPTER_NAME].lora_alpha)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in get_peft_model_state_dict(encoder).items():
        module, kind = key.rsplit(".lora_", 1)
        path = module if module.startswith("text_model.") else "text_model." + module
        name = prefix + path.replace(".", "_")
        out[f"{name}.lora_down.weight" if kind == "A.weight" else f"{name}.lora_up.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@dataclass
class TrainedTextEncoders:
    """SDXL's tokenizers and text encoders when they train; ``frozen()`` is the object for a run where they
    do not (the trainer then encodes with sdxl_ztsnr.training_cache's frozen encoders, or reads the cache)."""

    tokenizers: list = field(default_factory=list)
    encoders: list[torch.nn.Module] = field(default_factory=list)  # unwrapped, both
    learning_rates: tuple[float, float] = (0.0, 0.0)
    lora: bool = False
    frozen_dtype: torch.dtype | None = None  # what untrained weights are kept in (the autocast dtype)
    prepared: dict[int, torch.nn.Module] = field(default_factory=dict)  # index -> accelerate-prepared module

    @classmethod
    def frozen(cls) -> TrainedTextEncoders:
        return cls()

    @classmethod
    def load(
        cls, model_dir: str, settings: TextEncoderSettings, frozen_dtype: torch.dtype | None = None
    ) -> TrainedTextEncoders:
        """The base's encoders, trained weights in fp32 (master weights; autocast runs them in the mixed dtype)
        in train mode, encoder 1's unread modules frozen, a LoRA on each with ``lora_rank``. Frozen weights (an
        encoder with learning rate 0, a LoRA's base) are cast to ``frozen_dtype``, the run's autocast dtype."""
        tokenizers, encoders = load_text_encoders(model_dir)
        for index, encoder in enumerate(encoders):
            if not settings.learning_rates[index]:
                continue
            skip = unread_modules(encoder) if index == 0 else []
            if settings.lora_rank:
                if frozen_dtype is not None:
                    encoder.to(frozen_dtype)  # frozen weights need no fp32 master copy; the adapter is fp32
                add_text_encoder_lora(
                    encoder, settings.lora_rank, settings.lora_alpha, settings.lora_dropout, skip
                )
            else:
                encoder.requires_grad_(True)
                for name in skip:
                    encoder.get_submodule(name).requires_grad_(False)
            encoder.train()
            if settings.gradient_checkpointing:  # non-reentrant: a LoRA's frozen inputs still pass gradients
                encoder.activation_checkpointing_enable({"use_reentrant": False})
        return cls(tokenizers, encoders, settings.learning_rates, bool(settings.lora_rank), frozen_dtype)

    @property
    def trains(self) -> bool:
        return any(self.learning_rates)

    @property
    def trained(self) -> list[int]:
        """Indices (0, 1) of the encoders that train."""
        return [i for i, lr in enumerate(self.learning_rates) if lr and self.encoders]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trained parameter of both encoders (gradient clipping runs over these with the UNet's)."""
        return [p for i in self.trained for p in self.encoders[i].parameters() if p.requires_grad]

    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        """One optimizer parameter group per trained encoder, with its learning rate × ``lr_scale``."""
        return [
            {
                "params": [p for p in self.encoders[i].parameters() if p.requires_grad],
                "lr": self.learning_rates[i] * lr_scale,
            }
            for i in self.trained
        ]

    def prepare(self, accelerator) -> list[torch.nn.Module]:
        """The trained encoders through ``accelerator.prepare`` (DDP, autocast), the frozen one moved to the
        device; returns the prepared ones (for ``accelerator.accumulate``). Call after the UNet's prepare, so
        checkpoints list the models as [UNet, encoders...] in every run."""
        for index, encoder in enumerate(self.encoders):
            if index not in self.trained:
                encoder.to(accelerator.device, self.frozen_dtype)
        for index in self.trained:
            self.prepared[index] = accelerator.prepare(self.encoders[index])
        return [self.prepared[i] for i in self.trained]

    def encode_in_step(self, prompts: list[str], max_chunks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) with gradients, through the prepared encoders: inside the training step."""
        models = [self.prepared.get(i, encoder) for i, encoder in enumerate(self.encoders)]
        return encode_prompts_with_grad(prompts, self.tokenizers, models, max_chunks)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_chunks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) without gradients, the encoders in eval mode: held-out batches."""
        with self.evaluating():
            return encode_prompts_with_grad(prompts, self.tokenizers, self.encoders, max_chunks)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Within the block the encoders are in eval mode (no LoRA dropout), then as they were."""
        modes = [encoder.training for encoder in self.encoders]
        for encoder in self.encoders:
            encoder.eval()
        try:
            yield
        finally:
            for encoder, mode in zip(self.encoders, modes, strict=True):
                encoder.train(mode)

    def pipeline_components(self) -> dict[str, torch.nn.Module]:
        """The trained encoders by pipeline component name (text_encoder, text_encoder_2): what a pipeline for
        validation or export takes instead of the base's; empty when they are frozen."""
        return {PIPELINE_NAMES[i]: self.encoders[i] for i in self.trained}

    # --- checkpoints ----------------------------------------------------------------------------------------

    def register_checkpoint_hooks(self, accelerator) -> None:
        """A LoRA run checkpoints the encoders' adapters only (TEXT_LORA_STATE_NAME); whole encoders are saved
        and loaded by accelerate as prepared models. Register these BEFORE the UNet's hooks: accelerate hands
        every save hook the full model list with a shrinking list of state dicts, so the later entries must go
        first (the UNet is entry 0)."""
        if not (self.lora and self.trained):
            return
        writer = (
            accelerator.is_local_main_process
            if accelerator.project_configuration.save_on_each_node
            else accelerator.is_main_process
        )
        save_hook, load_hook = self._lora_checkpoint_hooks(writer)
        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def _lora_state(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"{PIPELINE_NAMES[i]}.{name}": p
            for i in self.trained
            for name, p in self.encoders[i].named_parameters()
            if p.requires_grad
        }

    def _indices(self, models: list) -> list[int]:
        from accelerate.utils import extract_model_from_parallel

        mine = {id(self.encoders[i]) for i in self.trained}
        return [
            i
            for i, model in enumerate(models)
            if id(extract_model_from_parallel(model, keep_torch_compile=False)) in mine
        ]

    def _lora_checkpoint_hooks(self, writer: bool) -> tuple[Callable, Callable]:
        from safetensors import safe_open
        from safetensors.torch import save_file

        def save_hook(models: list, weights: list, output_dir: str) -> None:
            if weights:  # empty under DeepSpeed/FSDP (refused with --train_text_encoder anyway)
                for index in sorted(self._indices(models), reverse=True):
                    weights.pop(index)
            if writer:
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in self._lora_state().items()}
                settings = {"learning_rates": list(self.learning_rates)}
                path = Path(output_dir) / TEXT_LORA_STATE_NAME
                save_file(tensors, str(path), {"lora": json.dumps(settings)})

        def load_hook(models: list, input_dir: str) -> None:
            for index in sorted(self._indices(models), reverse=True):
                models.pop(index)
            path = Path(input_dir) / TEXT_LORA_STATE_NAME
            if not path.is_file():
                from sdxl_ztsnr.console import UserError

                raise UserError(
                    f"{path}: missing; this checkpoint was not saved by a run that trained text-encoder LoRAs "
                    "(resume it with the flags it was trained with)"
                )
            params = self._lora_state()
            with safe_open(str(path), framework="pt") as f, torch.no_grad():
                if set(f.keys()) != set(params):
                    from sdxl_ztsnr.console import UserError

                    raise UserError(
                        f"{path}: its text-encoder LoRA tensors do not match this run's; resume with the same "
                        "--lora_rank / --text_encoder_lr / --text_encoder_2_lr"
                    )
                for name, param in params.items():
                    param.copy_(f.get_tensor(name))

        return save_hook, load_hook

    # --- LoRA files -----------------------------------------------------------------------------------------

    def save_lora(self, diffusers_file: Path, kohya_file: Path, unet: torch.nn.Module) -> None:
        """Add the encoders' LoRAs to the UNet's two LoRA files (sdxl_ztsnr.lora.save_lora wrote them): the
        diffusers file gets `text_encoder.` / `text_encoder_2.` + peft keys (what load_lora_weights reads),
        the kohya file `lora_te1_` / `lora_te2_` keys (what ComfyUI, A1111 and Forge read)."""
        if not (self.lora and self.trained):
            return
        from diffusers import StableDiffusionXLPipeline
        from peft.utils import get_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import save_file

        from sdxl_ztsnr.lora import diffusers_lora_state_dict

        def cpu(state: dict) -> dict:
            return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

        layers, metadata = {}, {}
        for i in self.trained:
            encoder, name = self.encoders[i], PIPELINE_NAMES[i]
            layers[f"{name}_lora_layers"] = cpu(get_peft_model_state_dict(encoder))
            metadata[f"{name}_lora_adapter_metadata"] = encoder.peft_config[ADAPTER_NAME].to_dict()
        StableDiffusionXLPipeline.save_lora_weights(
            diffusers_file.parent,
            unet_lora_layers=cpu(diffusers_lora_state_dict(unet)),
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
            weight_name=diffusers_file.name,
            safe_serialization=True,
            **layers,
            **metadata,
        )
        with safe_open(str(kohya_file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        for i in self.trained:
            tensors.update(kohya_text_encoder_state_dict(self.encoders[i], KOHYA_PREFIXES[i]))
        header["ss_train_text_encoder"] = "True"
        header["ss_text_encoder_lr"] = json.dumps([self.learning_rates[i] for i in range(2)])
        save_file(cpu(tensors), str(kohya_file), metadata=header)
