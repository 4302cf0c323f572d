"""The benchmark's correctness check on tiny shapes: moe_lib's fast path equals its reference
loop and Hugging Face's MixtralSparseMoeBlock holding the same weights (outputs and every
gradient, same routing). No timing is asserted here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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
