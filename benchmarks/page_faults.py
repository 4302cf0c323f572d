"""Why bf16 autocast does not speed up the MoE training step on CPU: page faults per step.

Runs the gpu-profile training step (MoE and the dense model with the same active parameters,
fp32 and bf16 autocast) exactly as ``bench_moe.py`` does, and reports the step time and the
minor page faults per step (``getrusage``). A minor fault is a first touch of a fresh page: the
kernel maps and zeroes 4 KiB. A step that reuses its memory has none.

    python benchmarks/page_faults.py              # writes benchmarks/PAGE_FAULTS.md (about 3 minutes)
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe as bench  # noqa: E402

from moe_lib.training.system import configure_cpu_allocator  # noqa: E402


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(model_cfg, train_cfg, batch: int, precision: str, steps: int, warmup: int) -> dict[str, float]:
    step = bench.TrainStep(model_cfg, train_cfg, batch, seed=0)
    for _ in range(warmup):
        step.step(precision)
    f0, t0 = faults(), time.perf_counter()
    for _ in range(steps):
        step.step(precision)
    seconds, count = (time.perf_counter() - t0) / steps, (faults() - f0) / steps
    return {"ms": 1e3 * seconds, "faults": count, "fault_mb": count * resource.getpagesize() / 2**20}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "PAGE_FAULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configure_cpu_allocator()
    spec = bench.train_profiles(quick=False)["gpu"]
    rows = []
    for kind, cfg in (("moe", spec["model"]), ("dense", spec["model"].replace(ffn="dense"))):
        for precision in ("fp32", "bf16"):
            r = measure(cfg, spec["train"], args.batch, precision, args.steps, args.warmup)
            rows.append((kind, precision, r))
            print(f"{kind:5s} {precision}: {r['ms']:7.0f} ms/step, {r['faults']:9,.0f} minor faults/step ({r['fault_mb']:,.0f} MiB)", flush=True)
    machine = bench.machine_info(args.threads)
    lines = [
        "# Page faults per training step (gpu-profile model on CPU)",
        "",
        f"`python benchmarks/page_faults.py` on {time.strftime('%Y-%m-%d %H:%M')}: {machine['cpu']}, {args.threads} threads, "
        f"torch {machine['torch']}, allocator tuned by `moe_lib.training.system.configure_cpu_allocator`; batch {args.batch} x seq "
        f"{spec['train'].seq_len}; mean of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| model | precision | ms/step | minor page faults/step | fresh memory touched/step |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {p} | {r['ms']:,.0f} | {r['faults']:,.0f} | {r['fault_mb']:,.0f} MiB |" for k, p, r in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
