"""Statistics over a results table (one row per run): pure functions of a DataFrame.

* :func:`mean_ci` - mean, std (ddof=1) and a Student-t confidence interval of the mean;
* :func:`summarize` / :func:`summary_table` - those per condition, and as "mean ± std" text;
* :func:`paired_differences` / :func:`paired_comparison` - seed-paired differences against a
  baseline condition, with their t interval and a paired t-test (``scipy.stats.ttest_rel``);
* :func:`sign_consistency` and :func:`minimum_detectable_effect` - what a small-n paired
  comparison can and cannot say ("3/3 seeds", "inconclusive at n = 3, MDE 2.1 PPL"; the words
  are :mod:`moe_lib.studies.verdicts`');
* :func:`t_errorbar` - the same t interval as an ``errorbar=`` for seaborn, so figures and tables agree;
* :func:`factorial_anova` / :func:`factorial_contrasts` - a factorial design analysed as one:
  two-way ANOVA with seed as a block (``statsmodels``), main effects and interaction contrasts;
* :func:`holm_adjusted` - a family of p-values corrected for multiple comparisons (Holm, ``statsmodels``).

One statistical language throughout: every interval is the Student-t interval of :func:`mean_ci`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

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


def mean_std_text(values: Sequence[float] | np.ndarray, digits: int = 2) -> str:
    """:func:`format_mean_std` of the non-NaN ``values`` (std with ddof=1)."""
    mean, std, *_ = mean_ci(np.asarray(values, dtype=float))
    return format_mean_std(mean, std, digits)


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


def condition_differences(
    df: pd.DataFrame, baseline: str, condition: str, metric: str, column: str = "difference", pair_on: str = "seed"
) -> pd.Series:
    """The per-seed paired ``column`` (``difference`` or ``improvement_pct``) of ``condition`` against
    ``baseline`` (:func:`paired_differences`, lower ``metric`` better), indexed by ``pair_on``."""
    pairs = paired_differences(df, baseline=baseline, metric=metric, pair_on=pair_on)
    part = pairs[pairs.condition == condition]
    return pd.Series(part[column].to_numpy(dtype=float), index=part[pair_on].to_numpy())


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


# --------------------------------------------------------------------------- small-n and factorial designs


def t_errorbar(confidence: float = 0.95) -> Callable[[Sequence[float]], tuple[float, float]]:
    """An ``errorbar=`` callable for seaborn that draws the same Student-t interval as the tables.

    seaborn's default ``("ci", 95)`` is a bootstrap interval, which with 3 seeds can never reach beyond
    the smallest and largest seed; the tables use :func:`mean_ci`. With one value the bar has no length.
    """

    def interval(values: Sequence[float]) -> tuple[float, float]:
        mean, _, n, low, high = mean_ci(values, confidence)
        return (mean, mean) if n < 2 else (low, high)

    return interval


SIGN_SIDES = ("mean", "lower", "higher")


def sign_consistency(differences: Sequence[float] | np.ndarray, favours: str = "mean") -> tuple[int, int]:
    """``(k, n)``: k of the n paired ``differences`` (NaN left out) favour one side, "k/n seeds favour X".

    ``favours="lower"`` counts ``d < 0`` (the treatment lower than its baseline), ``"higher"`` counts
    ``d > 0``, and ``"mean"`` the side of their mean: how many seeds point the same way as the
    average (a zero difference, or a zero mean, counts against).
    """
    if favours not in SIGN_SIDES:
        raise ValueError(f"unknown side favours={favours!r}: valid sides are {SIGN_SIDES}")
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return 0, 0
    direction = {"lower": -1.0, "higher": 1.0, "mean": np.sign(d.mean())}[favours]
    agreeing = int((np.sign(d) == direction).sum()) if direction != 0 else 0
    return agreeing, len(d)


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean paired difference a two-sided paired t-test on ``n`` pairs detects with
    probability ``power`` at level ``alpha``, for a paired standard deviation ``sd``: ``d * sd`` where
    ``d`` solves the t-test power equation (``statsmodels`` ``TTestPower``). NaN when ``n < 2`` or sd is NaN.
    """
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(d) * float(sd)


