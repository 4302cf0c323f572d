"""Statistics over a results table (one row per run): pure functions of a DataFrame.

* :func:`mean_ci` - mean, std (ddof=1) and a Student-t confidence interval of the mean;
* :func:`summarize` / :func:`summary_table` - those per condition, and as "mean ± std" text;
* :func:`paired_differences` / :func:`paired_comparison` - seed-paired differences against a
  baseline condition, with their t interval and a paired t-test (``scipy.stats.ttest_rel``).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

# What summarize() reports when no metrics are named (those present in the table).
DEFAULT_SUMMARY_METRICS = (
    "best_val_perplexity",
    "val_perplexity",
    "val_loss",
    "val_accuracy",
    "test_perplexity",
    "test_top3_accuracy",
    "expert_usage_cv",
    "router_entropy",
    "training_time_minutes",
    "ms_per_step",
    "peak_memory_gb",
)

def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, int, float, float]:
    """``(mean, std, n, ci_low, ci_high)`` of the non-NaN values.

    std uses ddof=1; the interval is ``mean +- t_{(1+confidence)/2, n-1} * std / sqrt(n)``
    (Student's t); std and the interval are NaN when n < 2.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return mean, float("nan"), n, float("nan"), float("nan")
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, n, mean - half, mean + half


def factor_columns(df: pd.DataFrame) -> list[str]:
    """The factor columns of a results table: those between ``condition`` and ``seed``."""
    cols = list(df.columns)
    if "condition" in cols and "seed" in cols and cols.index("condition") < cols.index("seed"):
        return cols[cols.index("condition") + 1 : cols.index("seed")]
    return []


def capacity_label(cf: float | None) -> str:
    """``"0.5"``, ``"1.25"``, ... or ``"dropless"`` for a capacity factor of None (NaN once read back from a CSV)."""
    return "dropless" if cf is None or (isinstance(cf, float) and math.isnan(cf)) else str(float(cf))


def _as_list(by: str | Sequence[str]) -> list[str]:
    return [by] if isinstance(by, str) else list(by)


def _check_columns(df: pd.DataFrame, names: Iterable[str], what: str) -> None:
    for name in names:
        if name not in df.columns:
            numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])] if what == "metric" else list(df.columns)
            raise ValueError(f"unknown {what} {name!r}: valid choices are {numeric}")


_STATS = ("mean", "std", "n", "ci_low", "ci_high")  # the order mean_ci returns them in


