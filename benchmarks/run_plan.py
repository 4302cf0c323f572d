"""What ``bench_moe.py`` will run, decided from a quick probe of the machine before anything slow runs.

The benchmark must finish in under 15 minutes on ANY CPU (issue 22), including CPUs that
emulate bf16 (a 4096^3 bf16 matmul alone ran for 25 minutes on one) and CPUs several times
slower than the one that made ``RESULTS.md``. So the run is planned first:

1. :func:`probe_machine`: a 512^3 fp32 matmul (GFLOP/s) and moe_lib's 256^3 bf16/fp32 speed
   ratio (:func:`moe_lib.training.precision.matmul_speed_ratio`): milliseconds, even where bf16 is emulated.
2. :func:`bf16_plan`: no native bf16 -> bf16 peak sizes capped, no bf16 training rows.
3. :func:`estimate_seconds`: each section's cost, ``FLOPs / (probe speed x efficiency)``, with
   pessimistic efficiencies (below every implementation's measured % of peak in RESULTS.md).
4. :func:`make_plan`: while the estimate exceeds :data:`TARGET_SECONDS`, shrink the run one
   step at a time (:data:`SHRINK_STEPS`) and record each step's reason in ``notes``.

The estimate is a bound to plan with, not a measurement: the report prints it beside the wall time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_lib.moe.model import flops_per_token
from moe_lib.training.precision import NATIVE_SPEED_FRACTION, matmul_speed_ratio

from .moe_layers import LayerShape, dense_flops, layer_flops

BUDGET_SECONDS = 15 * 60  # issue 22: on any CPU
TARGET_SECONDS = 11 * 60  # what the plan aims at: the estimate misses Python overhead, model building, the allocator
# Pessimistic fractions of the probe's fp32 speed. RESULTS.md (2-core Xeon, 10.7 min) measured the five MoE
# implementations of a layer table at 0.26-0.7 of peak on average (the mean of their times: HF's eager loop reached
# 11% at d384 h256 E64 k8, the others 39-87%), training steps at 34-69% in fp32 and 15% of the bf16 peak in bf16.
LAYER_EFFICIENCY = 0.2
TRAIN_EFFICIENCY = 0.2
PROBE_SECONDS = 0.5  # largest peak-probe matmul: it runs again in every round of every table
LAYER_IMPLEMENTATIONS = 5  # fast path, reference loop, HF eager, HF grouped_mm, grouped matmuls alone (+ the dense row)
CORRECTNESS_TOKENS = 1024


@dataclass(frozen=True)
class MachineProbe:
    """Speeds measured in milliseconds before the run: fp32 GFLOP/s of a 512^3 matmul, and bf16's speed / fp32's."""

    fp32_gflops: float
    bf16_ratio: float


def probe_machine(size: int = 512, repeats: int = 3) -> MachineProbe:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return MachineProbe(fp32_gflops=2 * size**3 / max(best, 1e-9) / 1e9, bf16_ratio=matmul_speed_ratio(torch.bfloat16))


def bf16_plan(speed_ratio: float, quick: bool) -> dict[str, Any]:
    """What the run does in bf16, from the probe's bf16/fp32 speed ratio: everything where bf16 is
    native, else peak sizes up to 512^3 (256^3 in a quick run) and fp32-only training rows, with the reason."""
    native = speed_ratio >= NATIVE_SPEED_FRACTION
    cap = None if native else (256 if quick else 512)
    note = "" if native else (
        f"bf16 shrunk: a 256^3 bf16 matmul ran at {speed_ratio:.3f}x fp32's speed on this CPU (below "
        f"{NATIVE_SPEED_FRACTION}x: bf16 is emulated, no AVX512-BF16/AMX), so the bf16 peak is measured up to {cap}^3 only "
        "and the training tables are fp32 only; bf16 timings here would take hours and measure the emulation")
    return {"speed_ratio": speed_ratio, "native": native, "max_peak_size": cap,
            "precisions": ("fp32", "bf16") if native else ("fp32",), "note": note}


@dataclass
class RunPlan:
    """Everything the run's cost depends on; ``notes`` say why it differs from what was asked."""

    shapes: tuple[LayerShape, ...]
    tokens: tuple[int, ...]
    rounds: int
    warmup: int
    train_rounds: int
    peak_sizes: tuple[int, ...]
    peak_rounds: int
    bf16: dict[str, Any]
    train_profiles: dict[str, int]  # profile -> batch
    layer: bool
    profile_breakdown: bool
    notes: list[str] = field(default_factory=list)
    estimate_s: dict[str, float] = field(default_factory=dict)

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.bf16["precisions"]

    @property
    def total_estimate_s(self) -> float:
        return sum(self.estimate_s.values())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shapes"] = [s.name for s in self.shapes]
        data["total_estimate_s"] = self.total_estimate_s
        return data