def one_sample_p(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided p of a one-sample t-test of mean 0 on per-seed ``differences`` (``scipy.stats.ttest_1samp``;
    the same p as ``ttest_rel`` of the pairs). NaN with fewer than 2 values or no spread: no test."""
    d = pd.Series(differences, dtype=float).dropna()
    if len(d) < 2 or d.nunique() < 2:  # equal values: no spread (std() of equal floats can round to 1e-17, not 0)
        return float("nan")
    with warnings.catch_warnings():  # scipy warns on nearly identical values; the p it returns is still the test's
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_1samp(d, 0.0).pvalue)


def holm_adjusted(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family of tests (``multipletests(method="holm")``).

    Sorted ascending, the i-th smallest of m p-values (i = 0, 1, ...) is multiplied by ``m - i``, kept
    non-decreasing and capped at 1; a test is significant at family-wise level alpha when its adjusted
    p is below alpha. NaN p-values (too few seeds) stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    present = ~np.isnan(p)
    if present.any():
        adjusted[present] = multipletests(p[present], method="holm")[1]
    return adjusted


def factorial_anova(df: pd.DataFrame, response: str, factors: Sequence[str], block: str = "seed", log: bool = True) -> pd.DataFrame:
    """Two-way (or n-way) ANOVA of a full factorial with ``block`` (the seed) as a block.

    Fits ``response ~ C(f1) * C(f2) * ... + C(block)`` by ordinary least squares (``statsmodels``
    formula API) and returns ``anova_lm(typ=2)``: one row per main effect, interaction, the block and
    the residual, with ``sum_sq``, ``df``, ``F``, ``PR(>F)`` and the partial eta squared
    ``SS_effect / (SS_effect + SS_residual)``. ``log=True`` models ``log(response)``, so effects are
    multiplicative (perplexity ratios), which is how the course reports them.
    """
    for name in [response, *factors, block]:
        if name not in df.columns:
            raise ValueError(f"unknown column {name!r}: valid columns are {list(df.columns)}")
    data = df[[response, *factors, block]].dropna().copy()
    if log:
        if (data[response] <= 0).any():
            raise ValueError(f"log=True needs a positive {response!r}; got min {data[response].min()}")
        data[response] = np.log(data[response])
    names = {column: f"x{i}" for i, column in enumerate([response, *factors, block])}  # formula-safe names
    data = data.rename(columns=names)
    formula = f"{names[response]} ~ " + " * ".join(f"C({names[f]})" for f in factors) + f" + C({names[block]})"
    table = anova_lm(ols(formula, data=data).fit(), typ=2)
    back = {f"C({v})": k for k, v in names.items()}
    table.index = [":".join(back.get(part, part) for part in term.split(":")) for term in table.index]
    residual = table.loc["Residual", "sum_sq"]
    table["partial_eta_sq"] = table["sum_sq"] / (table["sum_sq"] + residual)
    table.loc["Residual", ["partial_eta_sq"]] = np.nan
    return table


def factorial_contrasts(
    df: pd.DataFrame, response: str, factor: str, other: str, baseline: Any, block: str = "seed", log: bool = True, confidence: float = 0.95
) -> pd.DataFrame:
    """Effect sizes of a two-factor design, per seed, with the course's t-interval over seeds.

    For each non-baseline level ``L`` of ``factor``: the **main effect** ``mean over levels of other of
    [y(L) - y(baseline)]`` and, for each pair of levels of ``other``, the **interaction contrast**
    ``[y(L) - y(base)] at other=a  minus  the same at other=b``, each computed within a seed (so seeds
    pair) and summarised by :func:`mean_ci` over seeds. With ``log=True`` ``y = log(response)`` and the
    effect is also given as a percentage change, ``100 * (exp(effect) - 1)``.
    Columns: ``effect``, ``level``, ``mean``, ``ci_low``, ``ci_high``, ``pct``, ``pct_ci_low``,
    ``pct_ci_high``, ``n``, ``signs`` and ``p_value`` (:func:`one_sample_p` of the per-seed values).
    """
    for name in (response, factor, other, block):
        if name not in df.columns:
            raise ValueError(f"unknown column {name!r}: valid columns are {list(df.columns)}")
    levels = list(dict.fromkeys(df[factor]))
    if baseline not in levels:
        raise ValueError(f"baseline {baseline!r} is not a level of {factor!r}: valid levels are {levels}")
    y = np.log(df[response]) if log else df[response]
    cube = df.assign(_y=y).pivot_table(index=block, columns=[factor, other], values="_y", aggfunc="mean")
    others = list(dict.fromkeys(df[other]))
    rows = []

    def add(effect: str, level: Any, per_seed: pd.Series) -> None:
        mean, _, n, low, high = mean_ci(per_seed.to_numpy(), confidence)
        pct = (lambda v: 100 * (math.exp(v) - 1)) if log else (lambda v: float("nan"))
        rows.append({
            "effect": effect, "level": level, "mean": mean, "ci_low": low, "ci_high": high,
            "pct": pct(mean), "pct_ci_low": pct(low) if n >= 2 else float("nan"), "pct_ci_high": pct(high) if n >= 2 else float("nan"),
            "n": n, "signs": "{}/{} seeds".format(*sign_consistency(per_seed.to_numpy())), "p_value": one_sample_p(per_seed),
        })

    for level in levels:
        if level == baseline:
            continue
        simple = pd.DataFrame({o: cube[(level, o)] - cube[(baseline, o)] for o in others})
        add(f"{factor} main effect", level, simple.mean(axis=1, skipna=False))
        for a, b in itertools.combinations(others, 2):
            add(f"{factor} x {other} interaction ({other} {a} minus {b})", level, simple[a] - simple[b])
    return pd.DataFrame(rows)
