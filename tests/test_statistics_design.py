"""Design-aware statistics: the t error bar, sign consistency, the minimum detectable effect and
the factorial analysis, each checked against a hand computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from moe_lib.stats import (
    factorial_anova,
    factorial_contrasts,
    mean_ci,
    minimum_detectable_effect,
    sign_consistency,
    t_errorbar,
)


def test_t_errorbar_is_the_tables_t_interval_not_a_bootstrap():
    low, high = t_errorbar()([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd 1, n 3
    assert low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert low < 1.0 and high > 3.0  # reaches beyond the seeds, which a bootstrap of 3 values never does
    assert t_errorbar()([5.0]) == (5.0, 5.0)  # one seed: no bar
    assert (low, high) == mean_ci([1.0, 2.0, 3.0])[3:]


def test_sign_consistency_counts_the_seeds_that_agree_with_the_mean():
    assert sign_consistency([1.0, 2.0, -1.0]) == (2, 3)
    assert sign_consistency([-0.5, -0.1, -2.0]) == (3, 3)
    assert sign_consistency([0.0, 0.0]) == (0, 2)
    assert sign_consistency([1.0, float("nan")]) == (1, 1)
    assert sign_consistency([]) == (0, 0)


def test_sign_consistency_counts_the_seeds_that_favour_a_named_side():
    # "lower in k/n seeds" (notebook 08) and "k/n seeds point the same way" are one count with a side
    differences = [1.0, 2.0, -1.0, 0.0]
    assert sign_consistency(differences, favours="lower") == (1, 4)
    assert sign_consistency(differences, favours="higher") == (2, 4)
    assert sign_consistency(differences, favours="mean") == (2, 4)
    with pytest.raises(ValueError, match="favours='better'.*'mean', 'lower', 'higher'"):
        sign_consistency(differences, favours="better")


def test_minimum_detectable_effect_solves_the_paired_t_power_equation():
    n, sd = 3, 2.0
    crit = stats.t.ppf(0.975, n - 1)

    def power(d):  # two-sided paired t-test, noncentrality d sqrt(n)
        nc = d * math.sqrt(n)
        return stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)

    d = optimize.brentq(lambda d: power(d) - 0.8, 0.1, 20)
    assert minimum_detectable_effect(sd, n) == pytest.approx(d * sd, rel=1e-4)
    assert minimum_detectable_effect(sd, 10) < minimum_detectable_effect(sd, 3)  # more seeds, smaller effects
    assert math.isnan(minimum_detectable_effect(sd, 1)) and math.isnan(minimum_detectable_effect(float("nan"), 3))


def factorial_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for a, b, s in itertools.product((0.0, 0.1, 0.5), (0.01, 0.0), (42, 43, 44)):
        log_ppl = 4.0 + {0.0: 0, 0.1: 0.01, 0.5: 0.08}[a] + (0.02 if b == 0 else 0) + 0.01 * (s - 43) + rng.normal(0, 0.01)
        rows.append({"noise": a, "lb": b, "seed": s, "ppl": math.exp(log_ppl)})
    return pd.DataFrame(rows)


def test_factorial_anova_matches_the_balanced_sums_of_squares_by_hand():
    df = factorial_frame()
    y = np.log(df.ppl)
    grand = y.mean()
    ma, mb = y.groupby(df.noise).mean(), y.groupby(df.lb).mean()
    mab = y.groupby([df.noise, df.lb]).mean()
    ss_a = 6 * ((ma - grand) ** 2).sum()  # 2 lb levels x 3 seeds per noise level
    ss_b = 9 * ((mb - grand) ** 2).sum()
    ss_ab = 3 * sum((mab[(a, b)] - ma[a] - mb[b] + grand) ** 2 for a, b in mab.index)
    table = factorial_anova(df, "ppl", ["noise", "lb"], block="seed")
    assert table.loc["noise", "sum_sq"] == pytest.approx(ss_a)
    assert table.loc["lb", "sum_sq"] == pytest.approx(ss_b)
    assert table.loc["noise:lb", "sum_sq"] == pytest.approx(ss_ab)
    assert table.loc["Residual", "df"] == 18 - 1 - 2 - 1 - 2 - 2  # 18 runs minus grand mean, effects and block
    resid = table.loc["Residual", "sum_sq"]
    assert table.loc["noise", "partial_eta_sq"] == pytest.approx(ss_a / (ss_a + resid))
    assert table.loc["noise", "PR(>F)"] < 0.01  # the planted noise effect (8%) is far above the residual (1%)


def test_factorial_contrasts_are_per_seed_differences_with_the_t_interval():
    df = factorial_frame()
    out = factorial_contrasts(df, "ppl", "noise", "lb", baseline=0.0).set_index(["effect", "level"])
    y = df.assign(y=np.log(df.ppl)).pivot_table(index="seed", columns=["noise", "lb"], values="y")
    main = ((y[(0.5, 0.01)] - y[(0.0, 0.01)]) + (y[(0.5, 0.0)] - y[(0.0, 0.0)])) / 2
    row = out.loc[("noise main effect", 0.5)]
    mean, _, n, low, high = mean_ci(main)
    assert (row["mean"], row.ci_low, row.ci_high, row.n) == pytest.approx((mean, low, high, n))
    assert row.pct == pytest.approx(100 * (math.exp(mean) - 1))
    inter = (y[(0.5, 0.01)] - y[(0.0, 0.01)]) - (y[(0.5, 0.0)] - y[(0.0, 0.0)])
    row = out.loc[("noise x lb interaction (lb 0.01 minus 0.0)", 0.5)]
    assert row["mean"] == pytest.approx(inter.mean()) and row.signs == "{}/{} seeds".format(*sign_consistency(inter))
    with pytest.raises(ValueError, match="valid levels"):
        factorial_contrasts(df, "ppl", "noise", "lb", baseline=0.3)
    with pytest.raises(ValueError, match="unknown column"):
        factorial_anova(df, "ppl", ["noise", "nope"])
