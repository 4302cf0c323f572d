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


@pytest.mark.parametrize("fp32_gflops", [400.0, 69.0, 20.0, 5.0])
def test_plan_with_a_slow_bf16_probe_fits_the_budget(bench, fp32_gflops):
    """Issue 22: the benchmark finishes in under 15 minutes on any CPU. With a fake probe of a CPU that
    emulates bf16 (0.007x fp32, measured on a no-AVX-512 CPU), the plan runs no bf16 training rows,
    caps the bf16 peak, and shrinks itself (saying why) until its estimated cost fits the budget."""
    from benchmarks.run_plan import BUDGET_SECONDS, TARGET_SECONDS, MachineProbe

    args = bench.parse_args([])
    plan = bench.make_plan(args, MachineProbe(fp32_gflops, 0.007), bench.LAYER_SHAPES, bench.train_profiles(False))
    assert plan.precisions == ("fp32",) and plan.bf16["max_peak_size"] == 512
    assert plan.total_estimate_s <= TARGET_SECONDS < BUDGET_SECONDS
    assert any(note.startswith("bf16 shrunk") for note in plan.notes)
    if fp32_gflops < 100:  # the full run would take far longer here: it shrank, and says so
        assert len(plan.tokens) < len(args.tokens) and any("exceeded" in note for note in plan.notes)


def test_plan_estimate_counts_what_the_run_does(bench):
    """The estimate grows with what the plan keeps (so shrinking really cuts cost), and a fast native-bf16
    machine, like the one that made RESULTS.md, runs the full default benchmark unchanged."""
    from benchmarks.run_plan import MachineProbe, estimate_seconds

    profiles = bench.train_profiles(False)
    args = bench.parse_args([])
    full = bench.make_plan(args, MachineProbe(386.0, 6.4), bench.LAYER_SHAPES, profiles)
    assert (full.tokens, full.rounds, full.precisions, full.notes) == (tuple(args.tokens), args.rounds, ("fp32", "bf16"), [])
    slow = MachineProbe(20.0, 0.007)
    base = estimate_seconds(full, slow, profiles)
    full.tokens = full.tokens[:1]
    assert estimate_seconds(full, slow, profiles)["layer"] < base["layer"]
    full.train_profiles = {"cpu": 16}
    assert estimate_seconds(full, slow, profiles)["train"] < base["train"]


def test_main_follows_the_plan_of_a_slow_bf16_probe(bench, monkeypatch, tmp_path):
    """main() takes the plan from the probe: a fake slow-bf16 probe caps the bf16 peak sizes and records why."""
    from benchmarks.run_plan import MachineProbe

    monkeypatch.setattr(bench, "probe_machine", lambda: MachineProbe(69.0, 0.007))
    res = bench.main(["--quick", "--skip-layer", "--skip-train", "--threads", "1", "--out", str(tmp_path / "r.md")])
    assert set(res["peaks"]["gflops"]["bfloat16"]) == {256}
    assert any(note.startswith("bf16 shrunk") for note in res["plan"]["notes"])
    assert "bf16 shrunk" in (tmp_path / "r.md").read_text()


def test_cuda_mode_code_path_runs_on_cpu_at_smoke_size(bench):
    """Issue 25: the CUDA mode's code (device as a parameter) on CPU: every row at every smoke shape, in bf16,
    as % of the bf16 peak measured in the same run, with the published anchor in the report. No timing asserted."""
    from benchmarks import cuda_layer

    res = bench.main(["--cuda-smoke", "--threads", "1"])
    assert [layer["shape"] for layer in res["layers"]] == [s.name for s in cuda_layer.SMOKE_SHAPES]
    expected = {cuda_layer.GROUPED, cuda_layer.LOOP, cuda_layer.HF_EAGER, cuda_layer.DENSE}
    for layer in res["layers"]:
        assert expected <= set(layer["rows"])
        for row in layer["rows"].values():
            assert row["ms"] > 0 and row["pct_peak"] > 0 and row["tflops"] > 0
    text = cuda_layer.render_device_mode(res)
    assert "24% of an H100's bf16 peak" in text and "SonicMoE" in text and cuda_layer.HF_EAGER in text
    assert [s.name for s in cuda_layer.CUDA_SHAPES] == ["d384 h1536 E8 k2", "d1024 h256 E64 k8", "d2048 h768 E128 k8"]


def test_cuda_mode_rows_compute_the_same_layer(bench):
    """The rows the CUDA mode times hold the same weights and route alike: equal outputs in fp32 on CPU."""
    from benchmarks import cuda_layer

    shape = cuda_layer.SMOKE_SHAPES[1]
    rows = cuda_layer.device_layers(shape, torch.device("cpu"), torch.float32, seed=0)
    x = torch.randn(40, shape.d)
    reference = rows[cuda_layer.LOOP][1](x)
    for name in (cuda_layer.GROUPED, cuda_layer.HF_EAGER, cuda_layer.HF_GROUPED):
        if name in rows:
            torch.testing.assert_close(rows[name][1](x), reference, rtol=1e-5, atol=1e-6)
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


def test_train_step_benchmark_times_the_library_train_step(bench):
    """bench_moe's TrainStep takes moe_lib's own train_step (no copy of it): the same weights after two steps as
    train_step on the same config and tokens, and a forward, backward and optimizer time for each step."""
    from moe_lib.config import RunConfig
    from moe_lib.training.loop import init_train_state, train_step

    spec = bench.train_profiles(quick=True)["smoke"]
    timed = bench.TrainStep(spec["model"], spec["train"], 2, seed=0)
    reference = init_train_state(RunConfig(model=spec["model"], train=timed.state.config.train), torch.device("cpu"))
    for step in range(2):
        timed.step("fp32")
        train_step(reference, timed.token_stream, step)
    for (name, got), want in zip(timed.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(got, want), name
    assert len(timed.phases["fp32"]) == 2 and all(t > 0 for phase in timed.phases["fp32"] for t in phase)
