"""results/gpu/README.md's prose numbers, recomputed from the stored CSVs (none typed by hand)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from moe_lib.studies import comparison, noise
from moe_lib.profiles import get_profile
from moe_lib.stats import mean_ci, paired_comparison
from moe_lib.studies import StudyResult, build_grid

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "results" / "gpu"
README = (GPU / "README.md").read_text()


def _cv_ratios(profile: str) -> list[float]:
    r = pd.read_csv(ROOT / "results" / profile / "noise_factorial.csv")
    cv = r.groupby(["noise_std", "load_balancing_weight"])["expert_usage_cv"].mean()
    return [cv[(n, 0.0)] / cv[(n, 0.01)] for n in (0.0, 0.1, 0.5)]


def test_cv_ratios_quoted_for_both_profiles():
    for profile in ("gpu", "cpu"):
        ratios = _cv_ratios(profile)
        assert f"{min(ratios):.1f}-{max(ratios):.1f}x" in README


def test_shared_expert_effect_on_learned_and_random_routing():
    r = pd.read_csv(GPU / "routing_types.csv")
    loss = {c: r[r.condition == c].set_index("seed")["test_loss"] for c in r.condition.unique()}
    for shared, plain in (("top-2 + shared", "top-2"), ("top-2 random + shared", "top-2 random")):
        mean, _, _, low, high = mean_ci((loss[shared] - loss[plain]).to_numpy())
        assert f"{mean:+.3f} nats (95% CI [{low:+.3f}, {high:+.3f}]" in README


def test_holm_over_the_noise_verdicts_fifteen_tests():
    profile = get_profile("gpu", corpus="shakespeare")
    grid = build_grid("noise", profile)
    r = pd.read_csv(GPU / "noise_factorial.csv")
    study = StudyResult(grid, profile, r, pd.DataFrame(), GPU / "noise_factorial.csv")
    p = []
    for lb in (0.01, 0.0):
        pc = paired_comparison(r, f"noise=0.0, lb={lb}", "best_val_perplexity").set_index("condition")
        p += [pc.loc[f"noise={n}, lb={lb}", "p_value"] for n in (0.1, 0.5)]
    for n in (0.0, 0.1, 0.5):
        p.append(paired_comparison(r, f"noise={n}, lb=0.01", "best_val_perplexity").set_index("condition").loc[f"noise={n}, lb=0.0", "p_value"])
    anova, contrasts = noise.noise_factorial_analysis(study, metric="best_val_perplexity")  # the metric of this README section
    terms = list(anova.index.drop(["Residual", "seed"]))
    p += [anova.loc[t, "PR(>F)"] for t in terms]
    shown = contrasts[contrasts.effect.str.endswith("main effect") | contrasts.effect.str.startswith("noise_std x")]
    se = (shown.ci_high - shown.ci_low) / 2 / stats.t.ppf(0.975, shown.n - 1)
    p += list(2 * stats.t.sf(np.abs(shown["mean"]) / se, shown.n - 1))
    assert len(p) == 15 and "15 tests" in README
    reject, adjusted, _, _ = multipletests(p, method="holm")
    survivors = [i for i, kept in enumerate(reject) if kept]
    assert survivors == [7 + terms.index("load_balancing_weight")]  # the ANOVA's lb term, alone
    assert f"adjusted p = {adjusted[survivors[0]]:.3f}" in README


def test_epochs_over_the_embedded_corpus():
    statement = comparison.scale_statement(get_profile("gpu", corpus="shakespeare"))
    epochs = float(statement.split(" epochs over")[0].rsplit(" ", 1)[1])
    assert f"pass over it {epochs:.1f} times" in README