def summarize(
    df: pd.DataFrame,
    by: str | Sequence[str] = "condition",
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """One row per group (first-appearance order, i.e. grid order), wide format.

    Columns: the ``by`` columns, the factor columns that are constant within every group,
    then for each metric ``<m>_mean``, ``<m>_std`` (ddof=1), ``<m>_n`` (non-NaN runs),
    ``<m>_ci_low``, ``<m>_ci_high`` (Student-t interval, see :func:`mean_ci`; NaN if n < 2).
    ``metrics=None`` takes those of :data:`DEFAULT_SUMMARY_METRICS` with a value in ``df``.
    Show it with :func:`summary_table` for "mean ± std" strings.
    """
    by = _as_list(by)
    _check_columns(df, by, "grouping column")
    if metrics is None:
        metrics = [m for m in DEFAULT_SUMMARY_METRICS if m in df.columns and df[m].notna().any()]
    _check_columns(df, metrics, "metric")
    groups = df.groupby(by, sort=False, dropna=False)
    carried = [c for c in factor_columns(df) if c not in by and (groups[c].nunique(dropna=False) <= 1).all()]
    rows = []
    for key, part in groups:
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update({c: part[c].iloc[0] for c in carried})
        for m in metrics:
            row.update(zip((f"{m}_{s}" for s in _STATS), mean_ci(part[m], confidence)))
        rows.append(row)
    return pd.DataFrame(rows)


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """``"130.23 ± 0.94"``; just the mean when std is NaN (one run), ``"–"`` when there is no mean."""
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(summary: pd.DataFrame, metrics: Sequence[str] | None = None, digits: int = 2) -> pd.DataFrame:
    """A display table from :func:`summarize`: its group and factor columns, ``"mean ± std"`` per metric,
    and ``n`` (the first metric's run count)."""
    summarized = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    metrics = summarized if metrics is None else list(metrics)
    stat_columns = {f"{m}_{s}" for m in summarized for s in _STATS}
    out = summary[[c for c in summary.columns if c not in stat_columns]].copy()
    for m in metrics:
        out[m] = [format_mean_std(a, s, digits) for a, s in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    if metrics:
        out["n"] = summary[f"{metrics[0]}_n"].to_numpy()
    return out


def paired_differences(
    df: pd.DataFrame,
    baseline: str,
    metric: str,
    pair_on: str = "seed",
    lower_is_better: bool = True,
    by: str = "condition",
) -> pd.DataFrame:
    """Long table of every pair: one row per (non-baseline condition, shared ``pair_on`` value).

    Columns: ``by``, ``pair_on``, ``baseline``, ``treatment``, ``difference = treatment - baseline``
    and ``improvement_pct``: ``100 * (baseline - treatment) / baseline`` when lower is better,
    ``100 * (treatment - baseline) / baseline`` otherwise, so positive always means better.
    Runs whose ``pair_on`` value (or metric) is missing on the other side are left out;
    :func:`paired_comparison` counts them.
    """
    _check_columns(df, [by, pair_on], "column")
    _check_columns(df, [metric], "metric")
    conditions = list(dict.fromkeys(df[by]))
    if baseline not in conditions:
        raise ValueError(f"unknown baseline {baseline!r}: valid conditions are {conditions}")
    duplicated = df[df.duplicated([by, pair_on], keep=False)]
    if not duplicated.empty:
        raise ValueError(f"several runs share ({by}, {pair_on}) = {duplicated[[by, pair_on]].drop_duplicates().values.tolist()}; pairing is ambiguous")
    wide = df.dropna(subset=[metric]).pivot(index=pair_on, columns=by, values=metric).astype(float)
    rows = []
    for cond in conditions:
        if cond == baseline or cond not in wide.columns or baseline not in wide.columns:
            continue
        for key, (b, t) in wide[[baseline, cond]].dropna().iterrows():
            gain = (b - t) if lower_is_better else (t - b)
            rows.append({by: cond, pair_on: key, "baseline": b, "treatment": t, "difference": t - b, "improvement_pct": 100 * gain / b})
    return pd.DataFrame(rows, columns=[by, pair_on, "baseline", "treatment", "difference", "improvement_pct"])


def paired_comparison(
    df: pd.DataFrame,
    baseline: str,
    metric: str,
    pair_on: str = "seed",
    lower_is_better: bool = True,
    confidence: float = 0.95,
    by: str = "condition",
) -> pd.DataFrame:
    """Each non-baseline condition against ``baseline``, paired on ``pair_on`` (same seed).

    One row per condition (grid order): ``n_pairs``; ``n_unpaired`` (runs of either side
    whose partner is missing, excluded); ``baseline_mean`` and ``treatment_mean`` over the
    pairs; ``mean_difference`` (treatment - baseline) with its t interval ``difference_ci_low``
    / ``difference_ci_high``; ``improvement_pct`` (mean over pairs of the per-pair % from
    :func:`paired_differences`) with ``improvement_pct_ci_low`` / ``_ci_high``; and the paired
    t-test ``p_value`` (``scipy.stats.ttest_rel``, two-sided; NaN if fewer than 2 pairs).
    """
    pairs = paired_differences(df, baseline, metric, pair_on, lower_is_better, by)
    present = df.dropna(subset=[metric])
    base_keys = set(present.loc[present[by] == baseline, pair_on])
    rows = []
    for cond in dict.fromkeys(df[by]):
        if cond == baseline:
            continue
        part = pairs[pairs[by] == cond]
        treat_keys = set(present.loc[present[by] == cond, pair_on])
        diff = mean_ci(part["difference"], confidence)
        gain = mean_ci(part["improvement_pct"], confidence)
        p_value = float("nan")
        if len(part) >= 2:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                p_value = float(stats.ttest_rel(part["treatment"], part["baseline"]).pvalue)
        rows.append(
            {
                by: cond,
                "n_pairs": len(part),
                "n_unpaired": len(base_keys ^ treat_keys),
                "baseline_mean": float(part["baseline"].mean()) if len(part) else float("nan"),
                "treatment_mean": float(part["treatment"].mean()) if len(part) else float("nan"),
                "mean_difference": diff[0],
                "difference_ci_low": diff[3],
                "difference_ci_high": diff[4],
                "improvement_pct": gain[0],
                "improvement_pct_ci_low": gain[3],
                "improvement_pct_ci_high": gain[4],
                "p_value": p_value,
            }
        )
    return pd.DataFrame(rows)
