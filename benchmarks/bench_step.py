#!/usr/bin/env python
"""How close does one training step come to this machine's fp32 matmul peak? One script, one run.

    python benchmarks/bench_step.py --label "after"      # about 2 min on 2 cores; adds a row to RESULTS.md
    python benchmarks/bench_step.py --profile cpu-adamw  # also: torch.profiler's top ops by self CPU time
    python benchmarks/bench_step.py --quick              # one round, prints only

What it measures, interleaved in every round so that a busy machine slows them alike:

* the **peak probe**: one square fp32 ``torch.mm`` of 2048^2 (17 GFLOP, as many as the cpu-profile
  step, so that both are exposed to a busy machine alike; 1024^2 and 4096^2 are recorded once);
* the library's own training step, :func:`moe_lib.training.loop.train_step` on a state from
  :func:`moe_lib.training.loop.init_train_state` (LR schedule, forward, backward, clip, optimizer,
  ``zero_grad``), of the cpu profile with AdamW and with Muon, and of the gpu profile at a
  reduced batch (``--gpu-batch``; its own optimizer, Muon; fp32), on random token ids.

``% of peak = flops_per_token(cfg, T) x tokens / step time / peak``, where
:func:`moe_lib.moe.model.flops_per_token` already counts forward + backward (``3 x forward``).
Each variant's % is its median step time against the median probe of the same rounds.

Results: a row per ``--label`` in ``benchmarks/STEP_RESULTS.json`` (earlier labels kept, so the
table shows each change's before and after) and the table rendered into ``benchmarks/RESULTS.md``
between ``<!-- bench_step -->`` markers.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from moe_lib.files import atomic_write_text  # noqa: E402
from moe_lib.training.system import configure_cpu_allocator  # noqa: E402

CPU = torch.device("cpu")
PEAK_SIZES = (1024, 2048, 4096)
PROBE_N = 2048  # the in-round probe: 17.2 GFLOP, as many as the cpu-profile step, so a busy machine hits both alike
BEGIN, END = "<!-- bench_step -->", "<!-- /bench_step -->"


# =========================================================================== what runs
@dataclass(frozen=True)
class Library:
    """The moe_lib whose training step runs: this checkout's, or a baseline's (``--baseline REF``)."""

    prefix: str  # "" for this checkout, "REF:" for a baseline
    train: ModuleType  # its moe_lib.training.loop (moe_lib.train before that module moved)
    model: ModuleType  # its moe_lib.moe.model (moe_lib.model before the move)
    profiles: ModuleType  # its moe_lib.profiles


def current_library() -> Library:
    import moe_lib.moe.model
    import moe_lib.profiles
    import moe_lib.training.loop

    return Library("", moe_lib.training.loop, moe_lib.moe.model, moe_lib.profiles)


def baseline_library(ref: str, folder: Path) -> Library:
    """``git archive REF moe_lib`` into ``folder``, imported as the package ``moe_lib_baseline`` (its imports are relative)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "moe_lib"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    spec = importlib.util.spec_from_file_location("moe_lib_baseline", folder / "moe_lib" / "__init__.py",
                                                  submodule_search_locations=[str(folder / "moe_lib")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["moe_lib_baseline"] = package
    spec.loader.exec_module(package)
    return Library(f"{ref}:", first_module("moe_lib_baseline", "training.loop", "train"), first_module("moe_lib_baseline", "moe.model", "model"),
                   first_module("moe_lib_baseline", "profiles"))


def first_module(package: str, *names: str) -> ModuleType:
    """``package.name`` for the first of ``names`` that exists: a baseline may predate a module's move."""
    for name in names:
        if importlib.util.find_spec(f"{package}.{name.split('.')[0]}") is not None:
            return importlib.import_module(f"{package}.{name}")
    raise ImportError(f"none of {names} in {package}")


def variant_configs(lib: Library, gpu_batch: int) -> dict:
    """name -> RunConfig: the cpu profile with AdamW and with Muon, the gpu profile at a reduced batch (fp32)."""
    cpu = lib.profiles.get_profile("cpu").base.with_train(precision="fp32", progress=False, device="cpu")
    gpu = lib.profiles.get_profile("gpu").base.with_train(precision="fp32", progress=False, device="cpu", batch_size=gpu_batch)
    return {
        "cpu-adamw": cpu.with_train(optimizer="adamw"),
        "cpu-muon": cpu.with_train(optimizer="muon"),
        f"gpu-{gpu.train.optimizer}-b{gpu_batch}": gpu,
    }


class StepRunner:
    """A training state and its token stream; :meth:`run` takes the next optimizer step with the library's ``train_step``."""

    def __init__(self, lib: Library, config):
        self.lib, self.config = lib, config
        self.state = lib.train.init_train_state(config, CPU)
        self.tokens = torch.randint(0, config.model.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
        self.step = 0
        tcfg = config.train
        self.flops = lib.model.flops_per_token(config.model, tcfg.seq_len) * tcfg.tokens_per_step

    def run(self, clock=time.perf_counter) -> float:
        t0 = clock()
        self.lib.train.train_step(self.state, self.tokens, self.step)  # past the last step the LR stays at its floor
        self.step += 1
        return clock() - t0


def matmul_seconds(n: int, reps: int = 1, clock=time.perf_counter) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        torch.mm(a, b)
        best = min(best, clock() - t0)
    return best


def peak_by_size(clock=time.perf_counter) -> dict[int, float]:
    """GFLOP/s of a square fp32 ``torch.mm`` at each of ``PEAK_SIZES`` (best of 3 each), for the record."""
    return {n: 2 * n**3 / matmul_seconds(n, 3, clock) / 1e9 for n in PEAK_SIZES}


# =========================================================================== measurement
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(runners: dict, peak_n: int, rounds: int, warmup: int, clock=time.perf_counter) -> dict:
    """Round-robin: peak probe, then every variant once, the order rotating each round; medians over rounds.

    ``clock=time.process_time`` counts this process's CPU seconds instead of wall seconds: with one
    thread on a machine that other jobs share, that is the time the work itself took (the scheduler's
    time slices given to others do not count), for the probe and the steps alike.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner.run()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: list[float] = []
    a, b = torch.randn(peak_n, peak_n), torch.randn(peak_n, peak_n)
    for r in range(rounds):
        t0 = clock()
        torch.mm(a, b)
        peaks.append(2 * peak_n**3 / (clock() - t0) / 1e9)
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(runners[name].run(clock))
    peak = statistics.median(peaks)
    rows = {}
    for name, ts in times.items():
        flops, ms = runners[name].flops, statistics.median(ts) * 1e3
        gflops = flops / (ms / 1e3) / 1e9
        rows[name] = {"ms": ms, "gflop": flops / 1e9, "gflops": gflops, "pct_peak": 100 * gflops / peak,
                      "best_pct_peak": 100 * flops / min(ts) / 1e9 / max(peaks), "tokens": runners[name].config.train.tokens_per_step}
    return {"peak_gflops": peak, "peak_rounds": peaks, "rows": rows}


def profile_table(runner: StepRunner, steps: int, row_limit: int = 25) -> str:
    """``torch.profiler``: the top ops by self CPU time over ``steps`` training steps.

    Its times are wall time inside each op: on a machine shared with other jobs, an op that the
    scheduler pre-empts counts the other jobs' time slice too. :func:`cpu_time_breakdown` does not.
    """
    from torch.profiler import ProfilerActivity, profile

    runner.run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


GEMMS = ("mm", "addmm", "bmm", "_grouped_mm")
ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


class CpuTimeByOp(TorchDispatchMode):
    """This thread's CPU time per aten op (``time.thread_time_ns`` around each kernel): with one thread,
    what each op cost, whatever else the machine runs. Ops below autograd, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.ns: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ns[name] += time.thread_time_ns() - t0
        self.calls[name] += 1
        return out


def cpu_time_breakdown(runner: StepRunner, steps: int, probe_n: int, clock, top: int = 15) -> dict:
    """Per step: GEMM, attention and other ops' CPU ms; what the GEMMs reach as % of the peak probe
    (measured before and after, in the same minute); and the ceiling of the step if only its GEMMs
    and attention took time. Run with one thread."""
    runner.run()
    mode = CpuTimeByOp()
    probes = [matmul_seconds(probe_n, 2, clock)]
    with mode:
        for _ in range(steps):
            runner.run()
    probes.append(matmul_seconds(probe_n, 2, clock))
    peak_gflops = 2 * probe_n**3 / statistics.mean(probes) / 1e9
    ms = {name: ns / steps / 1e6 for name, ns in mode.ns.items()}
    gemm, attention = sum(ms.get(n, 0.0) for n in GEMMS), sum(ms.get(n, 0.0) for n in ATTENTION)
    total = sum(ms.values())
    gflop = runner.flops / 1e9
    others = sorted((n for n in ms if n not in GEMMS + ATTENTION), key=ms.get, reverse=True)
    return {
        "steps": steps, "peak_gflops": peak_gflops, "total_ms": total, "gemm_ms": gemm, "attention_ms": attention, "other_ms": total - gemm - attention,
        "gemm_pct_peak": 100 * gflop / (gemm / 1e3) / peak_gflops,  # attention's few FLOPs counted as GEMM's: an upper bound
        "ceiling_pct_peak": 100 * gflop / ((gemm + attention) / 1e3) / peak_gflops,
        "top_other": [(n, ms[n], mode.calls[n] / steps) for n in others[:top]],
    }


def breakdown_text(b: dict) -> str:
    lines = [f"per step, CPU ms (1 thread, {b['steps']} steps): total {b['total_ms']:.1f} = GEMM {b['gemm_ms']:.1f} "
             f"({100 * b['gemm_ms'] / b['total_ms']:.0f}%) + attention {b['attention_ms']:.1f} ({100 * b['attention_ms'] / b['total_ms']:.0f}%) "
             f"+ other {b['other_ms']:.1f} ({100 * b['other_ms'] / b['total_ms']:.0f}%)",
             f"the step's FLOPs in its GEMM time alone: {b['gemm_pct_peak']:.0f}% of peak; in GEMM + attention time: "
             f"{b['ceiling_pct_peak']:.0f}% (the ceiling if every other op took no time); peak probe around it: "
             f"{b['peak_gflops']:.0f} GFLOP/s",
             "other ops, CPU ms per step (calls per step):"]
    lines += [f"  {name:45s} {ms:7.2f} ms  ({calls:.0f})" for name, ms, calls in b["top_other"]]
    return "\n".join(lines)


# =========================================================================== report
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def render(runs: list[dict]) -> str:
    lines = [
        BEGIN,
        "## Training step as % of the fp32 matmul peak (`bench_step.py`)",
        "",
        "`python benchmarks/bench_step.py --label L [--baseline REF]`: the library's own `train_step` (LR schedule, "
        "forward, backward, clip, optimizer, `zero_grad`) of the cpu profile (2,048 tokens, fp32) with AdamW and Muon, "
        "and of the gpu profile on CPU at a reduced batch, interleaved round by round with a 2048^2 fp32 `torch.mm` "
        "peak probe; with `--baseline REF` the same steps of git REF's `moe_lib` run in the same rounds (rows `REF:variant`). "
        "`% of peak` = `flops_per_token x tokens / median step time / median probe GFLOP/s` of the same run "
        "(`flops_per_token` counts forward + backward); `best round` = fastest step / fastest probe. "
        "Clock `cpu` = this process's CPU seconds (with 1 thread: not counting time slices taken by other jobs); "
        "`wall` = wall seconds. Unless a row says otherwise, the machine was shared with other jobs: compare % "
        "within a run, not ms across runs.",
        "",
        "| label | date | machine | threads | clock | load avg | peak GFLOP/s | variant | step ms | GFLOP | % of peak | best round |",
        "|---|---|---|---:|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        head = (f"| {run['label']} | {run['date']} | {run['machine']['cpu']} | {run['machine']['threads']} | "
                f"{run.get('clock', 'wall')} | {run['load_average'][0]:.1f} | {run['peak_gflops']:.0f} |")
        for name, row in run["rows"].items():
            lines.append(f"{head} {name} | {row['ms']:.0f} | {row['gflop']:.2f} | {row['pct_peak']:.1f}% | {row['best_pct_peak']:.1f}% |")
            head = "| | | | | | | |"
    for run in runs:
        if run.get("breakdown"):
            lines += ["", f"### CPU time by op: {run['breakdown']['variant']}, label {run['label']}", "", "```",
                      breakdown_text(run["breakdown"]), "```"]
        if run.get("profile"):
            lines += ["", f"### Where the time goes: {run['profile']['variant']}, label {run['label']} "
                      f"({run['profile']['steps']} steps, top ops by self CPU time)", "", "```", run["profile"]["table"].rstrip(), "```"]
    return "\n".join(lines + [END, ""])


def write_results(run: dict, json_path: Path, md_path: Path) -> None:
    runs = json.loads(json_path.read_text()) if json_path.is_file() else []
    def key(r):
        return r["label"], r["machine"]["threads"], r.get("clock", "wall")

    runs = [r for r in runs if key(r) != key(run)] + [run]  # one row per label, thread count and clock
    atomic_write_text(json_path, json.dumps(runs, indent=1))
    text = md_path.read_text() if md_path.is_file() else "# Benchmark results\n"
    section = render(runs)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(md_path, text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="current", help="name of this code state in the before/after table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall seconds, or this process's CPU seconds (with --threads 1: robust to other jobs on the machine)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpu-batch", type=int, default=1, help="batch of the gpu-profile step (the profile trains with 24)")
    p.add_argument("--variants", nargs="*", default=None, help="subset of the variants (default: all)")
    p.add_argument("--baseline", default=None, metavar="REF",
                   help="also run the training step of git REF's moe_lib in the same rounds (rows named REF:variant)")
    p.add_argument("--profile", default=None, help="a variant to profile with torch.profiler after the timing")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--breakdown", default=None, metavar="VARIANT",
                   help="CPU time per op of VARIANT's step (meaningful with --threads 1): GEMM vs attention vs the rest")
    p.add_argument("--quick", action="store_true", help="1 round, 1 warm-up, cpu variants only, print only")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "STEP_RESULTS.json")
    p.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configure_cpu_allocator()  # as train_run does: freed tensor memory recycled (moe_lib.training.system)
    libs = [current_library()]
    if args.baseline:
        libs.insert(0, baseline_library(args.baseline, Path(tempfile.mkdtemp(prefix="bench_step_baseline_"))))
    configs = variant_configs(libs[-1], args.gpu_batch)
    wanted = args.variants or [n for n in configs if not (args.quick and n.startswith("gpu"))]
    unknown = sorted(set(wanted) - set(configs))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: valid choices are {list(configs)}")
    if args.quick:
        args.rounds, args.warmup = 1, 1
    start = time.perf_counter()
    peak_n, sizes = PROBE_N, peak_by_size(CLOCKS[args.clock])
    print(f"fp32 mm GFLOP/s by size (best of 3): { {n: round(g) for n, g in sizes.items()} }; probe in every round: {peak_n}^2", flush=True)
    runners = {lib.prefix + n: StepRunner(lib, variant_configs(lib, args.gpu_batch)[n]) for n in wanted for lib in libs}
    result = measure(runners, peak_n, args.rounds, args.warmup, CLOCKS[args.clock])
    print(f"peak probe (median of {args.rounds} rounds): {result['peak_gflops']:.1f} GFLOP/s")
    for name, row in result["rows"].items():
        print(f"{name:>18}: {row['ms']:8.1f} ms  {row['gflop']:6.2f} GFLOP  {row['gflops']:6.1f} GFLOP/s  "
              f"{row['pct_peak']:5.1f}% of peak (best round {row['best_pct_peak']:.1f}%)")
    run = {"label": args.label, "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "peak_n": peak_n,
           "peak_by_size": sizes, "clock": args.clock, "rounds": args.rounds, "warmup": args.warmup, "load_average": os.getloadavg(), **result}
    if args.profile:
        if args.profile not in runners:
            raise SystemExit(f"--profile {args.profile!r}: valid choices are {list(runners)}")
        table = profile_table(runners[args.profile], args.profile_steps)
        print(table)
        run["profile"] = {"variant": args.profile, "steps": args.profile_steps, "table": table}
    if args.breakdown:
        if args.breakdown not in runners:
            raise SystemExit(f"--breakdown {args.breakdown!r}: valid choices are {list(runners)}")
        run["breakdown"] = {"variant": args.breakdown, **cpu_time_breakdown(runners[args.breakdown], args.profile_steps, peak_n, CLOCKS[args.clock])}
        print(breakdown_text(run["breakdown"]))
    run["seconds"] = time.perf_counter() - start
    if not args.quick:
        write_results(run, args.json, args.md)
        print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
