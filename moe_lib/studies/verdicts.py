"""The one language of the course's verdicts: how a difference, its 95% CI and its seeds are put in words.

Every study's verdicts are built from these phrases. A comparison claims a winner only when its
95% confidence interval excludes 0; otherwise it says "inconclusive at n = N", with how many
seeds point the same way (:func:`~moe_lib.stats.sign_consistency`) and the smallest effect
those seeds would detect with 80% power (the MDE), never "no effect".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ..metrics import OVERFIT_MARGIN_NATS
from ..stats import holm_adjusted, mean_ci, minimum_detectable_effect, sign_consistency

__all__ = [
    "VERDICT_METRIC", "anova_lines", "ci_side", "family_table", "overfit_lines", "ci_text", "contrast_mde_pct", "contrast_text", "inconclusive", "inconclusive_text", "interval_cell",
    "interval_text", "lower_is_better_phrase", "p_text", "seed_interval", "seeds_text", "sign_consistency", "significance",
    "interval_side", "change_text", "scale_sentence",
]

# The course's one verdict metric (notebook 01, "How to read the studies"): the final model's perplexity on the
# whole test split. Every study's verdicts, tables and findings compare it (notebook 02 states its differences in
# test loss, ln of it, in nats, as its original did); the metric each original reported is compared with it
# separately, in comparison.COMPARED_METRIC.
VERDICT_METRIC = "test_perplexity"


def seeds_text(k: int, n: int) -> str:
    """``"3/3 seeds"``: k of n seeds (a :func:`~moe_lib.stats.sign_consistency` count)."""
    return f"{k}/{n} seeds"


def ci_text(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    """``"95% CI [-0.12, +0.03]"``, or why there is none (fewer than 2 seeds)."""
    if pd.isna(low) or pd.isna(high):
        return "no 95% CI (fewer than 2 seeds)"
    return f"95% CI [{low:+.{digits}f}{unit}, {high:+.{digits}f}{unit}]"


def interval_cell(low: float, high: float, digits: int, unit: str = "", sign: str = "") -> str:
    """``"[94.15, 106.85]"`` for a table cell, ``"–"`` when there is no interval (one seed)."""
    if pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{low:{sign}.{digits}f}{unit}, {high:{sign}.{digits}f}{unit}]"


def p_text(p: float) -> str:
    """``"0.023"``, or ``"–"`` when the paired t-test has no value (fewer than 2 pairs, or no spread in the differences)."""
    return "–" if pd.isna(p) else f"{p:.3f}"


def ci_side(comparison: pd.Series) -> str:
    """``"lower"``, ``"higher"`` or ``"inconclusive"``: where a :func:`~moe_lib.stats.paired_comparison` row's
    95% CI of the difference lies against 0 (no interval, one pair: inconclusive)."""
    if comparison.difference_ci_high < 0:
        return "lower"
    if comparison.difference_ci_low > 0:
        return "higher"
    return "inconclusive"


def inconclusive_text(n: int, signs: str, mde: float, digits: int = 2, unit: str = "") -> str:
    """``"inconclusive at n = 3 (3/3 seeds point the same way; MDE 2.1 PPL at 80% power)"``: the one
    phrase for a CI that includes 0, with the sign count ``signs`` and the 80%-power MDE (NaN: too few seeds)."""
    mde_text = f"MDE {mde:.{digits}f}{unit} at 80% power" if np.isfinite(mde) else "too few seeds for an MDE"
    return f"inconclusive at n = {n} ({signs} point the same way; {mde_text})"


def inconclusive(differences, digits: int = 2, unit: str = "") -> str:
    """:func:`inconclusive_text` of per-seed paired ``differences``.

    MDE: the smallest true mean difference a paired t-test on these n seeds would detect with 80%
    power at the observed paired SD (:func:`~moe_lib.stats.minimum_detectable_effect`).
    """
    if differences is None:
        return "inconclusive"
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    mde = minimum_detectable_effect(float(d.std(ddof=1)) if n >= 2 else float("nan"), n)
    return inconclusive_text(n, seeds_text(*sign_consistency(d)), mde, digits, unit)


def significance(low: float, high: float, differences=None, digits: int = 2, unit: str = "") -> str:
    """Whether the CI excludes 0; if not, "inconclusive at n = N" with sign consistency and MDE of ``differences``."""
    if pd.isna(low) or pd.isna(high):
        return "too few seeds for an interval"
    return "the CI excludes 0" if low > 0 or high < 0 else f"the CI includes 0: {inconclusive(differences, digits, unit)}"


def lower_is_better_phrase(subject: str, difference: float, low: float, high: float, differences=None, digits: int = 3, unit: str = " nats") -> str:
    """``subject`` vs its baseline for a lower-is-better metric, claiming a winner only when the CI excludes 0."""
    if pd.isna(low) or pd.isna(high):
        return f"{subject} has the {'lower' if difference < 0 else 'higher'} mean ({significance(low, high)})"
    if high < 0:
        return f"{subject} is better (the CI excludes 0)"
    if low > 0:
        return f"{subject} is worse (the CI excludes 0)"
    return f"{subject} has the {'lower' if difference < 0 else 'higher'} mean, but the CI includes 0: {inconclusive(differences, digits, unit)}"


def contrast_mde_pct(row: pd.Series, confidence: float = 0.95) -> float:
    """The MDE (80% power) of a contrast in %, from the per-seed SD its t interval implies:
    ``sd = (high - low) / 2 * sqrt(n) / t_{(1+confidence)/2, n-1}`` on the log scale."""
    if row.n < 2 or pd.isna(row.ci_low):
        return float("nan")
    sd = (row.ci_high - row.ci_low) / 2 * np.sqrt(row.n) / stats.t.ppf((1 + confidence) / 2, row.n - 1)
    return 100 * (np.exp(minimum_detectable_effect(float(sd), int(row.n))) - 1)


def contrast_text(row: pd.Series) -> str:
    """``+8.1% (95% CI [+2.0%, +14.6%], 3/3 seeds)`` and what the interval says."""
    head = f"{row.pct:+.1f}% ({ci_text(row.pct_ci_low, row.pct_ci_high, 1, '%')}, {row.signs})"
    if pd.isna(row.ci_low):
        return f"{head}: too few seeds for an interval"
    if row.ci_low > 0 or row.ci_high < 0:
        return f"{head}: the CI excludes 0"
    return f"{head}: the CI includes 0: {inconclusive_text(int(row.n), row.signs, contrast_mde_pct(row), 1, '%')}"


def anova_lines(anova: pd.DataFrame, metric: str) -> list[str]:
    """One sentence per main effect and interaction of a :func:`~moe_lib.stats.factorial_anova` table."""
    lines = []
    for term in anova.index.drop(["Residual", "seed"], errors="ignore"):
        row = anova.loc[term]
        p = "–" if pd.isna(row["PR(>F)"]) else "< 0.001" if row["PR(>F)"] < 0.001 else f"= {row['PR(>F)']:.3f}"
        lines.append(f"ANOVA on log {metric}, {term.replace(':', ' x ')}: F = {row.F:.2f}, p {p}, partial eta squared {row.partial_eta_sq:.2f}.")
    return lines


def interval_text(mean: float, low: float, high: float, digits: int = 4) -> str:
    """``"0.0123 [0.0100, 0.0146]"``: a mean and its 95% interval, the mean alone when there is none."""
    if pd.isna(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def seed_interval(values: pd.Series, digits: int = 4) -> str:
    """Seed mean with its 95% t-interval, as "mean [low, high]"."""
    mean, _, _, low, high = mean_ci(values)
    return interval_text(mean, low, high, digits)


def flagged_overfit(results: pd.DataFrame) -> pd.Series:
    """Per row, whether the run was flagged ``overfit`` (False where the column is missing or empty:
    rows stored before the flag existed)."""
    if "overfit" not in results:
        return pd.Series(False, index=results.index)
    values = results["overfit"].replace({"True": 1, "False": 0, True: 1, False: 0})
    return pd.to_numeric(values, errors="coerce").fillna(0) > 0


def overfit_lines(results: pd.DataFrame) -> list[str]:
    """One line naming the runs whose validation loss rose more than
    :data:`~moe_lib.metrics.OVERFIT_MARGIN_NATS` above its best (``overfit`` in their row), or
    none: the final-model numbers of those runs measure overfitting as well as the factor studied."""
    flagged = results[flagged_overfit(results)]
    if flagged.empty:
        return []
    worst = pd.to_numeric(flagged["val_loss_rise_from_best"], errors="coerce").max()
    names = ", ".join(f"{c} ({n})" for c, n in flagged.groupby("condition", sort=False).size().items())
    return [
        f"Overfitting: {len(flagged)} of {len(results)} runs ended with a validation loss more than "
        f"{OVERFIT_MARGIN_NATS:g} nats above their best (up to {worst:.2f} nats): {names}. Their final-model "
        "numbers measure overfitting as well as the factor studied."
    ]


def family_table(tests, alpha: float = 0.05) -> pd.DataFrame:
    """A notebook's family of verdict tests, ``[(label, p), ...]``, with each p raw and Holm-corrected
    (:func:`~moe_lib.stats.holm_adjusted`) and what each says at level ``alpha``: significant after the
    correction, only without it, or not at all. Printed with ``.to_string()``."""
    labels = [label for label, _ in tests]
    raw = np.array([p for _, p in tests], dtype=float)
    adjusted = holm_adjusted(raw)

    def reading(p: float, q: float) -> str:
        if pd.isna(p):
            return "no test (too few seeds)"
        return "significant after correction" if q < alpha else f"p < {alpha:g} only uncorrected" if p < alpha else "not significant"

    return pd.DataFrame({"p": [p_text(p) for p in raw], "Holm p": [p_text(q) for q in adjusted],
                         "reading": [reading(p, q) for p, q in zip(raw, adjusted)]},
                        index=pd.Index(labels, name=f"{len(tests)} tests"))


# --------------------------------------------------------------------------- plain findings ("What we found")
def holm_sentence(families: dict[str, list[tuple[str, float]]], alpha: float = 0.05) -> str:
    """One plain sentence on a notebook's family of tests at each scale: how many of its tests stay significant after
    Holm's correction (:func:`family_table`), which ones, and how many more pass only uncorrected. ``families`` maps a
    scale (``"cpu"``) to its ``[(label, p), ...]``."""
    parts = []
    for scale, tests in families.items():
        table = family_table(tests, alpha)
        kept = list(table.index[table.reading == "significant after correction"])
        leads = int((table.reading == f"p < {alpha:g} only uncorrected").sum())
        parts.append(f"{scale} {len(kept)} of {len(tests)}" + (f" ({'; '.join(kept)})" if kept else "")
                     + (f", {leads} more only uncorrected" if leads else ""))
    return ("After Holm's correction over this notebook's tests, significant: " + "; ".join(parts)
            + "; a CI that excludes 0 but does not survive the correction is a lead to test with more seeds, not a finding.")


def interval_side(low: float, high: float) -> str:
    """``"higher"`` or ``"lower"`` when a difference's 95% CI lies above or below 0, else ``"inconclusive"`` (no interval included)."""
    if pd.isna(low) or pd.isna(high) or low <= 0 <= high:
        return "inconclusive"
    return "higher" if low > 0 else "lower"


