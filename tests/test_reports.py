"""Tables and verdicts on edge cases: one seed, a CV of 0, NaN metrics. They must say what they
cannot conclude, never print ``nan``/``inf`` or claim a comparison they have no interval for."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from moe_lib import studies
from moe_lib.studies import capacity, comparison, noise, originals, routing, zloss
from moe_lib.profiles import get_profile

SMOKE = get_profile("smoke")


def fake_study(name: str, seeds, **overrides) -> studies.StudyResult:
    """A study whose every run has the same metrics (``overrides`` replace them), seed-dependent PPL."""
    grid = studies.build_grid(name, SMOKE, seeds=seeds)
    rows = []
    for run in grid.runs:
        metrics = {
            "best_val_perplexity": 100.0 + run.seed % 3, "expert_usage_cv": 0.1, "training_time_minutes": 1.0,
            "test_perplexity": 10.0 + run.seed % 2, "val_perplexity": 50.0 + run.seed % 3, "ms_per_step": 5.0, "router_entropy": 1.0, "router_logsumexp": 1.0,
            "test_loss": 2.0 + 0.01 * run.seed, "test_top3_accuracy": 0.5,
        }
        metrics.update(overrides)
        rows.append({"run_id": run.run_id, "condition": run.condition, **run.factors, "seed": run.seed, **metrics})
    history = pd.DataFrame({"condition": grid.conditions, "seed": seeds[0], "step": 1, "lm_loss": 1.0})
    return studies.StudyResult(grid, SMOKE, pd.DataFrame(rows), history, None)


def text(table_or_lines) -> str:
    return table_or_lines.to_string() if isinstance(table_or_lines, pd.DataFrame) else "\n".join(table_or_lines)


def assert_clean(output: str) -> None:
    lowered = output.lower()
    assert "nan" not in lowered, output
    assert "inf" not in lowered, output


@pytest.mark.parametrize("name, table, verdicts", [
    ("noise", noise.noise_condition_table, noise.noise_verdicts),
    ("zloss", zloss.zloss_table, zloss.zloss_verdicts),
    ("routing", routing.routing_table, routing.routing_verdicts),
])
def test_a_single_seed_gives_no_interval_and_no_nan(name, table, verdicts):
    study = fake_study(name, (42,))
    out = text(table(study)) + "\n" + text(verdicts(study))
    assert_clean(out)
    assert "excludes 0" not in out  # no significance claimed without an interval
    if name != "routing":
        assert "–" in text(table(study))


def test_zloss_with_one_seed_does_not_compare_with_the_reported_improvement():
    last = zloss.zloss_verdicts(fake_study("zloss", (42,)))[-1]
    assert "too few for an interval, so no comparison" in last
    assert "outside" not in last and "inside" not in last
    assert f"{originals.ZLOSS.improvement_pct['z=0.01']:.1f}%" in last


def test_a_usage_cv_of_zero_gives_words_not_nan_or_inf():
    lines = noise.noise_verdicts(fake_study("noise", (42, 43), expert_usage_cv=0.0))
    cv_lines = [line for line in lines if "usage CV" in line]
    assert len(cv_lines) == 3 and all("both are 0 (perfectly even usage), so there is no ratio." in line for line in cv_lines)
    assert_clean("\n".join(lines))
    study = fake_study("noise", (42, 43))
    study.results["expert_usage_cv"] = 0.2 * (study.results.load_balancing_weight == 0)  # 0 with load balancing only
    one_zero = noise.noise_verdicts(study)
    assert all("ratio is unbounded" in line for line in one_zero if "usage CV" in line)


def test_nan_metrics_give_dashes_and_no_comparison():
    study = fake_study("noise", (42, 43), test_perplexity=float("nan"), expert_usage_cv=float("nan"),
                       training_time_minutes=float("nan"))
    table = noise.noise_condition_table(study)
    assert (table[["test PPL", "PPL 95% CI", "usage CV", "CV 95% CI", "time (min)"]] == "–").all().all()
    lines = noise.noise_verdicts(study)
    assert sum("no comparison" in line for line in lines) == 4 + 3
    assert_clean(text(table) + "\n" + "\n".join(lines))


def test_verdicts_take_the_originals_numbers_from_the_data():
    original = originals.ZLOSS.copy()
    try:
        originals.ZLOSS.loc["z=0.01", "improvement_pct"] = 9.9
        assert "9.9% lower test PPL" in zloss.zloss_verdicts(fake_study("zloss", (42, 43)))[-1]
    finally:
        originals.ZLOSS.loc[:, :] = original


def test_a_ci_that_includes_zero_is_inconclusive_with_signs_and_minimum_detectable_effect():
    from moe_lib.stats import minimum_detectable_effect

    study = fake_study("noise", (42, 43, 44))
    shift = {42: 1.0, 43: 3.0, 44: -1.0}  # noise 0.1 minus noise 0 per seed: the CI includes 0, 2 of 3 signs agree
    study.results["test_perplexity"] = [
        100.0 + (shift[s] if n == 0.1 else 0.0) for n, s in zip(study.results.noise_std, study.results.seed)
    ]
    lines = noise.noise_verdicts(study)
    assert not any("seed noise" in line for line in lines)
    line = next(l for l in lines if l.startswith("noise 0.1 vs 0 (lb 0.01)"))
    mde = minimum_detectable_effect(float(pd.Series(list(shift.values())).std()), 3)
    assert f"inconclusive at n = 3 (2/3 seeds point the same way; MDE {mde:.1f} PPL at 80% power)" in line, line


def _routing_study_with_entropy(per_layer):
    study = fake_study("routing", (42, 43))
    for layer, value in enumerate(per_layer):
        study.results[f"val_entropy_L{layer}"] = value
    return study


def test_routing_verdicts_compare_the_entropy_trend_with_depth_from_the_data():
    rising = routing.routing_verdicts(_routing_study_with_entropy([0.5, 0.9, 1.1, 1.2]))
    top1 = next(l for l in rising if l.startswith("Top-1 routing entropy per layer"))
    assert "rises with depth, lowest in layer 0" in top1 and "(falls with depth)" in top1 and "opposite" in top1
    falling = routing.routing_verdicts(_routing_study_with_entropy([1.2, 1.0, 0.9, 0.6]))
    top2 = next(l for l in falling if l.startswith("Top-2 routing entropy per layer"))
    assert "falls with depth, lowest in layer 3" in top2 and "the same trend" in top2
    # a rise then a fall is no trend: the gpu profile's 0.38 1.33 1.31 1.22 has a positive least-squares slope
    bent = routing.routing_verdicts(_routing_study_with_entropy([0.38, 1.33, 1.31, 1.22, 1.21, 1.13]))
    top1 = next(l for l in bent if l.startswith("Top-1 routing entropy per layer"))
    assert "(is not monotone in depth: lowest in layer 0, highest in layer 1)" in top1 and "rises" not in top1
    assert "our most confident layer is the first" in top1
    peak = routing.routing_verdicts(_routing_study_with_entropy([0.83, 0.90, 0.99, 0.87, 0.77, 0.78]))
    top2 = next(l for l in peak if l.startswith("Top-2 routing entropy per layer"))
    assert "lowest in layer 4, highest in layer 2" in top2 and top2.endswith("a different trend.")
    level = routing.routing_verdicts(_routing_study_with_entropy([1.0, 1.005, 0.998, 1.002]))
    assert "(is flat with depth, lowest in layer 2)" in next(l for l in level if l.startswith("Top-1 routing entropy"))
    original = originals.ROUTING.copy()
    try:  # the original's trend is read from its data, not typed
        originals.ROUTING.at["top-2", "routing_entropy_per_layer"] = (0.6, 0.7, 0.8, 0.9, 1.0)
        top2 = next(l for l in routing.routing_verdicts(_routing_study_with_entropy([1.2, 1.0, 0.9, 0.6]))
                    if l.startswith("Top-2 routing entropy per layer"))
        assert "(rises with depth): a different trend" in top2
    finally:
        originals.ROUTING.loc[:, :] = original


@pytest.mark.parametrize("name", ["routing", "noise", "zloss"])
def test_setup_comparison_puts_the_originals_data_next_to_ours_computed_from_the_grid(name):
    table = comparison.setup_comparison(name, SMOKE)
    assert list(table.columns) == ["original", "ours (smoke)"]
    assert list(table.index) == [*originals.SETUP_ROWS, "source"]
    assert table.loc["source", "original"] == originals.SETUP_SOURCES[name]
    grid = studies.build_grid(name, SMOKE)
    t = grid.runs[0].config.train
    assert f"= {t.steps * t.batch_size * t.seq_len:,} tokens" in table.loc["steps and tokens", f"ours (smoke)"]
    assert f"d_model {SMOKE.base.model.d_model}," in table.loc["model size", "ours (smoke)"]
    assert_clean(table.to_string())


def test_setup_comparison_reads_each_original_from_the_data_and_rejects_unknown_studies():
    assert "1 SwiGLU expert" in comparison.setup_comparison("routing", SMOKE).loc["shared expert", "original"]
    assert "summed over layers" in comparison.setup_comparison("noise", SMOKE).loc["auxiliary-loss reduction", "ours (smoke)"]
    noise = comparison.setup_comparison("noise", SMOKE).loc["router noise", "ours (smoke)"]
    assert noise == "noise_std 0, 0.1, 0.5"
    with pytest.raises(ValueError, match="unknown study 'capacity'.*valid choices"):
        comparison.setup_comparison("capacity", SMOKE)


@pytest.mark.parametrize("name", ["noise", "zloss"])
def test_setup_table_names_each_optimizers_parameters_and_the_originals_differences(name):
    """Ours: the optimizer row lists exactly optimizer_split's names (experts and router gate on Muon, as the
    original). The original: every difference from llm.py that the seeds' README records."""
    from moe_lib.moe.model import MoETransformer
    from moe_lib.training.optim import optimizer_split

    table = comparison.setup_comparison(name, SMOKE)
    ours, original = table["ours (smoke)"], table["original"]
    config = studies.build_grid(name, SMOKE).runs[0].config
    split = optimizer_split(MoETransformer(config.model), config.train)
    muon_part, adamw_part = ours["optimizer"].split("; AdamW (")
    for key, part in (("muon", muon_part), ("adamw, decay", adamw_part), ("adamw, no decay", adamw_part)):
        for parameter in split[key]:
            short = re.sub(r"^blocks\.\d+\.|\.weight$", "", parameter)
            assert short in part and (key == "muon") == (short in muon_part), (key, parameter)
    assert "ffn.experts.w_in, ffn.experts.w_out" in muon_part and "ffn.router" in muon_part and "embed" not in muon_part
    assert "router's gate" in original["optimizer"] and "every expert's two matrices" in original["optimizer"]
    assert "0.1 x Muon's lr" in original["optimizer"] and "no weight decay" in original["optimizer"]
    assert "SiLU" in original["experts"] and "not SwiGLU" in original["experts"] and "dropout 0.1" in original["experts"]
    assert "SwiGLU" in ours["experts"] and "no dropout" in ours["experts"]
    assert "micro-batches" in original["step counting"] and "only part of its curve" in original["step counting"]
    assert f"{config.train.steps:,} optimizer steps of {config.train.grad_accum_steps} micro-batch" in ours["step counting"]
    assert "per layer, summed over layers" in ours["z-loss reduction"]
    if name == "zloss":
        assert "averaged over layers" in original["z-loss reduction"] and "not per layer" in original["z-loss reduction"]
        assert ours["reported metric"].startswith("test_perplexity: the final model on the")
    else:
        assert "final validation" in original["reported metric"] and "eval_every 500 > 400 steps" in original["reported metric"]
        # the original's "best val" was its final validation: ours beside it is the final model's, the verdicts' metric is named
        assert ours["reported metric"].startswith("val_perplexity: the final model on the")
        assert "as the original's final validation" in ours["reported metric"]
        assert "the verdicts compare test_perplexity" in ours["reported metric"]


