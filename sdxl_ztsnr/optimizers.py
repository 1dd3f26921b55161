"""Optimizers and the memory thrift around them: AdamW / 8-bit AdamW / Adafactor, bf16 weights updated with
stochastic rounding or a compensation buffer, and the fused backward pass (each parameter stepped inside
backward, so whole-model gradients never exist).

Memory per parameter of a full fine-tune (SDXL UNet: 2.567B parameters; 1 GiB = 2**30 bytes):

    fp32 weights + fp32 grads + AdamW (2 x fp32)   16 bytes   38.3 GiB
    bf16 weights, fused backward, Adafactor         ~2 bytes    ~5 GiB  (+ one parameter's grad at a time)

Adafactor keeps a row and a column second-moment vector per matrix, not a full-size one (Shazeer & Stern
2018); the fused pass keeps one parameter's gradient alive at a time (what kohya's sd-scripts and OneTrainer
call "fused backward pass"). Both are plain PyTorch: ``Tensor.register_post_accumulate_grad_hook``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import is_fake

from sdxl_ztsnr.optional_packages import import_bitsandbytes

logger = logging.getLogger(__name__)

OptimizerName = Literal["adamw", "adamw8bit", "adafactor"]
Bf16Update = Literal["stochastic", "kahan"]
MakeOptimizer = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW, whose kernel reads ``found_inf`` and skips the update on device."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))


def mark_nonfinite_step(
    optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, scaler_skips: bool = False
) -> torch.Tensor:
    """Make the coming ``optimizer.step()`` a no-op when the gradient norm is not finite; returns the flag (0/1).

    torch's fused Adam kernels take a ``found_inf`` tensor (the mechanism GradScaler uses) and leave
    parameters, moments and the step count unchanged when it is 1 — decided on the device, so the
    host never waits for the backward pass. A NaN/Inf loss gives a NaN gradient norm, hence a skip.
    Other optimizers (bitsandbytes' 8-bit AdamW) cost one host sync: on a bad step their gradients
    are dropped, and an optimizer skips parameters without a gradient. With fp16 autocast the
    GradScaler already skips such steps (``scaler_skips``); only the flag is returned.
    """
    found_inf = (~torch.isfinite(grad_norm.detach().float())).float().reshape(())
    if scaler_skips:
        return found_inf
    inner = getattr(optimizer, "optimizer", optimizer)
    if supports_device_skip(inner):
        # Given found_inf, the kernel also rolls every parameter's step counter back by it, one tensor at a time
        # on the CPU. There reading the flag costs nothing (no device queue to stall), so the kernel gets it only
        # for a bad step; on an accelerator it always does, and the host never waits.
        if found_inf.device.type != "cpu" or found_inf.item():
            inner.found_inf = found_inf
    elif found_inf.item():
        for group in inner.param_groups:
            for param in group["params"]:
                param.grad = None
    return found_inf


def clear_nonfinite_mark(optimizer: torch.optim.Optimizer) -> None:
    """Remove the ``found_inf`` / ``grad_scale`` attributes after the step so they never leak into a later one."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for name in ("found_inf", "grad_scale"):
        if hasattr(inner, name):
            delattr(inner, name)


# On the CPU a norm costs ~5 µs per tensor before it reads a byte (dispatch, reduction set-up); below this many
# elements, copying a gradient into one flat buffer is cheaper than a norm of its own.
_CPU_SMALL_GRADIENT = 4096


def global_grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """‖g‖₂ over every gradient, as a 0-dim fp32 tensor on the gradients' device (one read pass, no sync).

    On an accelerator ``_foreach_norm`` is one multi-tensor kernel. On the CPU it is a loop of norms, one per
    tensor, and most of a UNet's tensors are biases and norm weights of a few hundred elements: those are
    copied into one flat buffer (one C++ call) and normed together, which halves the cost (the tiny test UNet:
    494 of its 620 tensors, 19% of its 2.7M elements).
    """
    grads = [g for p in parameters if (g := p.grad) is not None]
    if not grads:
        return torch.zeros(())
    if grads[0].device.type != "cpu" or is_fake(grads[0]):  # fake: benchmarks/memory.py models an accelerator
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
    small = [g for g in grads if g.numel() <= _CPU_SMALL_GRADIENT]
    large = [g for g in grads if g.numel() > _CPU_SMALL_GRADIENT]
    norms = list(torch._foreach_norm(large, 2, dtype=torch.float32)) if large else []
    for dtype in {g.dtype for g in small}:  # one flat buffer per dtype (bf16 weights: bf16 grads)
        flat = torch._utils._flatten_dense_tensors([g for g in small if g.dtype == dtype])
        norms.append(torch.linalg.vector_norm(flat, dtype=torch.float32))
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_and_check_gradients(
    accelerator,
    optimizer: torch.optim.Optimizer,
    parameters: list,
    max_norm: float,
    scaler_skips: bool = False,
) -> torch.Tensor:
    """Global-norm clipping to ``max_norm`` (math.inf: none) and the non-finite check for the coming step.

    Returns the non-finite flag (0/1, on the device, no host sync):
    - fused backward pass (attached): backward already clipped per parameter and stepped, skipping non-finite
      parameters; the flag says whether any was skipped;
    - torch's fused Adam/AdamW under DDP or one process: the clip factor is handed to the optimizer's kernel as
      ``grad_scale`` (GradScaler's mechanism: the kernel divides each gradient by it as it reads it), sparing
      clip_grad_norm_'s extra multiply pass over every gradient; the update is the same as clipping first;
    - elsewhere (FSDP and DeepSpeed shard gradients, fp16's GradScaler owns grad_scale, other optimizers)
      accelerate's clip_grad_norm_ clips; a per-parameter optimizer then skips non-finite parameters itself.
    """
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, FusedBackward) and inner.attached:
        return inner.pop_nonfinite_flag()
    whole_gradients = accelerator.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_GPU,
        DistributedType.MULTI_CPU,
    )
    if whole_gradients and not scaler_skips and supports_device_skip(inner):
        norm = global_grad_norm(parameters)
        if math.isfinite(max_norm):
            # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); dividing by its inverse is the same
            inner.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
    else:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
        if norm is None:  # DeepSpeed before its first step reports no norm
            norm = torch.zeros((), device=accelerator.device)
        norm = torch.as_tensor(norm, device=accelerator.device)
    if isinstance(inner, PerParameterOptimizer):
        return (~torch.isfinite(norm.float())).float().reshape(())
    return mark_nonfinite_step(optimizer, norm, scaler_skips)


