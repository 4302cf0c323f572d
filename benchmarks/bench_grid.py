"""Grid throughput: runs per hour with jobs = 1, 2, ... worker processes against one run on all threads.

    python benchmarks/bench_grid.py                 # cpu profile, 20 steps per run, 4 runs per setting
    python benchmarks/bench_grid.py --steps 40 --runs 8 --max-jobs 4 --out /tmp/r.md

Every setting trains the same ``--runs`` runs (the cpu profile's model and batch, seeds 0..runs-1,
``--steps`` optimizer steps, a short evaluation) from scratch in a fresh results folder, through
``moe_lib.runs.run_grid``: ``jobs=1`` trains them one after another in this process on all
threads, ``jobs=N`` in N spawned workers with ``cores // N`` threads each. The wall time includes
worker start-up and data loading, as a course pays them. The machine's fp32 GEMM peak is measured in
the same run, and each setting's training FLOPs per second are given as % of it. Writes the section
"Grid throughput" of ``benchmarks/RESULTS.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_lib.course.efficiency import machine_description, measure_fp32_peak, run_training_flops, write_section  # noqa: E402
from moe_lib.runs import Grid, run_grid  # noqa: E402
from moe_lib.profiles import get_profile  # noqa: E402
from moe_lib.training.loop import train_run  # noqa: E402
from moe_lib.runs import available_cores  # noqa: E402

SECTION = "## Grid throughput (`benchmarks/bench_grid.py`)"


# A 1-minute load average above this before the benchmark starts means other work shares the machine.
BUSY_LOAD = 0.5


def bench_grid(steps: int, runs: int, jobs: int, threads: int, profile: str) -> dict:
    base = get_profile(profile).base.with_train(
        steps=steps, warmup_steps=min(5, steps - 1), eval_every=steps, eval_batches=2, final_eval_batches=4, log_every=10, progress=False
    )
    grid = Grid.from_conditions("throughput", base, {"base": {}}, range(runs))
    train_fn = functools.partial(train_run, profile=profile)
    torch.set_num_threads(threads if jobs == 1 else available_cores())
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        run_grid(grid, folder, train_fn=train_fn, progress=False, reuse=False, jobs=jobs, threads=threads)
        seconds = time.perf_counter() - start
    flops = sum(run_training_flops(r.config) for r in grid.runs)
    return {"jobs": jobs, "threads": threads, "seconds": seconds, "runs_per_hour": 3600 * runs / seconds, "flops_per_s": flops / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--max-jobs", type=int, default=None, help="largest jobs measured (default: the core count)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    cores = available_cores()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    peak = measure_fp32_peak(threads=cores)
    settings = [(1, cores)] + [(j, max(1, cores // j)) for j in range(2, (args.max_jobs or cores) + 1)]
    rows = []
    for jobs, threads in settings:
        row = bench_grid(args.steps, args.runs, jobs, threads, args.profile)
        rows.append(row)
        print(f"jobs {jobs} x {threads} threads: {row['seconds']:.1f} s, {row['runs_per_hour']:.0f} runs/h", flush=True)
    peak_after = measure_fp32_peak(threads=cores)
    base = rows[0]["runs_per_hour"]
    lines = [
        f"`python benchmarks/bench_grid.py --profile {args.profile} --steps {args.steps} --runs {args.runs}` on {started}: "
        f"{machine_description()}, torch {torch.__version__}. Each setting trains the same {args.runs} runs of the {args.profile} "
        f"profile's model at {args.steps} steps (plus a 2-batch validation and a 4-batch final evaluation) from scratch; the wall "
        "time includes worker start-up and data loading. fp32 GEMM peak (2048^3 `torch.mm`, all threads) "
        f"{peak / 1e9:,.0f} GFLOP/s at the start, {peak_after / 1e9:,.0f} at the end. Load average (1 min) "
        f"{load_start[0] if load_start else float('nan'):.1f} at the start, {os.getloadavg()[0] if load_start else float('nan'):.1f} "
        f"at the end, on {cores} cores (the end includes this benchmark's own workers): "
        + ("other processes shared the machine at the start, so every number is low." if load_start and load_start[0] > BUSY_LOAD
           else "the machine was otherwise idle at the start."),
        "",
        "| jobs x threads | wall (s) | runs per hour | x one run on all threads | training FLOP/s, % of fp32 peak |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        where = "in-process, one after another" if r["jobs"] == 1 else "worker processes"
        lines.append(f"| {r['jobs']} x {r['threads']} ({where}) | {r['seconds']:.1f} | {r['runs_per_hour']:.0f} | "
                     f"{r['runs_per_hour'] / base:.2f} | {100 * r['flops_per_s'] / peak:.0f}% |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