def test_setup_tables_compared_metric_is_the_one_the_comparison_uses():
    """comparison.COMPARED_METRIC, named in the setup table, is the column results_vs_original's noise comparison reads;
    the verdicts compare the course's one verdict metric, test perplexity, whatever the original reported."""
    import inspect

    from moe_lib.studies.verdicts import VERDICT_METRIC

    assert VERDICT_METRIC == "test_perplexity"
    for function in (noise.noise_verdicts, noise.noise_factorial_analysis, noise.noise_factorial_verdicts, noise.findings):
        assert inspect.signature(function).parameters["metric"].default == VERDICT_METRIC, function
    assert comparison.COMPARED_METRIC == {"routing": "test_loss", "noise": "val_perplexity", "zloss": "test_perplexity"}
    study = fake_study("noise", (42, 43, 44), val_perplexity=77.0, expert_usage_cv_pooled=0.2)
    assert (comparison.results_vs_original(study)[("final val PPL", "ours")] == "77.00 ± 0.00").all()
    table = noise.noise_condition_table(fake_study("noise", (42, 43, 44)))
    assert table["test PPL"].iloc[0] == "10.33 ± 0.58"  # test_perplexity 10 + seed % 2 over seeds 42, 43, 44


def test_scale_statement_computes_parameters_tokens_and_epochs():
    from moe_lib.moe.model import MoETransformer, count_parameters
    from moe_lib.training.loop import load_data

    text_ = comparison.scale_statement(SMOKE)
    counts = count_parameters(MoETransformer(SMOKE.base.model))
    t = SMOKE.base.train
    tokens = t.steps * t.batch_size * t.seq_len
    train = len(load_data(SMOKE.base.data).train)
    assert f"{counts.total:,} parameters" in text_ and f"{counts.active:,} active" in text_
    assert f"= {tokens:,} tokens" in text_
    assert f"{tokens / counts.total:.2f} tokens per parameter" in text_
    assert f"{tokens / train:.2f} epochs over the {train:,}-token training split" in text_