def build_optimizer(
    params,
    name: OptimizerName,
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """AdamW (fused where torch has a kernel: one launch per step, and it can skip a step on device),
    bitsandbytes' 8-bit AdamW, or transformers' Adafactor with a fixed learning rate.

    Adafactor is set up as SDXL fine-tunes use it (kohya's sd-scripts docs and its fused-backward PR):
    ``scale_parameter=False, relative_step=False, warmup_init=False`` and the given lr, no first moment;
    ``betas`` and ``eps`` are AdamW's and do not apply to it. ``weight_decay`` is decoupled in both.
    """
    if name == "adamw8bit":
        bnb = import_bitsandbytes()
        return bnb.optim.AdamW8bit(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=weight_decay,
        )
    if name != "adamw":
        raise ValueError(f"--optimizer {name!r}: choose adamw, adamw8bit or adafactor")
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused
    )


# --- bf16 weights: the update is computed in fp32, then written back without losing small steps ----------


def stochastic_round_(
    target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Write fp32 ``source`` into bf16 ``target``, rounding up with probability equal to the dropped fraction
    (unbiased: E[target] = source). Gupta et al. 2015, "Deep Learning with Limited Numerical Precision", §3.
    """
    if target.dtype != torch.bfloat16 or source.dtype != torch.float32:
        raise ValueError(
            f"stochastic_round_ writes float32 into bfloat16, got {source.dtype} -> {target.dtype}"
        )
    # bf16 is the top 16 bits of fp32. Adding a uniform 16-bit integer to the bit pattern and truncating
    # carries into the kept bits with probability (dropped bits) / 2**16; for negative numbers the same add
    # grows the magnitude, so the rounding is unbiased on both sides of zero.
    noise = torch.randint(
        0, 1 << 16, source.shape, generator=generator, device=source.device, dtype=torch.int32
    )
    noise.add_(source.view(torch.int32)).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    return target.copy_(noise.view(torch.float32))


def kahan_update_(param: torch.Tensor, compensation: torch.Tensor, updated: torch.Tensor) -> None:
    """Store fp32 ``updated`` as the bf16 pair (param, compensation) whose sum carries what rounding ``param``
    dropped, so the next update adds to the precise value. Kahan 1965; for bf16 training: Zamirai et al. 2020,
    "Revisiting BFloat16 Training", §4.
    """
    param.copy_(updated)  # round to nearest
    compensation.copy_(updated - param.float())


def compensated_value(param: torch.Tensor, compensation: torch.Tensor | None) -> torch.Tensor:
    """The fp32 value a (bf16 param, bf16 compensation) pair stands for."""
    value = param.detach().float()
    return value if compensation is None else value.add_(compensation)


# --- one optimizer per parameter ---------------------------------------------------------------------------


class PerParameterOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, each stepped on its own: the form the fused backward pass needs, and the
    form that updates bf16 weights in fp32 one parameter at a time (``bf16_update``).

    ``make_optimizer([tensor])`` builds each inner optimizer (e.g. ``functools.partial(build_optimizer,
    name="adafactor", learning_rate=1e-5)``). ``param_groups`` are the inner optimizers' groups themselves, so
    an lr scheduler built on this object drives every parameter's learning rate.

    A bf16 parameter is stepped on a temporary fp32 copy (the inner optimizer's state is fp32) and written back
    by ``bf16_update``: "stochastic" (unbiased rounding) or "kahan" (a bf16 compensation buffer per parameter,
    2 bytes per weight); None rounds to nearest, which drops updates below half a bf16 step (~0.4% of the
    weight). fp32 parameters are stepped in place.

    A parameter whose gradient is not finite is not updated (weights and tensor state unchanged) and counted,
    decided on the device: torch's fused AdamW takes the flag itself (``found_inf``); for other optimizers the
    tensor state is copied before the step and restored where the gradient was bad. A python-number step
    counter in the state (Adafactor's, bitsandbytes') still advances. Only a parameter's first update ever
    decides on the host (one sync per parameter, once), since its state does not exist before it.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        make_optimizer: MakeOptimizer,
        max_grad_norm_per_param: float | None = None,
        bf16_update: Bf16Update | None = None,
        seed: int = 0,
    ):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters")
        if bf16_update not in (None, "stochastic", "kahan"):
            raise ValueError(f"bf16 update {bf16_update!r}: choose stochastic or kahan")
        self.params = params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.bf16_update = bf16_update
        self.max_grad_norm_per_param = max_grad_norm_per_param or None
        self.seed = seed
        self.optimizers: list[torch.optim.Optimizer] = []
        self.shadows: list[torch.nn.Parameter | None] = []
        self.device_skip = supports_device_skip(make_optimizer([torch.nn.Parameter(torch.empty(0))]))
        for p in params:
            direct = p.dtype == torch.float32 and self.device_skip
            # The fp32 working copy the inner optimizer sees; holds no memory between steps.
            shadow = None if direct else torch.nn.Parameter(torch.empty(0, device=p.device))
            self.shadows.append(shadow)
            self.optimizers.append(make_optimizer([p if direct else shadow]))
        self.compensation: list[torch.Tensor | None] = [None] * len(params)
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None  # () int64, parameter updates skipped since construction
        self._nonfinite: torch.Tensor | None = None  # () bool, any skipped since pop_nonfinite_flag()
        super().__init__(params, {})
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.optimizers]

    # --- counters ---

    def _counters(self, device: torch.device) -> None:
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        if self._nonfinite is None:
            self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    @property
    def skipped_updates(self) -> torch.Tensor:
        """Parameter updates skipped for a non-finite gradient, as a device tensor (read it when logging)."""
        self._counters(self.params[0].device)
        return self._skipped

    def pop_nonfinite_flag(self) -> torch.Tensor:
        """0/1 float device tensor: did any parameter skip its update since the last call? Resets the flag."""
        self._counters(self.params[0].device)
        flag = self._nonfinite.float()
        self._nonfinite = torch.zeros_like(self._nonfinite)
        return flag

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
        return self._generator

    # --- stepping ---

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Update one parameter from its ``.grad`` (no-op without one)."""
        grad = param.grad
        if grad is None:
            return
        i = self.index[id(param)]
        optimizer, shadow = self.optimizers[i], self.shadows[i]
        self._counters(grad.device)
        finite = torch.isfinite(grad).all()
        self._skipped += ~finite
        self._nonfinite |= ~finite
        if self.max_grad_norm_per_param is not None:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            grad.mul_((self.max_grad_norm_per_param / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
        if shadow is None:  # fp32 weights, torch's fused AdamW: it skips on the device itself
            optimizer.found_inf = (~finite).float()
            optimizer.step()
            del optimizer.found_inf
            return
        saved: dict[str, torch.Tensor] = {}
        if not self.device_skip:
            state = optimizer.state.get(shadow)
            # First update ever: no state to restore, so decide on the host (no value to read under
            # FakeTensorMode, where benchmarks/memory.py estimates memory: step).
            if not state and not is_fake(finite) and not bool(finite):
                return
            saved = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)} if state else {}
        compensation = self.compensation[i]
        value = compensated_value(param, compensation)  # fp32 weights: an alias, so step a copy
        shadow.data = value.clone() if param.dtype == torch.float32 else value
        shadow.grad = grad.float()
        if self.device_skip:
            optimizer.found_inf = (~finite).float()
        optimizer.step()
        if self.device_skip:
            del optimizer.found_inf
        for key, before in saved.items():
            current = optimizer.state[shadow][key]
            current.copy_(torch.where(finite, current, before))
        self._write_back(i, param, torch.where(finite, shadow.data, compensated_value(param, compensation)))
        shadow.grad = None
        shadow.data = torch.empty(0, device=param.device)

    def _write_back(self, i: int, param: torch.Tensor, value: torch.Tensor) -> None:
        if param.dtype == torch.bfloat16 and self.bf16_update == "stochastic":
            stochastic_round_(param.data, value, self._rng(param.device))
        elif param.dtype == torch.bfloat16 and self.bf16_update == "kahan":
            if self.compensation[i] is None:
                self.compensation[i] = torch.zeros_like(param, memory_format=torch.preserve_format)
            kahan_update_(param.data, self.compensation[i], value)
        else:
            param.data.copy_(value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every parameter that has a gradient (the ordinary step, after a whole backward pass)."""
        loss = closure() if closure is not None else None
        for param in self.params:
            self.step_parameter(param)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    # --- checkpoints (accelerate's save_state / load_state call these) ---

    def state_dict(self) -> dict[str, Any]:
        generator = self._generator.get_state() if self._generator is not None else self._generator_state
        return {
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "compensation": list(self.compensation),
            "generator": generator,
            "skipped_updates": self._skipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(state_dict['optimizers'])} parameters, the model trains "
                f"{len(self.optimizers)}: resume with the same trainable parameters (LoRA/full, targets)"
            )
        for param, shadow, optimizer, saved in zip(
            self.params, self.shadows, self.optimizers, state_dict["optimizers"], strict=True
        ):
            if shadow is not None:  # inner optimizers move their state to their parameter's device
                shadow.data = torch.empty(0, device=param.device)
            optimizer.load_state_dict(saved)
        # Loading replaces the inner groups; the lr scheduler reads ours, so point them at the new ones.
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.optimizers]
        self.compensation = [
            None if c is None else c.to(device=p.device, dtype=p.dtype)
            for p, c in zip(self.params, state_dict["compensation"], strict=True)
        ]
        generator = state_dict.get("generator")
        self._generator_state = None if generator is None else generator.cpu()
        if self._generator is not None and self._generator_state is not None:
            self._generator.set_state(self._generator_state)
        skipped = state_dict.get("skipped_updates")
        self._skipped = None if skipped is None else skipped.to(self.params[0].device)


class FusedBackward(PerParameterOptimizer):
    """Steps each parameter inside the backward pass, as soon as its gradient is complete, then frees that
    gradient: whole-model gradients never exist (SDXL UNet: 9.6 GiB in fp32, 4.8 GiB in bf16).

    After ``attach()``, ``loss.backward()`` does the update; ``step()`` is then a no-op and ``zero_grad()``
    finds nothing to free. What it cannot combine with (``check_fused_backward`` refuses these): gradient
    accumulation (each micro-batch would step), several processes (DDP all-reduces gradients after the hooks
    ran) and fp16 loss scaling (the hooks would see scaled gradients). Clipping is per parameter
    (``max_grad_norm_per_param``): no global norm exists to clip by.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        make_optimizer: MakeOptimizer,
        max_grad_norm_per_param: float | None = None,
        bf16_update: Bf16Update | None = None,
        seed: int = 0,
    ):
        super().__init__(params, make_optimizer, max_grad_norm_per_param, bf16_update, seed)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, param: torch.Tensor) -> None:
        self.step_parameter(param)
        param.grad = None

    def attach(self) -> FusedBackward:
        """Register the per-parameter hooks (after ``accelerator.prepare``, which may replace parameters)."""
        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """No-op while attached (backward already stepped); the ordinary per-parameter step otherwise."""
        if self.attached:
            return closure() if closure is not None else None
        return super().step(closure)


