"""The notebooks' "What we found" sentences (moe_lib.studies.noise.findings, zloss.findings) on hand-made
results tables: the numbers they quote are the tables' paired effects, and the verdict words follow the CIs."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re

import pandas as pd
import pytest

from moe_lib import studies
from moe_lib.profiles import get_profile
from moe_lib.stats import holm_adjusted
from moe_lib.studies.verdicts import holm_sentence
from moe_lib.studies import comparison, noise, zloss
from moe_lib.studies.verdicts import change_text, interval_side, scale_sentence

SMOKE = get_profile("smoke")
SEEDS = (42, 43, 44)
WOBBLE = {42: 0.002, 43: -0.003, 44: 0.001}  # seed-dependent noise on the log scale, so CIs have a width


def study_of(name: str, ppl, profile_name: str = "smoke", **columns) -> studies.StudyResult:
    """A study of the smoke grid whose ``metric`` columns are ``ppl(run)``; ``columns`` per run (callables) or constants."""
    profile = dataclasses.replace(SMOKE, name=profile_name)
    grid = studies.build_grid(name, SMOKE, seeds=SEEDS)
    rows = []
    for run in grid.runs:
        row = {"run_id": run.run_id, "condition": run.condition, **run.factors, "seed": run.seed, "config_hash": run.config_hash}
        value = ppl(run)
        row.update(best_val_perplexity=value, test_perplexity=value, train_tokens=run.config.train.steps
                   * run.config.train.batch_size * run.config.train.seq_len)
        row.update({k: v(run) if callable(v) else v for k, v in columns.items()})
        rows.append(row)
    return studies.StudyResult(grid, profile, pd.DataFrame(rows), pd.DataFrame(), None)


# --------------------------------------------------------------------------- shared phrases
def test_interval_side_and_change_text():
    assert interval_side(0.5, 2.0) == "higher" and interval_side(-2.0, -0.1) == "lower"
    assert interval_side(-1.0, 1.0) == "inconclusive" and interval_side(float("nan"), 1.0) == "inconclusive"
    assert change_text(6.6, 4.0, 9.2, 3) == "+6.6% (95% CI [+4.0%, +9.2%]: the CI excludes 0)"
    assert change_text(-2.0, -5.5, 1.4, 3) == "-2.0% (95% CI [-5.5%, +1.4%]: inconclusive at n = 3)"
    assert "too few seeds" in change_text(1.0, float("nan"), float("nan"), 1)


def test_scale_sentence_names_only_what_changed():
    same = scale_sentence({"a": ("higher", "higher")}, "cpu", "gpu")
    assert "nothing" in same and "a (higher)" in same
    moved = scale_sentence({"a": ("higher", "inconclusive"), "b": ("lower", "lower")}, "cpu", "gpu")
    assert "a from higher to inconclusive" in moved and "unchanged: b (lower)" in moved


# --------------------------------------------------------------------------- notebook 03
def noise_ppl(noise_cost: float, lb_off_cost: float, interaction: float = 0.0):
    """log PPL additive in noise 0.5 (``noise_cost``), lb 0 (``lb_off_cost``) and seed, plus ``interaction`` at (0.5, lb 0)."""
    def ppl(run):
        n, lb = run.factors["noise_std"], run.factors["load_balancing_weight"]
        return 100 * math.exp(noise_cost * (n == 0.5) + lb_off_cost * (lb == 0.0) + interaction * (n == 0.5 and lb == 0.0)
                              + WOBBLE[run.seed] * (1 + (n == 0.5)))
    return ppl


def cv(run):
    return {0.01: 0.1, 0.0: 1.0}[run.factors["load_balancing_weight"]] * (1 + run.factors["noise_std"])


def test_noise_findings_quote_the_paired_effects_and_the_cv_ratio():
    study = study_of("noise", noise_ppl(0.08, 0.0), "cpu", expert_usage_cv=cv)
    lines = noise.findings(study)
    assert len(lines) == 3 and all(line.endswith(".") for line in lines)
    expected = noise.paired_table(study, "test_perplexity", "noise=0.0, lb=0.01").loc["noise=0.5, lb=0.01"]
    assert f"noise 0.5 changed test perplexity by {-expected.improvement_pct:+.1f}%" in lines[0]
    assert f"{-expected.improvement_pct:+.1f}%" == f"{100 * (math.exp(0.08) - 1):+.1f}%"
    assert "the CI excludes 0" in lines[0].split(" and noise 0.1")[0]
    assert "10.0-10.0x" in lines[1]  # the CV is 10x higher without the loss at every noise level
    family = noise.verdict_tests(study)
    holm = holm_adjusted(family.p)
    kept = [t for t, q in zip(family.index, holm) if q < 0.05]
    assert f"of the 15 tests in this notebook's verdicts, {len(kept)} stay" in lines[1] and "; ".join(kept) in lines[1]
    assert f"{int(((family.p < 0.05) & (holm >= 0.05)).sum())} more have p < 0.05 only uncorrected" in lines[1]
    assert "No gpu results" in lines[2] and "cpu profile only" in lines[2]


def test_noise_findings_with_both_scales_say_what_changed():
    cpu = study_of("noise", noise_ppl(0.08, 0.0), "cpu", expert_usage_cv=cv)
    gpu = study_of("noise", noise_ppl(0.0, -0.02), "gpu", expert_usage_cv=cv)
    lines = noise.findings(cpu, gpu)
    assert len(lines) == 5 and lines[2].startswith("At the gpu profile")
    assert "noise 0.5 from higher to inconclusive" in lines[-1]
    assert "no load balancing from inconclusive to lower" in lines[-1]
    anova, _ = noise.noise_factorial_analysis(gpu)
    p = anova.loc["noise_std:load_balancing_weight", "PR(>F)"]
    holm = dict(zip(noise.verdict_tests(gpu).index, holm_adjusted(noise.verdict_tests(gpu).p)))["ANOVA: noise x lb"]
    assert f"ANOVA p = {p:.3f} (Holm {holm:.3f})" in lines[3]


def test_findings_compare_the_one_verdict_metric():
    """Notebook 01 decides it: every verdict compares the final model's test perplexity, whatever the original reported."""
    from moe_lib.studies import modern
    from moe_lib.studies.verdicts import VERDICT_METRIC

    assert VERDICT_METRIC == "test_perplexity" and comparison.COMPARED_METRIC["noise"] != VERDICT_METRIC
    assert inspect.signature(noise.findings).parameters["metric"].default == VERDICT_METRIC
    assert inspect.signature(zloss.findings).parameters["metric"].default == VERDICT_METRIC
    for function in (modern.verdict, modern.comparison_table, modern.effect_phrase):
        assert inspect.signature(function).parameters["metric"].default == VERDICT_METRIC, function
    study = study_of("noise", noise_ppl(0.08, 0.0), "cpu", expert_usage_cv=cv)
    study.results["best_val_perplexity"] = 100.0  # a different metric with no effect: the findings must not read it
    assert "the CI excludes 0" in noise.findings(study)[0].split(" and noise 0.1")[0]