def test_scale_statement_of_a_study_describes_its_grids_model():
    """Notebook 02's grid has 4 experts where the profile has 8: its statement counts the grid's top-2 model."""
    from moe_lib.moe.model import MoETransformer, count_parameters

    cpu = get_profile("cpu")
    grid_model = next(run.config.model for run in studies.build_grid("routing", cpu).runs if run.condition == "top-2")
    assert (grid_model.num_experts, cpu.base.model.num_experts) == (4, 8)
    text_ = comparison.scale_statement(cpu, "routing")
    counts = count_parameters(MoETransformer(grid_model))
    assert text_.startswith(f"Profile cpu, routing_types grid's top-2 model (4 experts, top-2): {counts.total:,} parameters")
    assert f"{counts.active:,} active" in text_
    assert f"{count_parameters(MoETransformer(cpu.base.model)).total:,} parameters" not in text_


def _factorial_study(interaction: float) -> studies.StudyResult:
    """A noise study whose log PPL is additive in noise, lb and seed, plus ``interaction`` at (noise 0.5, lb 0)
    and a small seed x condition wobble, so the residual is not 0."""
    import math

    study = fake_study("noise", (42, 43, 44))
    r = study.results
    wobble = [0.004 * ((i * 7) % 5 - 2) for i in range(len(r))]
    log_ppl = (math.log(100) + 0.08 * (r.noise_std == 0.5) + 0.015 * (r.load_balancing_weight == 0.0) + 0.01 * (r.seed - 43)
               + interaction * ((r.noise_std == 0.5) & (r.load_balancing_weight == 0.0)) + wobble)
    r["test_perplexity"] = [math.exp(v) for v in log_ppl]
    return study