def check_fused_backward(gradient_accumulation_steps: int, num_processes: int, mixed_precision: str) -> None:
    """Refuse, with the fix, what the fused backward pass cannot do correctly."""
    if gradient_accumulation_steps > 1:
        raise ValueError(
            "--fused_backward_pass steps each parameter as soon as its gradient is ready, so nothing is summed "
            "over micro-batches: use --gradient_accumulation_steps 1 (raise --train_batch_size instead)"
        )
    if num_processes > 1:
        raise ValueError(
            f"--fused_backward_pass with {num_processes} processes: DDP all-reduces gradients in buckets after "
            "the per-parameter hooks ran, so each process would step on its own gradient and the copies would "
            "drift apart. Train on one process, or drop --fused_backward_pass"
        )
    if mixed_precision == "fp16":
        raise ValueError(
            "--fused_backward_pass with --mixed_precision fp16: the loss scaler unscales gradients after "
            "backward, but the fused pass steps during it. Use --mixed_precision bf16"
        )


def fused_backward_clipping_note(max_grad_norm: float) -> str | None:
    """The one log line that says how --max_grad_norm acts under the fused backward pass (None: no clipping)."""
    if not max_grad_norm or max_grad_norm <= 0:
        return None
    return (
        f"--fused_backward_pass: --max_grad_norm {max_grad_norm:g} clips each parameter's gradient to that norm "
        "on its own (whole-model gradients never exist, so there is no global norm)"
    )


