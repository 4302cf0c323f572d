"""Interleaved timing and the matmul peak probe (CPU, or CUDA: ``torch.utils.benchmark.Timer``
synchronises the GPU around every timed call)."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
from torch.utils import benchmark


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, threads: int) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed rounds, then ``rounds`` timed
    rounds in which every function runs once (torch.utils.benchmark.Timer, order rotating)."""
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=name) for name, fn in fns.items()}
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            timers[name].timeit(1)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timers[name].timeit(1).times[0])
    return times


def square_mm(size: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[Callable[[], Any], float]:
    """A square ``torch.mm`` in ``dtype`` on ``device`` and its FLOPs, ``2 size^3``."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return (lambda: torch.mm(a, b)), 2.0 * size**3


def measure_peaks(
    threads: int, sizes: tuple[int, ...], rounds: int, max_bf16_size: int | None = None, device: torch.device | str = "cpu",
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
) -> dict[str, Any]:
    """Median GFLOP/s of square matmuls; the best size per dtype is that dtype's peak probe.
    ``max_bf16_size`` caps the bf16 sizes (see :func:`run_plan.bf16_plan`)."""
    table: dict[str, dict[int, float]] = {}
    best: dict[str, int] = {}
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        fns, flops = {}, {}
        capped = [s for s in sizes if dtype != torch.bfloat16 or max_bf16_size is None or s <= max_bf16_size]
        for size in capped or [min(sizes)]:
            fns[size], flops[size] = square_mm(size, dtype, device)
        times = interleaved_times({str(s): f for s, f in fns.items()}, rounds, 1, threads)
        table[name] = {s: flops[s] / median(times[str(s)]) / 1e9 for s in fns}
        best[name] = max(table[name], key=table[name].get)
    return {"gflops": table, "best_size": best}