def test_noise_factorial_analysis_gives_anova_terms_and_effect_sizes():
    anova, contrasts = noise.noise_factorial_analysis(_factorial_study(0.0))
    assert {"noise_std", "load_balancing_weight", "noise_std:load_balancing_weight", "seed", "Residual"} <= set(anova.index)
    assert anova.loc["noise_std", "PR(>F)"] < 0.001
    main = contrasts.set_index(["effect", "level"])
    assert main.loc[("noise_std main effect", 0.5), "pct"] == pytest.approx(100 * (math.exp(0.08) - 1), abs=0.5)
    assert main.loc[("load_balancing_weight main effect", 0.0), "signs"] == "3/3 seeds"


def test_noise_factorial_verdicts_test_the_originals_limited_interaction_claim():
    additive = noise.noise_factorial_verdicts(_factorial_study(0.0))
    at_high = next(l for l in additive if l.startswith("Noise x lb interaction at noise 0.5"))
    assert "no evidence of an interaction" in at_high and "inconclusive at n = 3" in at_high
    assert any(l.startswith("Noise 0.5 vs 0, averaged over lb:") and "the CI excludes 0" in l for l in additive)
    strong = noise.noise_factorial_verdicts(_factorial_study(-0.2))
    at_high = next(l for l in strong if l.startswith("Noise x lb interaction at noise 0.5"))
    assert "the interaction survives Holm's correction over this notebook's 15 tests" in at_high
    assert "real here, against the original's claim" in at_high
    # p = 0.049 raw: its CI excludes 0, but Holm's correction over the 15 tests does not keep it, so it is not called real
    weak = noise.noise_factorial_verdicts(_factorial_study(-0.05))
    at_high = next(l for l in weak if l.startswith("Noise x lb interaction at noise 0.5"))
    assert "the CI excludes 0" in at_high and "but only uncorrected" in at_high and "a lead, not evidence" in at_high
    assert "real" not in at_high
    assert_clean("\n".join(additive + strong + weak))


