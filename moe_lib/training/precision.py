"""Which floating-point precision a run uses, chosen from what the hardware does natively.

* CUDA with native bf16 (Ampere and newer): bf16 autocast, no loss scaling (bf16 has fp32's range).
* CUDA without it (Colab's free T4, V100): fp16 autocast with ``torch.amp.GradScaler``. fp16's
  largest value is 65504 and its smallest normal 6e-5, so small gradients underflow unless the
  loss is multiplied by a scale ``s`` before backward; the scaler divides the gradients by ``s``
  again, skips any step whose gradients hold inf/NaN, halves ``s`` then, and doubles it after
  ``growth_interval`` clean steps.
* CPU: fp32 under ``auto``. bf16 only when asked, and with a warning when a small matmul probe
  shows bf16 much slower than fp32 (CPUs without AVX512-BF16/AMX emulate it, up to ~100x slower).

The router keeps fp32 in every case (its softmax and top-k are precision-sensitive).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

# bf16 counts as native on a CPU when a bf16 matmul runs at least this fraction of fp32's speed.
# Emulated bf16 measured 1/160 of fp32 on a 2-core x86 without AVX-512; native units run faster than fp32.
NATIVE_SPEED_FRACTION = 0.5


@dataclass(frozen=True)
class Precision:
    """The resolved choice: autocast dtype (``None`` = plain fp32), loss scaling, and why."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler for ``device``, enabled only for fp16 (disabled it passes everything through)."""
        return torch.amp.GradScaler(device.type, enabled=self.needs_grad_scaler)


def matmul_speed_ratio(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """Speed of an ``n x n`` matmul in ``dtype`` relative to fp32 on the CPU (1.0 = as fast).

    Small enough to cost milliseconds even where ``dtype`` is emulated (256^3 MACs at 1 GFLOP/s = 34 ms).
    """
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a, b = a32.to(dtype), b32.to(dtype)

    def best_seconds(x, y) -> float:
        x @ y  # warm-up: kernel selection, first-touch pages
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    return best_seconds(a32, b32) / max(best_seconds(a, b), 1e-9)


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_native() -> bool:
    """Probe once per process: is a bf16 matmul on this CPU at least half as fast as fp32?"""
    return matmul_speed_ratio(torch.bfloat16) >= NATIVE_SPEED_FRACTION


def cuda_bf16_is_native(device: torch.device) -> bool:
    """bf16 in hardware (compute capability 8.0+), not the emulation older GPUs fall back to."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(requested: str, device_type: str, *, bf16_native: bool) -> Precision:
    """The precision for ``requested`` ("auto", "bf16", "fp16" or "fp32") on ``device_type``.

    ``bf16_native`` is the hardware answer (``cuda_bf16_is_native`` / ``cpu_bf16_is_native``),
    passed in so the decision is testable on any machine. Warns when an explicit choice is slow here.
    """
    valid = ("auto", "bf16", "fp16", "fp32")
    if requested not in valid:
        raise ValueError(f"precision={requested!r} is not valid: choose one of {list(valid)}")
    if requested == "fp32":
        return Precision(None, "fp32 as requested")
    if requested == "fp16":
        return Precision(torch.float16, "fp16 autocast with a GradScaler, as requested")
    if device_type == "cuda":
        if bf16_native:
            return Precision(torch.bfloat16, "bf16 autocast: this GPU has native bf16")
        if requested == "auto":
            return Precision(torch.float16, "fp16 autocast with a GradScaler: this GPU has no native bf16 (e.g. T4, V100)")
        warnings.warn("precision='bf16' on a GPU without native bf16 is emulated and slow; "
                      "precision='auto' would use fp16 with a GradScaler here", RuntimeWarning, stacklevel=2)
        return Precision(torch.bfloat16, "bf16 autocast as requested, emulated on this GPU")
    if requested == "auto":
        return Precision(None, f"fp32: auto uses reduced precision only on CUDA, not on {device_type}")
    if device_type == "cpu" and not bf16_native:
        warnings.warn("precision='bf16' on a CPU without native bf16 (no AVX512-BF16/AMX): a bf16 matmul ran at less "
                      f"than {NATIVE_SPEED_FRACTION:.0%} of fp32's speed here, so training will be much slower than fp32; "
                      "use precision='auto' or 'fp32'", RuntimeWarning, stacklevel=2)
        return Precision(torch.bfloat16, "bf16 autocast as requested, emulated on this CPU (slow)")
    return Precision(torch.bfloat16, f"bf16 autocast as requested on {device_type}")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """:func:`choose_precision` with the hardware's own answers (the CPU probe runs only for bf16 on CPU)."""
    if requested in ("fp32", "fp16") or (requested == "auto" and device.type != "cuda"):
        native = False  # not consulted
    elif device.type == "cuda":
        native = cuda_bf16_is_native(device)
    else:
        native = device.type != "cpu" or cpu_bf16_is_native()
    return choose_precision(requested, device.type, bf16_native=native)


def autocast_context(device: torch.device, precision: str):
    """The autocast that :func:`moe_lib.training.precision.resolve_precision` picks for this hardware."""
    return resolve_precision(precision, device).autocast(device)



class OptimizerStep(NamedTuple):
    """What :func:`optimizer_step` did: whether the step was taken, and the gradient norm before clipping."""

    taken: bool  # False when the GradScaler skipped it: a gradient held inf/NaN
    grad_norm: torch.Tensor  # global L2 norm of the (unscaled) gradients before clipping; 0-dim, on the device (no host sync)


def clip_global_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """The L2 norm of all the gradients together, before clipping; scales them to ``max_norm`` when above it (0: no clip)."""
    parameters = [p for p in parameters if p.grad is not None]
    grad_norm = nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm > 0:
        nn.utils.clip_grads_with_norm_(parameters, max_norm, grad_norm)
    return grad_norm


def optimizer_step(
    optimizers: Iterable[torch.optim.Optimizer], scaler: torch.amp.GradScaler, parameters, grad_clip: float,
    clip_grad_norm: Callable[[float], torch.Tensor] | None = None,
) -> OptimizerStep:
    """Unscale, clip, step every optimizer, update the scale, zero the grads.

    The step is not taken when the scaler skipped it because a gradient held inf/NaN (it then
    halves its scale); with the scaler disabled every step is taken. The gradient norm is the
    one clipping divides by (computed also when ``grad_clip`` is 0, so that runs log it):
    ``clip_grad_norm(grad_clip)`` when given (expert parallelism's norm over ranks), else
    :func:`clip_global_grad_norm` of ``parameters``.
    """
    optimizers = list(optimizers)
    for opt in optimizers:
        scaler.unscale_(opt)  # grads back to true units before clipping
    if clip_grad_norm is None:
        grad_norm = clip_global_grad_norm(parameters, grad_clip)
    else:
        grad_norm = clip_grad_norm(grad_clip)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return OptimizerStep(scale_before is None or scaler.get_scale() >= scale_before, grad_norm)