# --------------------------------------------------------------------------- notebook 04
ZLOSS_COST = {"baseline": 0.0, "z=0.001": 0.01, "z=0.001, no noise": 0.05, "z=0.01": 0.03}


def zloss_ppl(run):
    return 100 * math.exp(ZLOSS_COST[run.condition] + WOBBLE[run.seed] * (run.condition != "baseline"))


def noise_twin_ppl(run):
    """The noise grid's runs: noise 0.1, lb 0.01 equal to the z-loss baseline; noise 0, lb 0.01 at +4% (so z alone adds 1%)."""
    n = run.factors["noise_std"]
    return 100 * math.exp(0.04 * (n == 0.0) + 0.2 * (n == 0.5))


def zloss_study(profile_name="cpu"):
    return study_of("zloss", zloss_ppl, profile_name, router_logsumexp=lambda r: 2.5 - 100 * r.factors["z_loss_weight"],
                    router_entropy=lambda r: 1.7 + 10 * r.factors["z_loss_weight"])


def test_zloss_findings_compare_no_noise_with_the_right_baseline_when_the_designs_match():
    cpu, twin = zloss_study(), study_of("noise", noise_twin_ppl, "cpu")
    assert zloss.same_design(cpu, twin)  # the smoke grids: noise 0.1, lb 0.01 is the z-loss baseline's config
    lines = zloss.findings(cpu, cpu_noise=twin)
    pct = lambda d: f"{100 * (math.exp(d) - 1):+.1f}%"
    assert f"z=0.001 by {pct(0.01)}" in lines[0] and f"z=0.01 by {pct(0.03)}" in lines[0]
    assert "2.50 at the baseline" in lines[0] and "z=0.01: 1.50" in lines[0]
    assert f"by {pct(0.05)}" in lines[1] and "two factors" in lines[1]
    assert f"the z-loss alone changed test perplexity by {pct(0.05 - 0.04)}" in lines[1]
    assert len(lines) == 4 and "No gpu results" in lines[3]
    family = zloss.verdict_family(cpu, twin)
    assert len(family) == 7 and family[-1][0].startswith("the z-loss alone")  # 3 on perplexity, 3 on entropy, the twin
    assert lines[2] == holm_sentence({"cpu": family}) and "of 7" in lines[2]
    assert len(zloss.verdict_family(cpu)) == 6  # without the twin runs, no z-loss-alone test


def test_zloss_findings_state_the_confound_without_a_matching_noise_study():
    cpu = zloss_study()
    for twin in (None, study_of("noise", noise_twin_ppl, "cpu", config_hash="another design")):
        line = zloss.findings(cpu, cpu_noise=twin)[1]
        assert "mixes both" in line and "the z-loss alone changed" not in line


def test_zloss_findings_name_an_older_design_and_missing_conditions_at_gpu():
    cpu = zloss_study()
    gpu = zloss_study("gpu")
    gpu.results = gpu.results[gpu.results.condition != "z=0.01"].assign(train_tokens=123)
    lines = zloss.findings(cpu, gpu)
    assert len(lines) == 6 and lines[4].startswith("After Holm's correction") and "gpu " in lines[4]
    assert "trained 123 tokens each, an older design" in lines[2] and "z=0.01 was not run" in lines[2]
    assert "z=0.01 from inconclusive to not run" in lines[-1] or "z=0.01 from higher to not run" in lines[-1]
    assert not any(re.search(r"\bnan\b|\binf\b", line) for line in lines)


# --------------------------------------------------------------------------- stored results, read without training
def test_stored_study_reads_the_stored_rows_of_any_results_version_and_none_without(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_PROJECT_ROOT", str(tmp_path))
    assert studies.stored_study("zloss", "cpu") is None
    run = studies.build_grid("zloss", get_profile("cpu")).runs[0]
    (tmp_path / "results" / "cpu").mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"run_id": run.run_id, "condition": run.condition, "seed": run.seed, "config_hash": "an older version",
                   "test_perplexity": 90.0}]).to_csv(tmp_path / "results" / "cpu" / "zloss.csv", index=False)
    study = studies.stored_study("zloss", "cpu")
    assert study is not None and study.profile.name == "cpu"
    assert study.results.run_id.tolist() == [run.run_id] and study.results.test_perplexity.tolist() == [90.0]