def test_noise_verdict_family_holds_every_test_the_verdicts_make_once():
    """verdict_tests: the 7 seed-paired tests of noise_verdicts, the 3 ANOVA terms and the 5 contrasts shown (each
    interaction once), each p the test's own; verdict_family feeds them to family_table (Holm)."""
    from moe_lib.studies.verdicts import family_table

    study = _factorial_study(-0.05)
    tests = noise.verdict_tests(study)
    assert len(tests) == 15 and tests.index.is_unique
    assert sum(t.startswith("ANOVA") for t in tests.index) == 3 and sum("interaction" in t for t in tests.index) == 2
    paired = noise.paired_table(study, "test_perplexity", "noise=0.0, lb=0.0").loc["noise=0.5, lb=0.0"]
    assert tests.loc["noise 0.5 vs 0 (lb 0)", "p"] == pytest.approx(paired.p_value)
    anova, contrasts = noise.noise_factorial_analysis(study)
    assert tests.loc["ANOVA: noise x lb", "p"] == pytest.approx(anova.loc["noise_std:load_balancing_weight", "PR(>F)"])
    row = contrasts[contrasts.effect.str.startswith("noise_std x") & (contrasts.level == 0.5)].iloc[0]
    assert tests.loc["noise x lb interaction at noise 0.5", "p"] == pytest.approx(row.p_value)
    assert tests.loc["noise x lb interaction at noise 0.5", "verdict"] == "higher"
    table = family_table(noise.verdict_family(study))
    assert table.index.name == "15 tests"
    assert table.loc["noise x lb interaction at noise 0.5", "reading"] == "p < 0.05 only uncorrected"


def test_metric_changes_lists_the_verdicts_that_differ_between_two_metrics_of_the_same_runs():
    study = _factorial_study(0.0)
    r = study.results
    r["best_val_perplexity"] = r.test_perplexity * [1.0 + 0.3 * (n == 0.5 and lb == 0.0) for n, lb in zip(r.noise_std, r.load_balancing_weight)]
    changes = noise.metric_changes(study)
    assert list(changes.columns) == ["test_perplexity", "best_val_perplexity", "differs"]
    assert len(changes) == 15
    assert changes.loc["lb 0 vs 0.01 at noise 0.5", "differs"]  # +30% more at (0.5, lb 0) in best val only
    assert changes.loc["lb 0 vs 0.01 at noise 0.5", "best_val_perplexity"].endswith("(higher)")
    assert not changes.loc["lb 0 vs 0.01 at noise 0", "differs"]
    assert not noise.metric_changes(study, other="test_perplexity").differs.any()