def change_text(pct: float, low: float, high: float, n: int, unit: str = "%") -> str:
    """``"+6.6% (95% CI [+4.0%, +9.2%]: the CI excludes 0)"``, or ``"... inconclusive at n = 3)"``: a % change (or a
    change in another ``unit``, e.g. ``" points"``) in a findings sentence."""
    verdict = "too few seeds for an interval" if pd.isna(low) or pd.isna(high) else (
        f"inconclusive at n = {n}" if interval_side(low, high) == "inconclusive" else "the CI excludes 0")
    return f"{pct:+.1f}{unit} ({ci_text(low, high, 1, unit)}: {verdict})"


def scale_sentence(sides: dict[str, tuple[str, str]], small: str, large: str) -> str:
    """What changes with scale: ``sides`` maps an effect to its :func:`interval_side` at the ``small`` and the ``large`` profile."""
    changed = [f"{effect} from {a} to {b}" for effect, (a, b) in sides.items() if a != b]
    kept = [f"{effect} ({a})" for effect, (a, b) in sides.items() if a == b]
    if not changed:
        return f"What changes with scale: nothing among these verdicts; each has the same side at the {small} and {large} profiles: {', '.join(kept)}."
    tail = f"; unchanged: {', '.join(kept)}" if kept else ""
    return f"What changes with scale, from the {small} to the {large} profile: {'; '.join(changed)}{tail}."
