"""bench_moe's CUDA mode (issue 25 §3): one MoE layer, forward + backward in bf16, as % of the GPU's
bf16 peak measured in the same run.

    python benchmarks/bench_moe.py --cuda          # on a GPU: writes benchmarks/RESULTS_CUDA.md + .json
    python benchmarks/bench_moe.py --cuda-smoke    # the same code on CPU at a tiny size (what the tests run)

Rows, all holding the same weights and routing like Mixtral (softmax -> top-k -> renormalise):
moe_lib's dispatch variants (``grouped``: sort + ``torch._grouped_mm``; ``loop``: one matmul per
expert), Hugging Face's ``MixtralSparseMoeBlock`` (its eager loop, and its ``grouped_mm`` experts
implementation where this transformers has it) and a dense SwiGLU of width ``k h`` (the same active
expert FLOPs, no routing). The peak is the best square bf16 ``torch.mm`` of a few sizes, and its probe
runs again in every timed round, interleaved with the rows.

Shapes: coarse (d 384, h 1536, E 8, k 2), fine-grained (d 1024, h 256, E 64, k 8) and large
(d 2048, h 768, E 128, k 8), where a published anchor exists: see :data:`ANCHOR`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch

from moe_lib.files import atomic_write_text
from moe_lib.moe.model import DenseFeedForward, MoEFeedForward

from .moe_layers import LayerShape, dense_flops, hf_mixtral_block, layer_flops, moe_config
from .timing import interleaved_times, measure_peaks, median, square_mm

CUDA_SHAPES = (
    LayerShape("coarse (Mixtral-like)", 384, 1536, 8, 2),
    LayerShape("fine-grained (OLMoE-like)", 1024, 256, 64, 8),
    LayerShape("large (the anchor's shape)", 2048, 768, 128, 8),
)
SMOKE_SHAPES = (LayerShape("smoke coarse", 32, 64, 4, 2), LayerShape("smoke fine", 32, 16, 16, 4))
ANCHOR = ("Published anchor: stock `torch._grouped_mm` reaches about 24% of an H100's bf16 peak at d 2048, h 768, "
          "E 128, k 8; the best fused kernels (SonicMoE) reach 37-56%.")
GROUPED, LOOP, HF_EAGER, HF_GROUPED, DENSE = (
    "moe_lib grouped", "moe_lib loop", "HF Mixtral (eager loop)", "HF Mixtral (grouped_mm)", "dense SwiGLU (same active FLOPs)",
)


def device_layers(shape: LayerShape, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """Every row's module and its ``x [N, d] -> y [N, d]``, in ``dtype`` on ``device``. HF rows are
    missing where this transformers lacks the implementation."""
    torch.manual_seed(seed)
    grouped = MoEFeedForward(moe_config(shape, "grouped"))
    loop = MoEFeedForward(moe_config(shape, "loop"))
    loop.load_state_dict(grouped.state_dict())
    rows: dict[str, tuple[torch.nn.Module, Callable]] = {
        GROUPED: (grouped, lambda x: grouped(x)[0]), LOOP: (loop, lambda x: loop(x)[0]),
    }
    for name, implementation in ((HF_EAGER, "eager"), (HF_GROUPED, "grouped_mm")):
        block = hf_mixtral_block(grouped, shape, implementation)
        if block is not None:
            rows[name] = (block, lambda x, block=block: block(x.unsqueeze(0)).squeeze(0))
    dense = DenseFeedForward(shape.d, shape.k * shape.h)
    rows[DENSE] = (dense, lambda x: dense(x)[0])
    for module, _ in rows.values():
        module.to(device=device, dtype=dtype)
    return rows


def bench_shape(shape: LayerShape, tokens: int, device: torch.device, dtype: torch.dtype, peak: tuple[Callable, float], opts: dict) -> dict[str, Any]:
    """Median forward + backward time of each row, and its % of the peak probe's speed in the same rounds."""
    rows = device_layers(shape, device, dtype, opts["seed"])
    g = torch.Generator().manual_seed(opts["seed"] + 1)
    x = torch.randn(tokens, shape.d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    grad_y = torch.randn(tokens, shape.d, generator=g).to(device=device, dtype=dtype)

    def step(module: torch.nn.Module, forward: Callable) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            forward(x).backward(grad_y)
        return run

    fns = {name: step(module, forward) for name, (module, forward) in rows.items()}
    fns["peak"] = peak[0]
    times = interleaved_times(fns, opts["rounds"], opts["warmup"], opts["threads"])
    peak_flops = peak[1] / median(times.pop("peak"))
    out = {}
    for name, ts in times.items():
        flops = dense_flops(shape, tokens) if name == DENSE else layer_flops(shape, tokens)
        seconds = median(ts)
        out[name] = {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12, "pct_peak": 100 * flops / seconds / peak_flops}
    return {"shape": shape.name, "label": shape.label, "tokens": tokens, "peak_tflops": peak_flops / 1e12, "rows": out}


def run_device_mode(device: str, smoke: bool, threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """The CUDA mode's whole run on ``device``; ``smoke`` shrinks shapes, tokens, peak sizes and rounds to seconds on a CPU."""
    dev = torch.device(device)
    dtype = torch.bfloat16
    opts = {"seed": seed, "threads": threads, "rounds": 2 if smoke else 10, "warmup": 1 if smoke else 3}
    sizes = (64, 128) if smoke else (4096, 8192)
    peaks = measure_peaks(threads, sizes, opts["rounds"], device=dev, dtypes=(dtype,))
    peak = square_mm(peaks["best_size"]["bfloat16"], dtype, dev)
    shapes, tokens = (SMOKE_SHAPES, 64) if smoke else (CUDA_SHAPES, 16384)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)"
    return {"device": gpu, "torch": torch.__version__, "dtype": "bf16", "date": time.strftime("%Y-%m-%d %H:%M"),
            "peaks_tflops": {s: v / 1e3 for s, v in peaks["gflops"]["bfloat16"].items()},
            "layers": [bench_shape(shape, tokens, dev, dtype, peak, opts) for shape in shapes], "anchor": ANCHOR}


def render_device_mode(res: dict[str, Any]) -> str:
    lines = ["# MoE layer on the GPU, bf16", "",
             f"Generated by `python benchmarks/bench_moe.py --cuda` on {res['device']} (torch {res['torch']}, {res['date']}). "
             "Forward + backward of one MoE layer (router included) in bf16; FLOPs as in README.md; % of peak divides by the "
             "best square bf16 `torch.mm` of this run, re-measured in every round.", "",
             "bf16 matmul peak: " + ", ".join(f"{s}^3 {v:.0f} TFLOP/s" for s, v in res["peaks_tflops"].items()) + ".", "",
             res["anchor"], "", "| shape | tokens | implementation | ms | TFLOP/s | % of bf16 peak |", "|---|---:|---|---:|---:|---:|"]
    for layer in res["layers"]:
        for name, row in layer["rows"].items():
            lines.append(f"| {layer['shape']} ({layer['label']}) | {layer['tokens']} | {name} | {row['ms']:.2f} | {row['tflops']:.1f} | {row['pct_peak']:.1f}% |")
    return "\n".join(lines) + "\n"


def main_device_mode(device: str, smoke: bool, out, threads: int, seed: int) -> dict[str, Any]:
    res = run_device_mode(device, smoke, threads, seed)
    text = render_device_mode(res)
    if out is None:
        print(text)
    else:
        atomic_write_text(out, text)
        atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1, default=str))
        print(f"wrote {out} and {out.with_suffix('.json').name}")
    return res
