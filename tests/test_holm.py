"""Holm's correction of a notebook's family of verdict tests: moe_lib.stats.holm_adjusted and
moe_lib.studies.verdicts.family_table, checked against the step-down rule worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pandas as pd
from scipy import stats

from moe_lib.stats import factorial_contrasts, holm_adjusted, one_sample_p
from moe_lib.studies.verdicts import family_table


def test_holm_multiplies_the_ith_smallest_p_by_m_minus_i_and_keeps_the_order():
    # sorted 0.01, 0.03, 0.04, 0.5 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08 -> 0.09 (non-decreasing), 0.5
    adjusted = holm_adjusted([0.04, 0.5, 0.01, 0.03])
    np.testing.assert_allclose(adjusted, [0.09, 0.5, 0.04, 0.09])
    np.testing.assert_allclose(holm_adjusted([0.3, 0.4]), [0.6, 0.6])  # capped order: 0.3 x 2, then max(0.4, 0.6)
    assert holm_adjusted([0.9, 0.8])[0] == 1.0  # capped at 1


def test_holm_leaves_missing_p_values_out_of_the_family():
    adjusted = holm_adjusted([0.01, float("nan"), 0.04])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.02, 0.04])  # m = 2, not 3


def test_family_table_shows_raw_and_corrected_p_and_what_each_says():
    tests = [("A vs B", 0.03)] + [(f"test {i}", 0.5) for i in range(14)] + [("too few seeds", float("nan"))]
    table = family_table(tests)
    assert table.index.name == "16 tests" and list(table.columns) == ["p", "Holm p", "reading"]
    assert table.loc["A vs B"].tolist() == ["0.030", "0.450", "p < 0.05 only uncorrected"]  # 0.03 x 15 tests
    assert table.loc["test 0"].tolist() == ["0.500", "1.000", "not significant"]
    assert table.loc["too few seeds"].tolist() == ["–", "–", "no test (too few seeds)"]
    strong = family_table([("strong", 0.001), ("weak", 0.2)])
    assert strong.loc["strong"].tolist() == ["0.001", "0.002", "significant after correction"]


def test_one_sample_p_is_the_paired_t_test_and_nan_without_a_test():
    treatment, baseline = np.array([3.0, 5.0, 4.5]), np.array([2.0, 2.5, 4.0])
    assert one_sample_p(treatment - baseline) == stats.ttest_rel(treatment, baseline).pvalue
    assert math.isnan(one_sample_p([0.5])) and math.isnan(one_sample_p([0.2, 0.2, 0.2]))
    assert one_sample_p([0.1, float("nan"), 0.3, 0.2]) == stats.ttest_1samp([0.1, 0.3, 0.2], 0.0).pvalue  # NaN dropped


def test_factorial_contrasts_carry_the_p_of_each_per_seed_contrast():
    """The interaction contrast (a - b at level 1 minus the same at level 0) per seed, tested against 0."""
    effect = {42: 0.10, 43: 0.30, 44: 0.25}
    rows = [{"seed": s, "f": f, "g": g, "y": math.exp(0.5 * f + 0.2 * g + effect[s] * f * g + 0.01 * s)}
            for s in effect for f in (0, 1) for g in (0, 1)]
    contrasts = factorial_contrasts(pd.DataFrame(rows), "y", "f", "g", baseline=0).set_index("effect")
    interaction = contrasts.loc["f x g interaction (g 0 minus 1)"]
    assert interaction.p_value == pytest.approx(one_sample_p([-v for v in effect.values()]), rel=1e-9)
    assert 0 < contrasts.loc["f main effect"].p_value < 1


def test_holm_sentence_counts_survivors_and_uncorrected_leads_at_each_scale():
    from moe_lib.studies.verdicts import holm_sentence

    # Holm over 3: 0.001 * 3 = 0.003 (kept), 0.03 * 2 = 0.06 (only uncorrected), 0.5 (not significant)
    cpu = [("strong", 0.001), ("lead", 0.03), ("nothing", 0.5)]
    gpu = [("strong", 0.2), ("lead", 0.3), ("nothing", 0.5)]
    text = holm_sentence({"cpu": cpu, "gpu": gpu})
    assert text.startswith("After Holm's correction over this notebook's tests, significant: "
                           "cpu 1 of 3 (strong), 1 more only uncorrected; gpu 0 of 3; ")