def test_routing_verdicts_compare_learned_and_random_with_a_shared_expert():
    study = fake_study("routing", (42, 43, 44))
    r = study.results
    gap = {"top-2": 0.0, "top-2 random": 0.2, "top-2 + shared": 0.0, "top-2 random + shared": 0.05}
    r["test_loss"] = [2.0 + gap.get(c, 0.0) + 0.01 * s for c, s in zip(r.condition, r.seed)]
    line = next(l for l in routing.routing_verdicts(study) if l.startswith("With one shared expert"))
    assert "paired difference -0.050 nats" in line and "without it -0.200 nats" in line
    assert "shrinks learned routing's advantage by 0.150 nats" in line and "the CI excludes 0" in line
    # seeds that disagree: the shared expert shrinks the advantage on one seed and grows it on two
    shared_gap = {42: 0.0, 43: 0.3, 44: 0.25}
    r["test_loss"] = [2.0 + gap.get(c, 0.0) + (shared_gap[s] if c == "top-2 random + shared" else 0.0)
                      for c, s in zip(r.condition, r.seed)]
    line = next(l for l in routing.routing_verdicts(study) if l.startswith("With one shared expert"))
    assert "inconclusive at n = 3" in line and "2/3 seeds" in line and "grows learned routing's advantage" in line
    # a reversal: with the shared expert random routing wins on every seed
    r["test_loss"] = [2.0 + {"top-2 random": 0.2, "top-2 + shared": 0.05}.get(c, 0.0) + 0.001 * (s - 43) * (c == "top-2 + shared")
                      for c, s in zip(r.condition, r.seed)]
    line = next(l for l in routing.routing_verdicts(study) if l.startswith("With one shared expert"))
    assert "shrinks learned routing's advantage by 0.250 nats" in line and "random routing has the lower mean loss" in line


def _capacity_study(seeds=None) -> studies.StudyResult:
    """lb 0.01 drops a quarter as much as lb 0 at every cf; PPL +2 off dropless, seeds pull lb 0.01 and 0 apart."""
    grid = studies.build_grid("capacity", SMOKE, seeds=seeds)
    rows = []
    for run in grid.runs:
        cf, lb = run.config.model.capacity_factor, run.config.model.load_balancing_weight
        rows.append({"run_id": run.run_id, "condition": run.condition, **run.factors, "seed": run.seed,
                     "train_dropped_fraction": 0.0 if cf is None else (0.1 if lb else 0.4) / cf + 0.01 * (run.seed - 43),
                     "test_perplexity": 100 + (0 if cf is None else 2) + 0.5 * (run.seed - 43) * (1 if lb else -1), "ms_per_step": 200.0})
    return studies.StudyResult(grid, SMOKE, pd.DataFrame(rows), None, None)


def test_capacity_verdicts_pair_lb_on_and_off_by_seed_at_each_capacity_factor():
    lines = capacity.capacity_verdicts(_capacity_study((42, 43, 44)))
    drops = next(l for l in lines if l.startswith("cf=1.0, lb 0.01 vs 0: dropped slots"))
    assert "40.0 without load balancing vs 10.0 with it" in drops and "the CI excludes 0" in drops
    ppl = next(l for l in lines if l.startswith("cf=1.0, lb 0.01 vs 0: test PPL"))
    assert "inconclusive at n = 3" in ppl
    assert any(l.startswith("lb=0.01, cf=1.0 vs dropless: test PPL 102.00 vs 100.00") for l in lines)
    assert len([l for l in lines if "must drop" in l]) == 0  # no cf < 1 in the sweep: nothing is forced to drop
    assert "lb=0.01: every finite capacity factor in the sweep drops 1% of slots or more (seed mean); the fewest, 8.0%, at cf=1.25." in lines
    loose = capacity.capacity_verdicts(_capacity_study((42, 43, 44)), threshold=0.09)
    assert "lb=0.01: the smallest capacity factor in the sweep that drops fewer than 9% of slots (seed mean) is cf=1.25." in loose
    dropless = next(l for l in lines if l.startswith("cf=dropless, lb 0.01 vs 0: test PPL"))
    assert "100.00 without load balancing vs 100.00 with it" in dropless and "inconclusive at n = 3" in dropless
    assert not any(l.startswith("cf=dropless, lb 0.01 vs 0: dropped") for l in lines)  # dropless drops nothing
    # analysed as the 3 x 2 factorial it is: +2 PPL off dropless at every lb is a capacity main effect, no interaction
    anova = {l.split(":")[0]: l for l in lines if l.startswith("ANOVA")}
    assert set(anova) == {f"ANOVA on log test_perplexity, {t}" for t in ("capacity factor", "load_balancing_weight", "capacity factor x load_balancing_weight")}
    assert "p < 0.001" in anova["ANOVA on log test_perplexity, capacity factor"]
    one_seed = capacity.capacity_verdicts(_capacity_study((42,)), seed_std=1.0)
    assert any("too few seeds for an interval" in l for l in one_seed)
    assert any("2 seed-std (2.00 PPL)" in l for l in one_seed)
    assert_clean("\n".join(lines + one_seed).replace("Time per step", ""))