def build_training_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict],
    name: OptimizerName,
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    device_type: str = "cpu",
    fused_backward: bool = False,
    bf16_update: Bf16Update | None = None,
    max_grad_norm: float = 0.0,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """The optimizer a run asks for: plain, per-parameter (bf16 weights with ``bf16_update``) or fused into
    backward (call ``.attach()`` on it after ``accelerator.prepare``).

    ``params`` are tensors, or parameter groups ({"params": [...], "lr": ...}, e.g. the UNet and each text
    encoder); a group without "lr" gets ``learning_rate``. A per-parameter optimizer gives every parameter the
    learning rate of its group.
    """
    params = list(params)
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
        group.setdefault("lr", learning_rate)
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    make = functools.partial(
        build_optimizer,
        name=name,
        learning_rate=learning_rate,
        betas=betas,
        weight_decay=weight_decay,
        eps=eps,
        device_type=device_type,
    )
    per_parameter = None
    if fused_backward:
        per_parameter = FusedBackward(params, make, max_grad_norm or None, bf16_update, seed)
    elif bf16_update is not None and any(p.dtype == torch.bfloat16 for p in params):
        per_parameter = PerParameterOptimizer(params, make, None, bf16_update, seed)
    if per_parameter is None:
        return make(groups)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for param, group in zip(per_parameter.params, per_parameter.param_groups, strict=True):
        group["lr"] = lr_of[id(param)]
    return per_parameter
