#!/usr/bin/env python
"""How fast is MoE dispatch, and how fast does the course's model train? One script, one run.

    python benchmarks/bench_moe.py                 # full run, about 6-10 min on 2 cores -> benchmarks/RESULTS.md
    python benchmarks/bench_moe.py --quick         # sanity run in under a minute (prints, writes nothing)
    python benchmarks/bench_moe.py --course        # also time the smoke nbval suite and one cpu run per study

Sections (see benchmarks/README.md for every column):

0. A 256^3 bf16 matmul probe (milliseconds). Where bf16 runs below half of fp32's speed (a CPU
   without AVX512-BF16/AMX emulates it: 1 GFLOP/s against fp32's 160 on one of our machines, where
   the bf16 peak probe at 4096^3 alone ran for 25 minutes) the bf16 sections shrink: peak sizes up to
   512^3 only, no bf16 training rows, and the results say why.
1. Matmul peak of this machine, fp32 and bf16 (square ``torch.mm``, the best size counts).
2. Correctness first: on fresh random inputs, moe_lib's fast path equals its reference loop
   and Hugging Face's ``MixtralSparseMoeBlock`` (same weights, same routing), outputs and
   every gradient. The run stops if they disagree.
3. MoE layer, forward + backward, fp32, coarse and fine-grained shapes: moe_lib's fast path,
   its reference loop, HF Mixtral (its default eager loop, and its ``grouped_mm`` experts
   implementation), a dense SwiGLU with the same active FLOPs, and the matmul peak.
4. Training step (forward, backward, clip, AdamW) of the cpu- and gpu-profile models in fp32
   and bf16 autocast, MoE against a dense model with the same active parameters: tokens/s, MFU.
5. Where the time goes: ``torch.profiler`` self-time by category.
6. (``--course``) wall time of the smoke nbval suite and of one cpu-profile run of each study.

Timing: every implementation of a section runs once per round, round-robin (the order
rotates each round), after warm-up rounds, and we report the median over rounds; the peak
matmul runs in the same rounds. On a shared machine this makes noise hit every column
alike, so the ratios hold even when absolute times drift. Threads are fixed (``--threads``).

FLOPs: an MoE layer forward is ``2 N k 3 d h`` (three d x h matmuls per routed slot) plus the
router's ``2 N d E``; forward + backward is 3x forward. A training step is
``6 x (matmul parameters a token uses) + 6 L T d`` per token (attention scores and values,
causal half, forward + backward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from moe_lib.moe.model import flops_per_token  # noqa: E402
from moe_lib.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from moe_lib.moe.model import DenseFeedForward, MoEFeedForward, count_parameters  # noqa: E402
from moe_lib.training.system import configure_cpu_allocator, cpu_allocator_tuned  # noqa: E402
from moe_lib.training.loop import init_train_state, train_step  # noqa: E402
from moe_lib.training.precision import resolve_precision  # noqa: E402
from benchmarks.moe_layers import (  # noqa: E402,F401  (re-exported: tests read them as bench_moe.X)
    LAYER_SHAPES, QUICK_SHAPES, LayerShape, dense_flops, hf_expert_grads, hf_mixtral_block, layer_flops, moe_config,
)
from benchmarks.run_plan import apply_plan, bf16_plan, make_plan, probe_machine  # noqa: E402,F401
from benchmarks.timing import interleaved_times, measure_peaks, square_mm  # noqa: E402
from benchmarks.cuda_layer import main_device_mode  # noqa: E402

CPU = torch.device("cpu")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# =========================================================================== machine
def machine_info(threads: int) -> dict[str, Any]:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "isa": ", ".join(isa) or "unknown",
        "threads": threads,
        "torch": torch.__version__,
        "transformers": hf,
        "python": platform.python_version(),
        "allocator_tuned": cpu_allocator_tuned(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


@dataclass
class LayerSet:
    shape: LayerShape
    fast: MoEFeedForward
    loop: MoEFeedForward
    hf_eager: nn.Module
    hf_grouped: nn.Module | None
    dense: DenseFeedForward


def build_layers(shape: LayerShape, seed: int) -> LayerSet:
    torch.manual_seed(seed)
    fast = MoEFeedForward(moe_config(shape, "grouped"))
    loop = MoEFeedForward(moe_config(shape, "loop"))
    loop.load_state_dict(fast.state_dict())
    dense = DenseFeedForward(shape.d, shape.k * shape.h)
    return LayerSet(shape, fast, loop, hf_mixtral_block(fast, shape, "eager"), hf_mixtral_block(fast, shape, "grouped_mm"), dense)


def layer_forward(name: str, layers: LayerSet) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [N, d] -> y [N, d]`` for each implementation (routing included in every one)."""
    if name == "moe_lib fast path":
        return lambda x: layers.fast(x)[0]
    if name == "moe_lib reference loop":
        return lambda x: layers.loop(x)[0]
    if name == "HF Mixtral (eager loop)":
        return lambda x: layers.hf_eager(x.unsqueeze(0)).squeeze(0)
    if name == "HF Mixtral (grouped_mm)":
        return lambda x: layers.hf_grouped(x.unsqueeze(0)).squeeze(0)
    if name == "dense SwiGLU (same active FLOPs)":
        return lambda x: layers.dense(x)[0]
    raise KeyError(name)


FAST, LOOP, HF_EAGER, HF_GROUPED, DENSE = (
    "moe_lib fast path", "moe_lib reference loop", "HF Mixtral (eager loop)", "HF Mixtral (grouped_mm)", "dense SwiGLU (same active FLOPs)",
)
PEERS = (LOOP, HF_EAGER, HF_GROUPED)  # the other MoE implementations the fast path must beat
MM_FLOOR = "grouped matmuls alone (floor)"