@pytest.mark.parametrize("name, original, metric", [
    ("routing", originals.ROUTING, ("test loss", "original")),
    ("noise", originals.NOISE, ("final val PPL", "original")),
    ("zloss", originals.ZLOSS, ("test PPL", "original")),
])
def test_results_vs_original_puts_the_reported_numbers_beside_ours(name, original, metric):
    study = fake_study(name, (42, 43, 44), expert_usage_cv_pooled=0.2, val_entropy_L0=1.2, val_entropy_L1=1.0)
    table = comparison.results_vs_original(study)
    assert len(table) == len(original)  # one row per condition the original reported
    assert (table[("seeds", "ours")] == 3).all()
    assert metric in table.columns and (metric[0], "ours") in table.columns
    first = table.iloc[0]
    if name == "routing":
        assert first[("test loss", "original")] == "2.46" and first[("routing entropy per layer", "ours")] == "1.20 1.00"
    if name == "noise":
        assert first[("final val PPL", "original")] == "130.23 ± 0.94" and first[("final val PPL", "ours")] == "51.00 ± 1.00" and first[("pooled usage CV", "ours")] == "0.2000 ± 0.0000"
    if name == "zloss":
        assert table.loc["z=0.01", ("improvement vs baseline", "original")] == "+5.7%"
        assert table.loc["baseline", ("improvement vs baseline", "ours")] == "–"
    assert_clean(table.to_string())
    with pytest.raises(ValueError, match="valid studies"):
        comparison.results_vs_original(fake_study("capacity", (42,)))


def test_zloss_verdicts_read_the_entropy_change_seed_paired():
    study = fake_study("zloss", (42, 43, 44))
    r = study.results
    r["router_entropy"] = [1.0 + 0.01 * (s - 43) + {"z=0.01": 0.1, "z=0.001": -0.1}.get(c, 0.0) for c, s in zip(r.condition, r.seed)]
    lines = zloss.zloss_verdicts(study)
    assert any(l.startswith("z=0.01: routing entropy +0.100 nats") and "less confident routing" in l for l in lines)
    assert any(l.startswith("z=0.001: routing entropy -0.100 nats") and "more confident routing, as the original claimed" in l for l in lines)
    assert any(l.startswith("z=0.001, no noise: routing entropy +0.000 nats") and "inconclusive" in l for l in lines)
    assert_clean("\n".join(lines))


def test_verdicts_name_the_runs_that_overfit_and_stay_silent_otherwise():
    """A results row flagged ``overfit`` (validation rose above its best by more than the margin)
    adds one line naming its condition; rows without the flag, or stored before it existed, add none."""
    from moe_lib.studies.verdicts import overfit_lines

    base = pd.DataFrame({"condition": ["a", "a", "b"], "seed": [1, 2, 1]})
    assert overfit_lines(base) == []  # stored before the column existed
    flagged = base.assign(overfit=[False, True, "True"], val_loss_rise_from_best=[0.0, 0.62, 0.3])
    (line,) = overfit_lines(flagged)
    assert line.startswith("Overfitting: 2 of 3 runs") and "a (1), b (1)" in line and "up to 0.62 nats" in line
    assert overfit_lines(base.assign(overfit=[False, "False", float("nan")], val_loss_rise_from_best=0.0)) == []