def _dtype_speed(probe: MachineProbe, precision: str) -> float:
    """GFLOP/s to plan a dtype with; bf16 is never assumed faster than fp32 (its steps reached 15% of its peak)."""
    return probe.fp32_gflops * (1.0 if precision in ("fp32", "float32") else min(probe.bf16_ratio, 1.0))


def estimate_seconds(plan: RunPlan, probe: MachineProbe, profiles: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Seconds per section: FLOPs / (planning speed x efficiency), every timed and warm-up call counted."""
    layer_speed = probe.fp32_gflops * 1e9 * LAYER_EFFICIENCY
    probe_fp32 = 2 * max(plan.peak_sizes) ** 3 / (probe.fp32_gflops * 1e9)
    bf16_peak_size = min(max(plan.peak_sizes), plan.bf16["max_peak_size"] or max(plan.peak_sizes))
    probe_bf16 = 2 * bf16_peak_size**3 / (_dtype_speed(probe, "bf16") * 1e9) if plan.bf16["native"] else 0.0
    est = {"peaks": sum((plan.peak_rounds + 1) * 2 * s**3 / (_dtype_speed(probe, p) * 1e9)
                        for s in plan.peak_sizes for p in ("fp32", "bf16") if p == "fp32" or s <= bf16_peak_size)}
    est["correctness"] = sum(4 * layer_flops(s, CORRECTNESS_TOKENS) for s in plan.shapes) / layer_speed
    if plan.layer:
        per_round = sum(LAYER_IMPLEMENTATIONS * layer_flops(s, n) + dense_flops(s, n) for s in plan.shapes for n in plan.tokens) / layer_speed
        est["layer"] = (plan.rounds + plan.warmup) * (per_round + len(plan.shapes) * len(plan.tokens) * probe_fp32)
    train = 0.0
    for name, batch in plan.train_profiles.items():
        mcfg, seq = profiles[name]["model"], profiles[name]["train"].seq_len
        step_flops = flops_per_token(mcfg, seq) * batch * seq
        calls = plan.train_rounds + max(plan.warmup, 2) + 1  # timed + warm-up + the first untimed step
        for precision in plan.precisions:
            train += calls * 2 * step_flops / (_dtype_speed(probe, precision) * 1e9 * TRAIN_EFFICIENCY)  # MoE and dense
        train += plan.train_rounds * (probe_fp32 + probe_bf16)
    if plan.train_profiles:
        est["train"] = train
    if plan.profile_breakdown:
        fine = plan.shapes[min(1, len(plan.shapes) - 1)]
        gpu_step = 0.0
        if "gpu" in plan.train_profiles:
            gpu_step = 3 * flops_per_token(profiles["gpu"]["model"], profiles["gpu"]["train"].seq_len) * plan.train_profiles["gpu"] * profiles["gpu"]["train"].seq_len
        est["profile"] = 2 * 3 * layer_flops(fine, 4096) / layer_speed + gpu_step / (probe.fp32_gflops * 1e9 * TRAIN_EFFICIENCY)
    return est


def _fewer_rounds(plan: RunPlan) -> str | None:
    if plan.rounds <= 3 and plan.warmup <= 1:
        return None
    plan.rounds, plan.warmup, plan.train_rounds = 3, 1, min(plan.train_rounds, 2)
    return "3 timed rounds after 1 warm-up round"


def _drop_largest_tokens(plan: RunPlan) -> str | None:
    if len(plan.tokens) <= 1 or not plan.layer:
        return None
    dropped = max(plan.tokens)
    plan.tokens = tuple(n for n in plan.tokens if n != dropped)
    return f"no {dropped}-token layer tables"


def _smaller_gpu_batch(plan: RunPlan) -> str | None:
    if plan.train_profiles.get("gpu", 1) <= 1:
        return None
    plan.train_profiles["gpu"] = 1
    return "gpu-profile training step at batch 1"


def _no_profiler(plan: RunPlan) -> str | None:
    if not plan.profile_breakdown:
        return None
    plan.profile_breakdown = False
    return "no profiler breakdown"


def _no_gpu_profile(plan: RunPlan) -> str | None:
    if "gpu" not in plan.train_profiles:
        return None
    del plan.train_profiles["gpu"]
    return "no gpu-profile training rows"


def _fewer_shapes(plan: RunPlan) -> str | None:
    if len(plan.shapes) <= 1:
        return None
    plan.shapes = plan.shapes[:-1]
    return f"{len(plan.shapes)} layer shape(s) only"


def _halve_tokens(plan: RunPlan) -> str | None:
    if not plan.layer or min(plan.tokens) <= 256:
        return None
    plan.tokens = (min(plan.tokens) // 2,)
    return f"{plan.tokens[0]}-token layer tables"


def _no_layer_tables(plan: RunPlan) -> str | None:
    if not plan.layer:
        return None
    plan.layer = False
    return "no layer tables"


def _no_training_rows(plan: RunPlan) -> str | None:
    if not plan.train_profiles:
        return None
    plan.train_profiles = {}
    return "no training-step tables"


SHRINK_STEPS = (_fewer_rounds, _drop_largest_tokens, _smaller_gpu_batch, _no_profiler, _no_gpu_profile, _fewer_shapes,
                _halve_tokens, _no_layer_tables, _no_training_rows)


def make_plan(args, probe: MachineProbe, shapes: tuple[LayerShape, ...], profiles: dict[str, dict[str, Any]]) -> RunPlan:
    """The run ``args`` ask for, shrunk step by step until its estimate fits :data:`TARGET_SECONDS`."""
    bf16 = bf16_plan(probe.bf16_ratio, args.quick)
    sizes = (256, 512) if args.quick else (1024, 2048, 4096)
    fitting = tuple(s for s in sizes if 2 * s**3 / (probe.fp32_gflops * 1e9) <= PROBE_SECONDS) or (min(sizes),)
    plan = RunPlan(
        shapes=tuple(shapes), tokens=tuple(args.tokens), rounds=args.rounds, warmup=args.warmup, train_rounds=args.train_rounds,
        peak_sizes=fitting, peak_rounds=2 if args.quick else 3, bf16=bf16,
        train_profiles={} if args.skip_train else {name: (args.gpu_batch if name == "gpu" else spec["train"].batch_size) for name, spec in profiles.items()},
        layer=not args.skip_layer, profile_breakdown=not (args.skip_profile or args.quick),
    )
    if bf16["note"]:
        plan.notes.append(bf16["note"])
    if fitting != sizes:
        plan.notes.append(f"peak sizes {list(fitting)}^3 only: a larger matmul takes over {PROBE_SECONDS} s at "
                          f"{probe.fp32_gflops:.0f} GFLOP/s, and the probe runs in every round")
    plan.estimate_s = estimate_seconds(plan, probe, profiles)
    for step in SHRINK_STEPS:
        while plan.total_estimate_s > TARGET_SECONDS:
            before = plan.total_estimate_s
            what = step(plan)
            if what is None:
                break
            plan.estimate_s = estimate_seconds(plan, probe, profiles)
            plan.notes.append(f"{what}: the estimate of {before / 60:.1f} min exceeded the {TARGET_SECONDS / 60:.0f}-min target "
                              f"at {probe.fp32_gflops:.0f} GFLOP/s fp32 (now {plan.total_estimate_s / 60:.1f} min)")
    if plan.total_estimate_s > BUDGET_SECONDS:
        plan.notes.append(f"even the smallest plan is estimated at {plan.total_estimate_s / 60:.1f} min on this machine "
                          f"(over the {BUDGET_SECONDS / 60:.0f}-min budget)")
    return plan


def apply_plan(args, plan: RunPlan) -> None:
    """Write the plan's choices back into ``args``, which the benchmark sections read."""
    args.tokens, args.rounds, args.warmup, args.train_rounds = list(plan.tokens), plan.rounds, plan.warmup, plan.train_rounds
    args.gpu_batch = plan.train_profiles.get("gpu", args.gpu_batch)
    args.skip_profile = not plan.profile_breakdown
