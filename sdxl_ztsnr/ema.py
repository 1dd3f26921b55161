"""EMA of the trained weights: on the accelerator or in host memory, updated every N steps, checkpointable.

`EmaWeights` keeps its state in diffusers' `EMAModel` (the warm-up of the decay, the checkpoint format and its
checks, device moves) and does the update and the swap itself, because `EMAModel` cannot do what the trainer
needs there: its `step()` subtracts shadow and live tensors directly, so shadows in host memory cannot follow
parameters on a GPU; its foreach path allocates a temporary the size of the model (10 GiB for SDXL's UNet in
fp32); it counts EMA updates, not optimizer steps, so the decay cannot be compensated for skipped steps;
`store()`/`restore()` copy every weight to host memory for each swap; and `save_pretrained()` builds a second
randomly initialised model from its config (and writes the EMA settings into that model's config.json), which
for LoRA-only EMA would be the wrong model altogether.

Typical use (full fine-tune):

    ema = EmaWeights(unet.parameters(), decay=0.9999, update_every=10, device="cpu")
    accelerator.register_save_state_pre_hook(ema.save_state_hook(accelerator.is_main_process))
    accelerator.register_load_state_pre_hook(ema.load_state_hook())
    ...  # after each optimizer step (accelerator.sync_gradients), with the new global step:
    ema.update(global_step)
    with ema.swapped_in():  # validation / export with the EMA weights
        ...
    ema.save(unet, output_dir / EMA_UNET_SUBFOLDER)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

EmaDevice = Literal["accelerator", "cpu"]
EmaWarmup = Literal["power", "tensorflow", "none"]

EMA_UNET_SUBFOLDER = "unet_ema"  # beside unet/ in the output directory; a diffusers UNet directory
EMA_STATE_NAME = "ema_state.safetensors"  # in checkpoint directories, written by the save-state hook
_SETTINGS = ("decay", "min_decay", "use_ema_warmup", "inv_gamma", "power")
_CAST_CHUNK_NUMEL = 1 << 26  # 256 MiB of fp32: bounds the temporary when live and shadow dtypes differ


@torch.no_grad()
def ema_update_(shadow: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """θ̄ ← decay·θ̄ + (1 − decay)·θ in place (Polyak & Juditsky 1992; diffusers' EMAModel.step)."""
    # lerp(θ̄, θ, 1 − decay) is that update without a temporary; weight 1 (decay 0) gives exactly θ.
    weight = 1.0 - decay
    same = [(s, p) for s, p in zip(shadow, live, strict=True) if (s.dtype, s.device) == (p.dtype, p.device)]
    if same:
        torch._foreach_lerp_([s for s, _ in same], [p for _, p in same], weight)
    other = [(s, p) for s, p in zip(shadow, live, strict=True) if (s.dtype, s.device) != (p.dtype, p.device)]
    # bf16 live weights or another device: cast a bounded chunk at a time (lerp needs one dtype and device).
    start = 0
    while start < len(other):
        end, numel = start, 0
        while end < len(other) and (end == start or numel + other[end][0].numel() <= _CAST_CHUNK_NUMEL):
            numel += other[end][0].numel()
            end += 1
        chunk = other[start:end]
        cast = [p.to(device=s.device, dtype=s.dtype) for s, p in chunk]
        torch._foreach_lerp_([s for s, _ in chunk], cast, weight)
        start = end


class EmaWeights:
    """An exponential moving average of `parameters` (the trainable ones: all of the UNet, or only the LoRA).

    decay: the largest per-step decay, reached after the warm-up. warmup (per optimizer step s ≥ 2; step 1 copies):
      "power": 1 − (1 + (s−1)/inv_gamma)^−power (crowsonkb's warm-up; 2/3 reaches 0.999 at ~31.6k steps,
      3/4 for shorter runs reaches it at ~10k); "tensorflow": s / (s + 9) (tf.train.ExponentialMovingAverage,
      and diffusers' EMAModel default); "none": `decay` from the start.
    update_every: average only every N optimizer steps. An update at step t uses the product of the per-step
      decays since the previous update (≈ decay**N), i.e. exactly what N per-step updates would give had the
      weights stayed as they are at t. The last steps of a run that is not a multiple of N are folded in by
      `update(final_step, force=True)`.
    device: "accelerator" keeps the fp32 average beside the weights (fastest; one more fp32 copy of the model in
      accelerator memory). "cpu" keeps it in host memory: at each update the weights are copied once into a
      pinned host buffer (non-blocking from CUDA) and averaged there by a background thread while training goes
      on; host memory holds the fp32 average plus that buffer (SDXL UNet: 10.3 GB + the weights' size).
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float = 0.9999,
        update_every: int = 1,
        device: EmaDevice = "accelerator",
        warmup: EmaWarmup = "power",
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
    ):
        from diffusers.training_utils import EMAModel

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {decay}.")
        if update_every < 1:
            raise ValueError(f"--ema_update_every must be >= 1, got {update_every}.")
        if device not in ("accelerator", "cpu"):
            raise ValueError(f"--ema_device must be 'accelerator' or 'cpu', got {device!r}.")
        if warmup not in ("power", "tensorflow", "none"):
            raise ValueError(f"EMA warm-up must be 'power', 'tensorflow' or 'none', got {warmup!r}.")
        if inv_gamma <= 0 or power <= 0:
            raise ValueError(f"EMA warm-up needs inv_gamma > 0 and power > 0, got {inv_gamma} and {power}.")
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("EmaWeights: no parameters to average (were they all frozen?).")
        self.update_every = update_every
        self.device = device
        # "none" is EMAModel with its decay floor at the decay itself.
        min_decay = float(decay) if warmup == "none" else 0.0
        # fp32 average: a bf16 one would lose every update smaller than bf16's step (1 − 0.9999 ≪ 2⁻⁸).
        # Built where it will live, so a host-memory average never needs a second copy on the accelerator.
        initial = [
            p.detach().to(device="cpu" if device == "cpu" else p.device, dtype=torch.float32)
            for p in self.parameters
        ]
        with torch.no_grad():
            self._ema = EMAModel(
                initial,
                decay=float(decay),
                min_decay=min_decay,
                use_ema_warmup=warmup == "power",
                inv_gamma=float(inv_gamma),
                power=float(power),
            )
        del initial  # EMAModel keeps clones
        self._staging: list[torch.Tensor] = []
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        if device == "cpu":
            self._place_in_host_memory()

    # -- state ------------------------------------------------------------------------------------------------

    @property
    def shadow(self) -> list[torch.Tensor]:
        """The averaged tensors (fp32), one per tracked parameter, in order; waits for a pending update."""
        self.synchronize()
        return self._ema.shadow_params

    @property
    def step(self) -> int:
        """The optimizer step of the last update (0 before the first)."""
        return self._ema.optimization_step

    def decay_at(self, step: int) -> float:
        """The per-step decay at optimizer step `step` (1-based), warm-up included."""
        return self._ema.get_decay(step)

    def update_decay(self, step: int) -> float:
        """The decay an update at `step` applies: the product of the per-step decays since the last update."""
        return math.prod(self.decay_at(s) for s in range(self.step + 1, step + 1))

    def update(self, step: int, force: bool = False) -> bool:
        """Call after every optimizer step with the new global step; averages when `step % update_every == 0`.

        `force` averages now regardless (the last step of a run). Returns whether an update was made.
        """
        if step < self.step:
            raise ValueError(f"EmaWeights.update: step {step} is before the last update's step {self.step}.")
        if step == self.step or (step % self.update_every and not force):
            return False
        decay = self.update_decay(step)
        self._ema.optimization_step, self._ema.cur_decay_value = step, decay
        if self.device == "accelerator":
            ema_update_(self._ema.shadow_params, [p.detach() for p in self.parameters], decay)
            return True
        self.synchronize()  # the previous average has read the host buffer; it may be overwritten now
        live = [p.detach() for p in self.parameters]
        for buffer, p in zip(self._staging, live, strict=True):
            buffer.copy_(p, non_blocking=True)  # pinned destination: the host does not wait for CUDA
        ready = None
        if any(p.is_cuda for p in live):
            ready = torch.cuda.Event()
            ready.record()  # after the copies on the current stream: the buffer is complete when this fires
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending = self._executor.submit(self._average_staged, decay, ready)
        return True

    def _average_staged(self, decay: float, ready) -> None:
        if ready is not None:
            ready.synchronize()
        ema_update_(self._ema.shadow_params, self._staging, decay)

    def synchronize(self) -> None:
        """Wait for a host-memory update still running in the background (and re-raise its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _place_in_host_memory(self) -> None:
        """Shadow and the staging buffer in host memory, page-locked when CUDA is there (async copies)."""
        pin = torch.cuda.is_available()
        if pin:
            self._ema.pin_memory()
        self._staging = [
            torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in self.parameters
        ]

    def state_dict(self) -> dict:
        """EMAModel's state (settings, `optimization_step` = last update's step, fp32 `shadow_params`)."""
        state = dict(self._ema.state_dict())
        state["shadow_params"] = self.shadow
        state["update_every"] = self.update_every
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the average and its step; the decay settings of this run are kept (a warning if they differ)."""
        self.synchronize()
        shadow = state.get("shadow_params")
        if not isinstance(shadow, list) or len(shadow) != len(self.parameters):
            got = len(shadow) if isinstance(shadow, list) else type(shadow).__name__
            raise ValueError(
                f"EMA state holds {got} tensors, this run averages {len(self.parameters)}: the checkpoint was "
                "made for another model or another set of trainable parameters (LoRA vs full fine-tune)."
            )
        for i, (saved, param) in enumerate(zip(shadow, self.parameters, strict=True)):
            if tuple(saved.shape) != tuple(param.shape):
                raise ValueError(
                    f"EMA state tensor {i} has shape {tuple(saved.shape)}, the parameter {tuple(param.shape)}: "
                    "the checkpoint was made for another model (or another --lora_rank)."
                )
        ours = self._ema.state_dict()
        changed = {k: (state[k], ours[k]) for k in _SETTINGS if k in state and state[k] != ours[k]}
        if changed:
            logger.warning(
                "EMA settings differ from the checkpoint's (saved, now): %s; using the new ones", changed
            )
        self._ema.load_state_dict(
            {"optimization_step": int(state["optimization_step"]), "shadow_params": shadow}
        )
        self._ema.shadow_params = [
            s.to(device="cpu" if self.device == "cpu" else p.device, dtype=torch.float32)
            for s, p in zip(self._ema.shadow_params, self.parameters, strict=True)
        ]
        if self.device == "cpu" and torch.cuda.is_available():
            self._ema.pin_memory()

    # -- checkpoints as safetensors (no pickle) --------------------------------------------------------------

    def save_state_hook(self, is_main_process: bool) -> Callable:
        """For `accelerator.register_save_state_pre_hook`: writes EMA_STATE_NAME into the checkpoint directory.

        Prefer this to `register_for_checkpointing(ema)`, which works too but makes accelerate unpickle the
        state on resume (`weights_only=False`). Pass `accelerator.is_main_process` (or the local main process
        with `save_on_each_node`): the average is the same on every rank, one writes it.
        """

        def hook(models, weights, output_dir: str) -> None:
            if is_main_process:
                self.save_state(output_dir)

        return hook

    def load_state_hook(self) -> Callable:
        """For `accelerator.register_load_state_pre_hook`: every rank reads EMA_STATE_NAME back."""

        def hook(models, input_dir: str) -> None:
            self.load_state(input_dir)

        return hook

    def save_state(self, directory: str | Path) -> Path:
        """state_dict() as one safetensors file: tensors `shadow.<i>`, settings as JSON in the metadata."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {
            f"shadow.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(state.pop("shadow_params"))
        }
        path = Path(directory) / EMA_STATE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"ema": json.dumps(state)})
        return path

    def load_state(self, directory: str | Path) -> None:
        """Read what save_state wrote; a checkpoint without it (EMA switched on at resume) is refused."""
        from safetensors import safe_open

        path = Path(directory) / EMA_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; the checkpoint was saved without EMA. Resume without --use_ema, or start a "
                "new run with it."
            )
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["ema"])
            state["shadow_params"] = [f.get_tensor(f"shadow.{i}") for i in range(len(f.keys()))]
        self.load_state_dict(state)

    # -- using the average ---------------------------------------------------------------------------------

    def _check_same_layout(self, params: list[torch.nn.Parameter]) -> None:
        if len(params) != len(self.parameters) or any(
            (p.shape, p.dtype) != (q.shape, q.dtype) for p, q in zip(params, self.parameters, strict=True)
        ):
            raise ValueError(
                f"EmaWeights.swapped_in: got {len(params)} parameters, the average has {len(self.parameters)} "
                "(or their shapes or dtypes differ); pass the parameters given at construction, in that order."
            )

    @contextmanager
    def swapped_in(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights (read-only use: validation, export).

        On exit the raw weights are back, bit for bit. "accelerator": the parameters point at the average, no
        copy (a cast copy if their dtype differs). "cpu": the raw weights wait in the host staging buffer while
        the average is copied in, so accelerator memory does not grow.
        """
        params = self.parameters if parameters is None else list(parameters)
        self._check_same_layout(params)
        shadow = self.shadow
        with torch.no_grad():
            if self.device == "accelerator":
                raw = [p.data for p in params]
                for p, s in zip(params, shadow, strict=True):
                    p.data = s if s.dtype == p.dtype else s.to(p.dtype)
                try:
                    yield
                finally:
                    for p, r in zip(params, raw, strict=True):
                        p.data = r
                return
            live = [p.detach() for p in params]
            for buffer, p, s in zip(self._staging, live, shadow, strict=True):
                buffer.copy_(p)
                p.copy_(s)
            try:
                yield
            finally:
                for p, buffer in zip(live, self._staging, strict=True):
                    p.copy_(buffer)

    def save(self, unet, out_dir: str | Path) -> Path:
        """The UNet with the EMA weights as a diffusers directory (safetensors), e.g. `output_dir/unet_ema`.

        `unet` is the unwrapped model whose parameters are averaged. For LoRA-only EMA save the adapter instead:
        `with ema.swapped_in(): lora.save_lora(unet, output_dir / lora.EMA_LORA_SUBFOLDER, ...)`.
        """
        if getattr(unet, "peft_config", None):
            raise ValueError(
                "EmaWeights.save: this UNet carries LoRA adapters; save the EMA LoRA weights instead: "
                "`with ema.swapped_in(): sdxl_ztsnr.lora.save_lora(unet, output_dir / 'lora_ema', ...)`."
            )
        unet_params = {id(p) for p in unet.parameters()}
        if not all(id(p) in unet_params for p in self.parameters):
            raise ValueError(
                "EmaWeights.save: the averaged parameters are not this UNet's (pass the unwrapped UNet)."
            )
        out_dir = Path(out_dir)
        with self.swapped_in():
            unet.save_pretrained(out_dir, safe_serialization=True)
        return out_dir