def grouped_matmul_floor(shape: LayerShape, tokens: int, seed: int) -> Callable[[], None]:
    """The six ``torch._grouped_mm`` calls of an MoE forward + backward on rows already sorted
    by expert, with nothing around them: a floor for ANY grouped implementation's time."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(tokens, shape.E, generator=g).topk(shape.k, dim=-1).indices.reshape(-1)
    offsets = torch.cumsum(torch.bincount(idx, minlength=shape.E), 0).to(torch.int32)
    slots, d, h, E = tokens * shape.k, shape.d, shape.h, shape.E
    xs, a, d_out, dh = (torch.randn(slots, n, generator=g) for n in (d, h, d, 2 * h))
    w_in, w_out = torch.randn(E, d, 2 * h, generator=g), torch.randn(E, h, d, generator=g)
    mm = torch._grouped_mm

    def run() -> None:
        mm(xs, w_in, offs=offsets)  # forward: up-projection [gate | up]
        mm(a, w_out, offs=offsets)  # forward: down-projection
        mm(d_out, w_out.transpose(-2, -1), offs=offsets)  # backward: d hidden
        mm(a.t(), d_out, offs=offsets)  # backward: d w_out
        mm(dh, w_in.transpose(-2, -1), offs=offsets)  # backward: d tokens
        mm(xs.t(), dh, offs=offsets)  # backward: d w_in

    return run


def layer_names(layers: LayerSet) -> list[str]:
    names = [FAST, LOOP, HF_EAGER]
    if layers.hf_grouped is not None:
        names.append(HF_GROUPED)
    return names + [DENSE]


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters()]


def fwd_bwd(module: nn.Module, forward: Callable, x: torch.Tensor, grad_y: torch.Tensor) -> Callable[[], None]:
    """One forward + backward, gradients reset to ``None`` first as ``zero_grad`` would."""
    params = _params(module)

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        forward(x).backward(grad_y)

    return step


# =========================================================================== correctness
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_layer(shape: LayerShape, tokens: int, seed: int, rtol_ref: float = 1e-5, rtol_hf: float = 1e-4) -> dict[str, float]:
    """Fast path vs reference loop vs HF Mixtral (eager and grouped_mm) on fresh random inputs.

    Compares the routing, the output and the gradients of the input, the router and both expert
    weights; raises ``AssertionError`` on a mismatch. Returns the largest error of each pair,
    relative to the largest magnitude of the reference tensor.
    """
    layers = build_layers(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(tokens, shape.d, generator=g)
    grad_y = torch.randn(tokens, shape.d, generator=g)
    results = {}
    for name in (LOOP, FAST, HF_EAGER, HF_GROUPED):
        if name == HF_GROUPED and layers.hf_grouped is None:
            continue
        module = {LOOP: layers.loop, FAST: layers.fast, HF_EAGER: layers.hf_eager, HF_GROUPED: layers.hf_grouped}[name]
        module.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        y = layer_forward(name, layers)(x)
        y.backward(grad_y)
        if name in (LOOP, FAST):
            w_in, w_out, router = module.experts.w_in.grad, module.experts.w_out.grad, module.router.weight.grad
        else:
            (w_in, w_out), router = hf_expert_grads(module, shape), module.gate.weight.grad
        results[name] = {"y": y.detach(), "dx": x.grad, "d_router": router, "d_w_in": w_in, "d_w_out": w_out}

    # same routing: the HF router's choices equal moe_lib's
    with torch.no_grad():
        routed = layers.fast.router(x0)
        hf_out = layers.hf_eager.gate(x0)
        if isinstance(hf_out, tuple):  # transformers >= 5: (logits, renormalised top-k scores, indices)
            hf_scores, hf_indices = hf_out[1], hf_out[2]
        else:  # older: the gate is an nn.Linear, the block does softmax -> top-k -> renormalise
            top, hf_indices = hf_out.float().softmax(-1).topk(shape.k, dim=-1)
            hf_scores = top / top.sum(-1, keepdim=True)
    assert torch.equal(routed.expert_indices, hf_indices), f"{shape.name}: HF Mixtral routes differently"
    torch.testing.assert_close(routed.gate_weights, hf_scores.to(routed.gate_weights.dtype), rtol=1e-6, atol=1e-7)

    ref = results[LOOP]
    errors = {}
    for name, res in results.items():
        if name == LOOP:
            continue
        tol = rtol_ref if name == FAST else rtol_hf
        worst = 0.0
        for key, value in res.items():
            err = _rel_err(value, ref[key])
            assert err <= tol, f"{shape.name}, {tokens} tokens: {name} {key} differs from the reference loop by {err:.2e} (> {tol:.0e})"
            worst = max(worst, err)
        errors[name] = worst
    return errors


# =========================================================================== MoE layer benchmark
def bench_layer(shape: LayerShape, tokens: int, args, peak_fn: Callable, peak_flops: float) -> dict[str, Any]:
    layers = build_layers(shape, args.seed)
    g = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(tokens, shape.d, generator=g).requires_grad_(True)
    grad_y = torch.randn(tokens, shape.d, generator=g)
    modules = {FAST: layers.fast, LOOP: layers.loop, HF_EAGER: layers.hf_eager, HF_GROUPED: layers.hf_grouped, DENSE: layers.dense}
    fns = {name: fwd_bwd(modules[name], layer_forward(name, layers), x, grad_y) for name in layer_names(layers)}
    if hasattr(torch, "_grouped_mm"):
        fns[MM_FLOOR] = grouped_matmul_floor(shape, tokens, args.seed)
    fns["peak"] = peak_fn
    times = interleaved_times(fns, args.rounds, args.warmup, args.threads)
    peak = peak_flops / _median(times.pop("peak")) / 1e9
    rows = {}
    for name, ts in times.items():
        ms = 1e3 * _median(ts)
        if name == DENSE:
            flops = dense_flops(shape, tokens)
        elif name == MM_FLOOR:
            flops = layer_flops(shape, tokens) - 3 * 2 * tokens * shape.d * shape.E  # experts only, no router
        else:
            flops = layer_flops(shape, tokens)
        gflops = flops / (ms / 1e3) / 1e9
        rows[name] = {"ms": ms, "gflops": gflops, "pct_peak": 100 * gflops / peak, "spread_ms": 1e3 * (max(ts) - min(ts))}
    fast = rows[FAST]["ms"]
    for row in rows.values():
        row["vs_fast"] = row["ms"] / fast  # > 1: the fast path is that many times faster
    peers = {n: rows[n]["ms"] for n in PEERS if n in rows}
    fastest_peer = min(peers, key=peers.get)
    return {
        "shape": shape.name, "label": shape.label, "tokens": tokens, "peak_gflops": peak, "rows": rows,
        "fastest_peer": fastest_peer, "fast_over_fastest_peer": peers[fastest_peer] / fast,
        "fast_over_hf_eager": rows[HF_EAGER]["ms"] / fast,
        "gflop_per_call": layer_flops(shape, tokens) / 1e9,
    }


# =========================================================================== training step
def train_profiles(quick: bool) -> dict[str, dict[str, Any]]:
    """cpu and gpu profile models from moe_lib.profiles when present, else labelled defaults."""
    try:
        from moe_lib.profiles import get_profile

        found = {name: get_profile(name) for name in (("smoke",) if quick else ("cpu", "gpu"))}
        return {
            name: {"model": p.base.model, "train": p.base.train, "source": f"moe_lib.profiles '{name}'"}
            for name, p in found.items()
        }
    except (ImportError, ValueError) as err:  # profiles not written yet: documented defaults
        note = f"built-in default (moe_lib.profiles unavailable: {err.__class__.__name__})"
        cpu = ModelConfig(vocab_size=4096, d_model=128, n_heads=4, n_layers=4, d_ff=256, max_seq_len=128)
        gpu = ModelConfig(vocab_size=50257, d_model=384, n_heads=8, n_layers=6, d_ff=1536, max_seq_len=512)
        if quick:
            tiny = ModelConfig(vocab_size=512, d_model=32, n_heads=2, n_layers=2, d_ff=32, max_seq_len=32, num_experts=4)
            return {"smoke": {"model": tiny, "train": TrainConfig(batch_size=4, seq_len=32), "source": note}}
        return {
            "cpu": {"model": cpu, "train": TrainConfig(batch_size=16, seq_len=128), "source": note},
            "gpu": {"model": gpu, "train": TrainConfig(batch_size=24, seq_len=512), "source": note},
        }


class TrainStep:
    """One optimizer step exactly as ``moe_lib.training.loop.train_run`` takes it: the library's own
    ``train_step`` (AdamW, this batch size, no accumulation), on a fixed random token stream, timed by
    phase through its hooks: forward, backward, then the optimizer (clip, AdamW, zero, next LR)."""

    OPTIMIZER = "optimizer (clip + AdamW)"

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, batch: int, seed: int):
        train = tcfg.replace(optimizer="adamw", batch_size=batch, grad_accum_steps=1, seed=seed, device="cpu", progress=False)
        self.state = init_train_state(RunConfig(model=mcfg, train=train), CPU)
        self.state.forward, self.state.after_backward = self._forward, self._after_backward
        self.model = self.state.model
        self.token_stream = torch.randint(0, mcfg.vocab_size, (4 * batch * tcfg.seq_len + 1,), generator=torch.Generator().manual_seed(seed))
        self.tokens = batch * tcfg.seq_len  # per step
        self.flops = flops_per_token(self.model.cfg, tcfg.seq_len) * self.tokens
        self.phases: dict[str, list[tuple[float, float, float]]] = {"fp32": [], "bf16": []}
        self.steps_taken, self.labels, self.marks = 0, False, []
        self.optimizer_range = contextlib.ExitStack()

    def _forward(self, x, y):
        with (torch.profiler.record_function("forward") if self.labels else contextlib.nullcontext()):
            out = self.model(x, y)
        self.marks.append(time.perf_counter())
        return out

    def _after_backward(self) -> None:
        self.marks.append(time.perf_counter())
        if self.labels:  # the optimizer's ops, charged to one phase by time_by_category
            self.optimizer_range.enter_context(torch.profiler.record_function(self.OPTIMIZER))

    def step(self, precision: str, profiler_labels: bool = False) -> None:
        self.state.precision, self.labels, self.marks = resolve_precision(precision, CPU), profiler_labels, []
        t0 = time.perf_counter()
        train_step(self.state, self.token_stream, self.steps_taken)
        t3 = time.perf_counter()
        self.optimizer_range.close()
        self.steps_taken += 1
        t1, t2 = self.marks
        self.phases[precision].append((t1 - t0, t2 - t1, t3 - t2))


def bench_train(
    profile: str, spec: dict[str, Any], batch: int, args, peaks: dict[str, tuple[Callable, float]], precisions=("fp32", "bf16")
) -> dict[str, Any]:
    mcfg, tcfg = spec["model"], spec["train"]
    steps = {"moe": TrainStep(mcfg, tcfg, batch, args.seed), "dense": TrainStep(mcfg.replace(ffn="dense"), tcfg, batch, args.seed)}
    fns: dict[str, Callable] = {}
    for kind, st in steps.items():
        for prec in precisions:
            fns[f"{kind} {prec}"] = (lambda st=st, prec=prec: st.step(prec))
    for dtype, (fn, _) in peaks.items():
        fns[f"peak {dtype}"] = fn
    warmup = max(args.warmup, 2)  # the first steps grow the heap and fault pages in
    for st in steps.values():
        for prec in precisions:
            st.step(prec)
    times = interleaved_times(fns, args.train_rounds, warmup - 1, args.threads)
    peak = {dtype: flops / _median(times.pop(f"peak {dtype}")) / 1e9 for dtype, (_, flops) in peaks.items()}
    rows = {}
    for kind, st in steps.items():
        for prec in precisions:
            s = _median(times[f"{kind} {prec}"])
            phases = st.phases[prec][-args.train_rounds :]
            achieved = st.flops / s / 1e9
            pk = peak["float32" if prec == "fp32" else "bfloat16"]
            rows[f"{kind} {prec}"] = {
                "ms": 1e3 * s, "tokens_per_s": st.tokens / s, "gflops": achieved, "mfu": 100 * achieved / pk,
                "fwd_ms": 1e3 * _median([p[0] for p in phases]), "bwd_ms": 1e3 * _median([p[1] for p in phases]),
                "opt_ms": 1e3 * _median([p[2] for p in phases]),
                "active_params": count_parameters(st.model).active, "total_params": count_parameters(st.model).total,
                "gflop_per_step": st.flops / 1e9,
            }
    m = mcfg
    return {
        "profile": profile, "source": spec["source"], "batch": batch, "seq_len": tcfg.seq_len, "tokens": batch * tcfg.seq_len,
        "model": f"d{m.d_model} L{m.n_layers} H{m.n_heads} E{m.num_experts} k{m.top_k} d_ff{m.d_ff} V{m.vocab_size}",
        "peak_gflops": peak, "rows": rows,
        "bf16_speedup": {kind: rows[f"{kind} fp32"]["ms"] / rows[f"{kind} bf16"]["ms"] for kind in steps} if "bf16" in precisions else None,
        "moe_over_dense": {prec: rows[f"moe {prec}"]["ms"] / rows[f"dense {prec}"]["ms"] for prec in precisions},
    }


# =========================================================================== where the time goes
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::baddbmm", "aten::addmv", "aten::mv")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("routing: softmax, top-k, sort, counts", ("aten::_softmax", "aten::topk", "aten::sort", "aten::argsort", "aten::bincount",
                                               "aten::cumsum", "aten::nonzero", "aten::one_hot", "aten::histc", "aten::where",
                                               "aten::eq", "aten::gt", "aten::floor_divide", "aten::remainder", "aten::logsumexp")),
    ("gather / scatter", ("aten::index_select", "aten::index_add_", "aten::index", "aten::_index_put_impl_", "aten::index_put_",
                          "aten::scatter", "aten::gather", "aten::index_copy_", "aten::embedding", "aten::take")),
    ("loss: log-softmax + NLL", ("aten::_log_softmax", "aten::nll_loss", "log_softmax")),
    ("SwiGLU activation", ("aten::silu",)),
    ("copies, casts, cat", ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("allocation, zero-fill", ("aten::fill_", "aten::zero_", "aten::empty", "aten::zeros")),
)


def _category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(name.startswith(k) or (not k.startswith("aten::") and k in name) for k in keys):
            return cat
    return "other elementwise (mul, add, norms, rotary, ...)"


def time_by_category(prof, phases: tuple[str, ...] = ()) -> dict[str, float]:
    """Self CPU milliseconds per category; events under a phase label (e.g. the optimizer) are
    charged to that phase instead of their op category."""
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.name in phases or ev.name.startswith(("autograd::", "Optimizer.", "forward", "backward")):
            continue
        label, parent = None, ev.cpu_parent
        while parent is not None:
            if parent.name in phases:
                label = parent.name
            parent = parent.cpu_parent
        cat = label or _category(ev.name)
        out[cat] = out.get(cat, 0.0) + ev.self_cpu_time_total / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_layer(shape: LayerShape, tokens: int, args) -> dict[str, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    layers = build_layers(shape, args.seed)
    x = torch.randn(tokens, shape.d).requires_grad_(True)
    grad_y = torch.randn(tokens, shape.d)
    out = {}
    for name, module in ((FAST, layers.fast), (HF_EAGER, layers.hf_eager)):
        step = fwd_bwd(module, layer_forward(name, layers), x, grad_y)
        step()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out[name] = time_by_category(prof)
    return out


def profile_train(spec: dict[str, Any], batch: int, precision: str, args) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    st = TrainStep(spec["model"], spec["train"], batch, args.seed)
    st.step(precision)
    st.step(precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        st.step(precision, profiler_labels=True)
    return time_by_category(prof, phases=(TrainStep.OPTIMIZER,))


# =========================================================================== course cost
def course_cost(args) -> dict[str, Any]:
    """Wall time of the smoke nbval suite and of one cpu-profile run of each study (subprocesses)."""
    out: dict[str, Any] = {}
    env = dict(os.environ, MOE_PROFILE="smoke", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not notebooks:
        out["nbval"] = {"skipped": "no notebooks/*.ipynb"}
    else:
        cmd = [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "notebooks", "-q", "-p", "no:cacheprovider"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        out["nbval"] = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode, "summary": tail[0],
                        "command": "MOE_PROFILE=smoke " + " ".join(cmd[1:]), "notebooks": len(notebooks)}
    try:
        from moe_lib.studies import STUDIES  # needs moe_lib.runs
    except ImportError as err:
        out["studies"] = {"skipped": f"moe_lib.studies unavailable: {err}"}
        return out
    code = (
        "import sys, time, json\n"
        "from moe_lib.studies import build_grid\n"
        "from moe_lib.training.loop import train_run\n"
        "run = build_grid(sys.argv[1], 'cpu').runs[0]\n"
        "t = time.perf_counter(); r = train_run(run.config, run_id=run.condition, profile='cpu')\n"
        "print(json.dumps({'condition': run.condition, 'seed': run.seed, 'train_run_s': time.perf_counter() - t,"
        " 'training_s': 60 * r.metrics['training_time_minutes'], 'steps': run.config.train.steps}))\n"
    )
    studies = {}
    for study in STUDIES:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, study], cwd=ROOT, env=dict(env, MOE_PROFILE="cpu"), capture_output=True, text=True)
        entry: dict[str, Any] = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode}
        try:
            entry.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            entry["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        studies[study] = entry
    out["studies"] = studies
    return out


# =========================================================================== report
def _f(x: float, nd: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def _ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**not met**")


def targets(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    layer = res.get("layer", [])
    if layer:
        worst = min(layer, key=lambda r: r["fast_over_fastest_peer"])
        rows.append(("fast path >= the fastest MoE peer at every shape",
                     f"worst: {worst['fast_over_fastest_peer']:.2f}x {worst['fastest_peer']} ({worst['shape']}, {worst['tokens']} tokens)",
                     _ok(all(r["fast_over_fastest_peer"] >= 1.0 for r in layer))))
        fine = [r for r in layer if r["shape"].endswith("E64 k8")]
        if fine:
            lo = min(r["fast_over_hf_eager"] for r in fine)
            rows.append(("fast path >= 2.5x MixtralSparseMoeBlock at E64/k8", f"min {lo:.2f}x over token counts", _ok(lo >= 2.5)))
        big = [r for r in layer if r["tokens"] >= 4096]
        if big:
            lo = min(big, key=lambda r: r["rows"][FAST]["pct_peak"])
            floor = lo["rows"].get(MM_FLOOR, {}).get("pct_peak", float("nan"))
            rows.append(("fast path >= 60% of fp32 peak at every shape, >= 4096 tokens",
                         f"min {lo['rows'][FAST]['pct_peak']:.0f}% ({lo['shape']}, {lo['tokens']} tokens), where the grouped matmuls alone reach {floor:.0f}%",
                         _ok(all(r["rows"][FAST]["pct_peak"] >= 60 for r in big))))
        cost = [(r["rows"][FAST]["ms"] / r["rows"][DENSE]["ms"], r) for r in layer]
        lo, hi = min(cost, key=lambda c: c[0]), max(cost, key=lambda c: c[0])
        rows.append(("(context, not a target) fast-path time / dense SwiGLU time at equal active FLOPs",
                     f"{lo[0]:.2f}x ({lo[1]['shape']}, {lo[1]['tokens']}) to {hi[0]:.2f}x ({hi[1]['shape']}, {hi[1]['tokens']})", ""))
    for tr in res.get("train", []):
        p = tr["profile"]
        if p == "gpu":
            mfu = tr["rows"]["moe fp32"]["mfu"]
            bf16 = f" (bf16: {tr['rows']['moe bf16']['mfu']:.0f}% of bf16 peak)" if "moe bf16" in tr["rows"] else ""
            rows.append(("gpu-profile training step on CPU >= 50% MFU (fp32)", f"{mfu:.0f}%{bf16}", _ok(mfu >= 50)))
        if tr["bf16_speedup"]:
            sp = tr["bf16_speedup"]["moe"]
            rows.append((f"bf16 autocast >= 1.5x fp32 tokens/s ({p} profile, MoE)", f"{sp:.2f}x (dense: {tr['bf16_speedup']['dense']:.2f}x)", _ok(sp >= 1.5)))
        else:
            rows.append((f"bf16 autocast >= 1.5x fp32 tokens/s ({p} profile, MoE)", "not measured: no native bf16 on this CPU (see bf16 probe)", "n/a"))
        r = tr["moe_over_dense"]
        rows.append((f"MoE step <= 1.3x dense step, equal active params ({p} profile)", ", ".join(f"{k} {v:.2f}x" for k, v in r.items()), _ok(r["fp32"] <= 1.3)))
    nb = res.get("course", {}).get("nbval")
    if nb and "seconds" in nb:
        rows.append(("smoke nbval suite <= 5 min", f"{nb['seconds'] / 60:.1f} min (exit {nb['returncode']})", _ok(nb["seconds"] <= 300 and nb["returncode"] == 0)))
    else:
        rows.append(("smoke nbval suite <= 5 min", "not measured in this run (use --course)", "n/a"))
    return rows


KEPT_MARKER = "<!-- Kept by bench_moe.py when it rewrites this file"


def kept_section(path: Path) -> str:
    """The hand-written tail of ``path`` from :data:`KEPT_MARKER` on (measurements this script does not make), or ""."""
    previous = path.read_text() if path.is_file() else ""
    start = previous.find(KEPT_MARKER)
    return "" if start < 0 else "\n" + previous[start:]


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{res['command']}` on {res['date']} in {res['wall_s'] / 60:.1f} min. How to run it and what each column means: [README.md](README.md).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({m['logical_cpus']} logical CPUs; {m['isa']}) |",
        f"| threads | {m['threads']} (`torch.set_num_threads`) |",
        f"| torch / transformers / python | {m['torch']} / {m['transformers']} / {m['python']} |",
        f"| CPU allocator | {'recycling freed memory (`moe_lib.training.system.configure_cpu_allocator`)' if m['allocator_tuned'] else 'glibc defaults'} |",
        f"| load average at start / end | {' '.join(f'{v:.2f}' for v in m['loadavg_start'] or [])} / {' '.join(f'{v:.2f}' for v in m.get('loadavg_end') or [])} |",
        f"| timing | median of {res['args']['rounds']} interleaved rounds after {res['args']['warmup']} warm-up rounds (train: {res['args']['train_rounds']} rounds) |",
        "",
        "## Matmul peak (square `torch.mm`, median GFLOP/s)",
        "",
    ]
    pk = res["peaks"]
    sizes = sorted({s for t in pk["gflops"].values() for s in t}, key=int)
    lines += ["| dtype | " + " | ".join(f"{s}^3" for s in sizes) + " | peak probe |", "|---" * (len(sizes) + 2) + "|"]
    for dtype, table in pk["gflops"].items():
        lines.append(f"| {dtype} | " + " | ".join(_f(table[s], 0) if s in table else "-" for s in sizes) + f" | {pk['best_size'][dtype]}^3 |")
    lines += ["", "The peak probe (the best size above) also runs inside every round of every table below; "
              "each table's `% of peak` divides by the probe's median from those same rounds.", ""]
    plan = res.get("bf16")
    if plan:
        lines += [f"bf16 probe (256^3 matmul, bf16 / fp32 speed): {plan['speed_ratio']:.3f}x, "
                  + ("native bf16: every bf16 section runs." if plan["native"] else f"**{plan['note']}**."), ""]
    run = res.get("plan")
    if run:  # benchmarks/run_plan.py: what this run ran, shrunk to fit 15 minutes on this machine
        lines += [f"Run plan: estimated {run['total_estimate_s'] / 60:.1f} min (budget 15), "
                  f"{', '.join(f'{k} {v / 60:.1f}' for k, v in run['estimate_s'].items())} min."]
        lines += [f"* {note}" for note in run["notes"] if not note.startswith("bf16 shrunk")] + [""]

    if res.get("correctness"):
        lines += ["## Correctness (fresh random inputs, seed %d)" % res["check_seed"], "",
                  "Largest difference from `moe_lib` reference loop over output, d input, d router, d w_in, d w_out "
                  "(relative to the largest magnitude); same routing indices and gates as HF asserted.", "",
                  "| shape | tokens | fast path | HF eager | HF grouped_mm |", "|---|---|---|---|---|"]
        for c in res["correctness"]:
            e = c["errors"]
            lines.append(f"| {c['shape']} | {c['tokens']} | {e.get(FAST, float('nan')):.1e} | {e.get(HF_EAGER, float('nan')):.1e} | {e.get(HF_GROUPED, float('nan')):.1e} |")
        lines.append("")

    if res.get("layer"):
        lines += ["## MoE layer, forward + backward, fp32", "",
                  "FLOPs: forward `2 N k 3 d h + 2 N d E` (experts + router), forward + backward = 3x forward; "
                  "the dense row uses its own `3 x 2 N 3 d (k h)`. `x slower` = time / fast-path time.", ""]
        by_tokens: dict[int, list] = {}
        for r in res["layer"]:
            by_tokens.setdefault(r["tokens"], []).append(r)
        for tokens, group in by_tokens.items():
            lines += [f"### {tokens} tokens", "",
                      "| shape | implementation | ms | GFLOP/s | % of peak | x slower than fast path |", "|---|---|---:|---:|---:|---:|"]
            for r in group:
                first = True
                for name, row in r["rows"].items():
                    shape = f"{r['shape']} ({r['label']}), {r['gflop_per_call']:.1f} GFLOP" if first else ""
                    bold = "**" if name == FAST else ""
                    lines.append(f"| {shape} | {bold}{name}{bold} | {_f(row['ms'])} | {_f(row['gflops'], 0)} | {_f(row['pct_peak'], 0)}% | {row['vs_fast']:.2f} |")
                    first = False
                lines.append(f"| | fp32 matmul peak (same rounds) | | {_f(r['peak_gflops'], 0)} | 100% | |")
            lines.append("")
        lines += ["### Summary", "", "| shape | tokens | fast path % of peak | grouped matmuls alone % of peak | vs fastest MoE peer | vs HF eager | vs HF grouped_mm | vs dense |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["layer"]:
            rows = r["rows"]
            hg = rows.get(HF_GROUPED, {}).get("vs_fast", float("nan"))
            floor = rows.get(MM_FLOOR, {}).get("pct_peak", float("nan"))
            lines.append(f"| {r['shape']} | {r['tokens']} | {rows[FAST]['pct_peak']:.0f}% | {floor:.0f}% | {r['fast_over_fastest_peer']:.2f}x ({r['fastest_peer']}) | "
                         f"{rows[HF_EAGER]['vs_fast']:.2f}x | {hg:.2f}x | {rows[DENSE]['vs_fast']:.2f}x |")
        lines += ["", "`vs X` = X's time / fast-path time: above 1 the fast path is faster. `grouped matmuls alone` is the six "
                  "`torch._grouped_mm` calls of forward + backward on pre-sorted rows and nothing else (expert FLOPs only): "
                  "no grouped implementation can beat it, so where it sits below 60% of peak, 60% is out of reach.", ""]

    if res.get("train"):
        lines += ["## Training step (forward, backward, grad clip, fused AdamW), synthetic tokens", "",
                  "Model FLOPs per token: `6 x matmul parameters a token uses` (active parameters incl. the tied LM head and routers, "
                  "minus norm gains) `+ 6 L T d` (causal attention). MFU = model FLOPs / (step time x peak of the step's dtype, "
                  "measured in the same rounds).", ""]
        for tr in res["train"]:
            pk = tr["peak_gflops"]
            lines += [f"### {tr['profile']} profile: {tr['model']}, batch {tr['batch']} x seq {tr['seq_len']} = {tr['tokens']} tokens ({tr['source']})", "",
                      "| model | precision | step ms | tokens/s | GFLOP/s | MFU | forward ms | backward ms | optimizer ms | active / total params |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for name, row in tr["rows"].items():
                kind, prec = name.split()
                lines.append(f"| {kind} | {prec} | {_f(row['ms'], 0)} | {_f(row['tokens_per_s'], 0)} | {_f(row['gflops'], 0)} | {row['mfu']:.0f}% | "
                             f"{_f(row['fwd_ms'], 0)} | {_f(row['bwd_ms'], 0)} | {_f(row['opt_ms'], 0)} | {row['active_params'] / 1e6:.1f} M / {row['total_params'] / 1e6:.1f} M |")
            sp = tr["bf16_speedup"]
            bf16 = (f"bf16 / fp32 tokens/s: MoE {sp['moe']:.2f}x, dense {sp['dense']:.2f}x. " if sp
                    else "bf16 rows skipped: no native bf16 on this CPU (see the bf16 probe above). ")
            lines += ["", "Peaks in the same rounds: " + ", ".join(f"{ {'float32': 'fp32', 'bfloat16': 'bf16'}[d]} {v:.0f} GFLOP/s" for d, v in pk.items()) + ". " + bf16
                      + "MoE / dense step time: " + ", ".join(f"{k} {v:.2f}x" for k, v in tr["moe_over_dense"].items()) + ".", ""]

    if res.get("profile"):
        lines += ["## Where the time goes (torch.profiler, self CPU time)", ""]
        for title, cats in res["profile"].items():
            total = sum(cats.values())
            lines += [f"**{title}** ({total:.0f} ms profiled)", "", "| category | ms | share |", "|---|---:|---:|"]
            lines += [f"| {c} | {v:.1f} | {100 * v / total:.0f}% |" for c, v in cats.items() if v >= 0.005 * total]
            lines.append("")

    course = res.get("course")
    lines += ["## Course cost", ""]
    if not course:
        lines += ["Not measured in this run: `python benchmarks/bench_moe.py --course` adds it.", ""]
    else:
        nb = course.get("nbval", {})
        lines += ["| what | wall time | notes |", "|---|---:|---|"]
        if "seconds" in nb:
            lines.append(f"| smoke nbval suite ({nb['notebooks']} notebooks) | {nb['seconds'] / 60:.1f} min | `{nb['command']}`: exit {nb['returncode']}, {nb['summary']} |")
        else:
            lines.append(f"| smoke nbval suite | n/a | {nb.get('skipped', '')} |")
        studies = course.get("studies", {})
        if "skipped" in studies:
            lines.append(f"| one cpu-profile run per study | n/a | {studies['skipped']} |")
        else:
            for study, e in studies.items():
                note = e.get("error") or f"condition '{e.get('condition')}', seed {e.get('seed')}, {e.get('steps')} steps; training loop {e.get('training_s', float('nan')):.0f} s"
                lines.append(f"| one cpu-profile run of `{study}` | {e['seconds'] / 60:.1f} min | {note} |")
        lines.append("")

    lines += ["## Targets (issue 6)", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {v} | {ok} |" for t, v, ok in targets(res)]
    lines.append("")
    return "\n".join(lines)


# =========================================================================== main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, smoke model, few rounds: a sanity run in well under a minute")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts for the MoE layer (default 2048 4096 8192; quick: 512)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per layer table (default 7; quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2; quick: 1)")
    p.add_argument("--train-rounds", type=int, default=None, help="timed rounds of training steps (default 3; quick: 2)")
    p.add_argument("--gpu-batch", type=int, default=4, help="batch of the gpu-profile training step (profile: 24; default 4 keeps the run short)")
    p.add_argument("--out", type=Path, default=None, help="Markdown output (default benchmarks/RESULTS.md; quick: print only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the timed inputs and weights")
    p.add_argument("--check-seed", type=int, default=None, help="seed of the correctness check (default: fresh from os.urandom)")
    p.add_argument("--skip-layer", action="store_true", help="skip the MoE layer tables")
    p.add_argument("--skip-train", action="store_true", help="skip the training-step tables")
    p.add_argument("--skip-profile", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--course", action="store_true", help="also time the smoke nbval suite and one cpu-profile run per study (several minutes)")
    p.add_argument("--merge", action="store_true",
                   help="keep the sections of the existing --out results (.json) that this run skips, e.g. "
                        "`--course --skip-layer --skip-train --skip-profile --merge` adds the course cost to the last full run")
    p.add_argument("--cuda", action="store_true", help="the CUDA mode instead (benchmarks/cuda_layer.py): bf16 layer rows as %% of the "
                   "GPU's bf16 peak -> benchmarks/RESULTS_CUDA.md")
    p.add_argument("--cuda-smoke", action="store_true", help="the CUDA mode's code on CPU at a tiny size (seconds; prints only)")
    p.add_argument("--no-allocator-tuning", action="store_true", help="keep glibc's default malloc thresholds (to measure their cost)")
    args = p.parse_args(argv)
    q = args.quick
    args.tokens = args.tokens or ([512] if q else [2048, 4096, 8192])
    args.rounds = args.rounds or (3 if q else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.train_rounds = args.train_rounds or (2 if q else 3)
    if args.out is None and args.cuda:
        args.out = ROOT / "benchmarks" / "RESULTS_CUDA.md"
    if args.out is None and not (q or args.cuda_smoke):
        args.out = ROOT / "benchmarks" / "RESULTS.md"
    if args.check_seed is None:
        args.check_seed = int.from_bytes(os.urandom(2), "little")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cuda or args.cuda_smoke:
        return main_device_mode("cuda" if args.cuda else "cpu", args.cuda_smoke, args.out, args.threads, args.seed)
    if not args.no_allocator_tuning:
        configure_cpu_allocator()
    start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)  # noqa: E731
    res: dict[str, Any] = {
        "machine": machine_info(args.threads), "date": time.strftime("%Y-%m-%d %H:%M"), "check_seed": args.check_seed,
        "command": "python benchmarks/bench_moe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    # the plan: what runs, from a milliseconds probe, so that the run fits its budget on any CPU (run_plan.py)
    run = make_plan(args, probe_machine(), QUICK_SHAPES if args.quick else LAYER_SHAPES, train_profiles(args.quick))
    apply_plan(args, run)
    shapes, res["plan"], res["bf16"] = run.shapes, run.to_dict(), run.bf16
    plan = run.bf16
    say(f"bf16 probe: {plan['speed_ratio']:.3f}x fp32 speed; plan estimated at {run.total_estimate_s / 60:.1f} min"
        + "".join(f"\n    {note}" for note in run.notes))
    say("matmul peak")
    res["peaks"] = measure_peaks(args.threads, run.peak_sizes, run.peak_rounds, plan["max_peak_size"])
    probes = {}
    for dtype in ("float32", "bfloat16") if plan["native"] else ("float32",):  # no slow bf16 probe in every round
        probes[dtype] = square_mm(res["peaks"]["best_size"][dtype], getattr(torch, dtype))
    say(f"peaks: {({d: round(max(t.values())) for d, t in res['peaks']['gflops'].items()})} GFLOP/s")

    say("correctness: fast path vs reference loop vs HF Mixtral")
    res["correctness"] = []
    for shape in shapes:
        tokens = 256 if args.quick else 1024
        res["correctness"].append({"shape": shape.name, "tokens": tokens, "errors": check_layer(shape, tokens, args.check_seed)})

    if not args.skip_layer:
        res["layer"] = []
        for tokens in args.tokens:
            for shape in shapes:
                say(f"layer {shape.name}, {tokens} tokens")
                r = bench_layer(shape, tokens, args, *probes["float32"])
                res["layer"].append(r)
                say(f"   fast {r['rows'][FAST]['ms']:.1f} ms = {r['rows'][FAST]['pct_peak']:.0f}% of peak, "
                    f"{r['fast_over_fastest_peer']:.2f}x {r['fastest_peer']}, {r['fast_over_hf_eager']:.2f}x HF eager")

    profiles = {name: spec for name, spec in train_profiles(args.quick).items() if name in run.train_profiles}
    if profiles:
        res["train"] = []
        for name, spec in profiles.items():
            batch = run.train_profiles[name]
            say(f"training step, {name} profile, batch {batch}")
            r = bench_train(name, spec, batch, args, probes, plan["precisions"])
            res["train"].append(r)
            say("   " + ", ".join(f"{k}: {v['tokens_per_s']:.0f} tok/s MFU {v['mfu']:.0f}%" for k, v in r["rows"].items()))

    if not args.skip_profile and not args.quick:
        say("profiler breakdown")
        fine = shapes[1]
        by_impl = profile_layer(fine, 4096, args)
        res["profile"] = {f"MoE layer {fine.name}, 4096 tokens, forward + backward: {name}": cats for name, cats in by_impl.items()}
        gpu = profiles.get("gpu")
        if gpu is not None and not args.skip_train:
            res["profile"][f"gpu-profile training step, fp32, batch {args.gpu_batch}"] = profile_train(gpu, args.gpu_batch, "fp32", args)

    if args.course:
        say("course cost: smoke nbval suite and one cpu-profile run per study")
        res["course"] = course_cost(args)

    res["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["wall_s"] = time.perf_counter() - start
    if args.merge and args.out and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        for section in ("layer", "train", "profile", "course"):
            if section not in res and section in previous:
                res[section] = previous[section]
        res["command"] = f"{previous.get('command', '?')}` ({previous.get('date', '?')}, {previous.get('wall_s', 0) / 60:.1f} min) and `{res['command']}"
        for key in ("peaks", "machine", "args", "check_seed", "correctness", "bf16"):  # what the merged tables were measured with
            res[key] = previous.get(key, res.get(key))
    text = render(res)
    if args.out:
        text += kept_section(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
        say(f"wrote {args.out} and {args.out.with_suffix('.json').name}")
    else:
        print(text)
    return res


if __name__ == "__main__":
    main()
