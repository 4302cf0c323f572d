"""Notebook 07's "What we found": `studies.dispatch.findings` on hand-made results, histories and benchmark tables."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from moe_lib.studies.dispatch import FAST, FLOOR, LOOP, findings, loss_gaps


def study(ms_grouped=200.0, ms_loop=300.0, loop_losses=(5.0, 4.5, 4.0)):
    results = pd.DataFrame({"condition": ["grouped", "loop"], "seed": [42, 42], "ms_per_step": [ms_grouped, ms_loop],
                            "device": ["cpu (test)", "cpu (test)"]})
    histories = pd.DataFrame({"condition": ["grouped"] * 3 + ["loop"] * 3, "seed": [42] * 6, "step": [0, 1, 2] * 2,
                              "lm_loss": [5.0, 4.5, 4.0, *loop_losses]})
    return SimpleNamespace(results=results, histories=histories, profile=SimpleNamespace(name="tiny"))


def layer(shape, label, tokens, fast, floor, loop):
    rows = {FAST: fast, FLOOR: floor, LOOP: loop}
    return {"shape": shape, "label": label, "tokens": tokens, "peak_gflops": 100.0,
            "rows": {name: {"ms": ms, "gflops": 1.0, "pct_peak": 1.0, "vs_fast": ms / fast} for name, ms in rows.items()}}


BENCHMARK = {
    "date": "2026-01-01 00:00", "machine": {"cpu": "Test CPU", "threads": 2},
    "layer": [layer("d8 h32 E2 k1", "coarse", 4096, fast=100.0, floor=80.0, loop=150.0),
              layer("d8 h4 E16 k4", "fine", 4096, fast=100.0, floor=40.0, loop=500.0),
              layer("d8 h32 E2 k1", "coarse", 2048, fast=50.0, floor=10.0, loop=60.0)],
}


def test_training_sentence_gives_the_ratio_and_both_times():
    (line,) = findings(study())
    assert "1.50x" in line and "300 vs 200 ms" in line and "identical" in line and "tiny" in line


def test_loss_gap_is_the_largest_step_difference():
    assert loss_gaps(study(loop_losses=(5.0, 4.7, 4.0)).histories, "loop", [42]) == pytest.approx([0.2])
    assert "2.0e-01" in findings(study(loop_losses=(5.0, 4.7, 4.0)))[0]


def test_benchmark_shares_are_outside_the_floor_at_the_chosen_tokens():
    lines = findings(study(), BENCHMARK)
    assert len(lines) == 4  # training, one per shape at 4096 tokens, the summary
    assert "Coarse layer (d8 h32 E2 k1, 4096 tokens" in lines[1] and "20%" in lines[1] and "1.50x" in lines[1]
    assert "Fine layer" in lines[2] and "60%" in lines[2] and "5.00x" in lines[2]
    assert "most at d8 h4 E16 k4 (60%), least at d8 h32 E2 k1 (20%)" in lines[3] and "Test CPU" in lines[3]


def test_unmeasured_tokens_fall_back_to_the_largest_measured():
    lines = findings(study(), BENCHMARK, tokens=1234)
    assert "4096 tokens" in lines[1]
    lines = findings(study(), {**BENCHMARK, "layer": BENCHMARK["layer"][2:]}, tokens=1234)
    assert "2048 tokens" in lines[1] and "80%" in lines[1]


def test_a_missing_condition_is_named():
    s = study()
    s.results = s.results[s.results.condition == "grouped"]
    with pytest.raises(ValueError, match="'loop'"):
        findings(s)
