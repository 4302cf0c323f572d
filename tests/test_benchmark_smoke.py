"""The benchmark's correctness check on tiny shapes: moe_lib's fast path equals its reference
loop and Hugging Face's MixtralSparseMoeBlock holding the same weights (outputs and every
gradient, same routing). No timing is asserted here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_moe"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("d, h, experts, k, seed", [(32, 48, 4, 2, 0), (16, 8, 16, 4, 1), (24, 16, 8, 8, 2)])
def test_fast_path_equals_reference_and_hf_mixtral(bench, d, h, experts, k, seed):
    shape = bench.LayerShape("tiny", d, h, experts, k)
    errors = bench.check_layer(shape, tokens=64, seed=seed)  # raises on any mismatch
    assert bench.FAST in errors and bench.HF_EAGER in errors
    assert errors[bench.FAST] <= 1e-5
    assert all(err <= 1e-4 for err in errors.values())


def test_flop_accounting(bench):
    shape = bench.LayerShape("x", d=4, h=3, E=5, k=2)
    forward = 2 * 10 * 2 * 3 * 4 * 3 + 2 * 10 * 4 * 5
    assert bench.layer_flops(shape, 10) == 3 * forward
    assert bench.dense_flops(shape, 10) == 3 * 2 * 10 * 3 * 4 * (2 * 3)


@pytest.mark.parametrize("ratio, native", [(0.007, False), (0.49, False), (0.5, True), (6.4, True)])
def test_bf16_plan_from_probe(bench, ratio, native):
    """The probe's bf16/fp32 speed ratio decides: 0.007 is the measured no-AVX-512 CPU (1 vs 160 GFLOP/s)."""
    plan = bench.bf16_plan(ratio, quick=False)
    assert plan["native"] is native
    assert plan["precisions"] == (("fp32", "bf16") if native else ("fp32",))
    assert plan["max_peak_size"] == (None if native else 512)
    assert ("bf16 shrunk" in plan["note"] and f"{ratio:.3f}x" in plan["note"]) is not native


def test_slow_bf16_run_has_no_bf16_rows_and_says_why(bench):
    """Without native bf16 the training table is fp32 only, and the targets say why bf16 is missing."""
    plan = bench.bf16_plan(0.007, quick=True)
    peaks = bench.measure_peaks(threads=1, sizes=(64, 128), rounds=1, max_bf16_size=64)
    assert set(peaks["gflops"]["bfloat16"]) == {64} and set(peaks["gflops"]["float32"]) == {64, 128}
    spec = bench.train_profiles(quick=True)["smoke"]
    args = bench.parse_args(["--quick", "--train-rounds", "1", "--warmup", "0"])
    probes = {"float32": bench.square_mm(64, torch.float32)}
    result = bench.bench_train("smoke", spec, 2, args, probes, plan["precisions"])
    assert set(result["rows"]) == {"moe fp32", "dense fp32"} and result["bf16_speedup"] is None
    verdicts = {target: value for target, value, _ in bench.targets({"train": [result]})}
    assert verdicts["bf16 autocast >= 1.5x fp32 tokens/s (smoke profile, MoE)"].startswith("not measured: no native bf16")


def test_rewriting_results_keeps_the_hand_measured_section(bench, tmp_path):
    """RESULTS.md's course timings were measured by hand: a new benchmark run must not delete them."""
    results = tmp_path / "RESULTS.md"
    assert bench.kept_section(results) == ""
    results.write_text("# old generated tables\n")
    assert bench.kept_section(results) == ""
    tail = f"{bench.KEPT_MARKER}: ... -->\n## The course, measured by hand\n| 01 | 4.4 min |\n"
    results.write_text("# old generated tables\n\n" + tail)
    assert bench.kept_section(results) == "\n" + tail
    real = (BENCH.parent / "RESULTS.md").read_text()
    assert bench.KEPT_MARKER in real and real.index(bench.KEPT_MARKER) > real.index("## Targets")
