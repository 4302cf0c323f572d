"""Notebook 03's study: routing noise_std {0, 0.1, 0.5} x load_balancing_weight {0.01, 0}, the
routing-noise factorial (6 conditions x seeds 42, 43, 44 = 18 runs). Its grid, tables, factorial
analysis and verdicts, each effect next to what the original reported.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..runs import Grid
from ..profiles import Profile
from ..stats import factorial_anova, factorial_contrasts, format_mean_std, holm_adjusted, summarize
from . import originals
from .result import StudyResult, conditions, pair_values, paired_table
from .verdicts import (
    VERDICT_METRIC, anova_lines, change_text, ci_text, contrast_text, interval_cell, interval_side, overfit_lines, p_text, scale_sentence,
    significance,
)


NOISE_LEVELS = (0.0, 0.1, 0.5)
LB_WEIGHTS = (0.01, 0.0)


def noise_grid(profile: Profile, seeds=None) -> Grid:
    """noise_std x load_balancing_weight, 8 experts top-2, the original's Muon + AdamW hybrid."""
    conditions = {
        f"noise={noise}, lb={lb}": {"noise_std": noise, "load_balancing_weight": lb}
        for noise, lb in itertools.product(NOISE_LEVELS, LB_WEIGHTS)
    }
    base = profile.base.with_train(optimizer="muon")
    return Grid.from_conditions("noise_factorial", base, conditions, seeds or profile.seeds, baseline="noise=0.0, lb=0.01")


ORIGINAL_NOISE_COLUMNS = [
    "seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
    "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv",
    "expert_usage_cv_pooled",  # the original's expert_usage_cv: counts of all layers summed, then CV
]


def _cv_ratio_phrase(off: float, on: float) -> str:
    """How many times lower the usage CV is with load balancing; words, never ``inf`` or ``nan``, when there is no ratio."""
    if pd.isna(off) or pd.isna(on):
        return "no value to compare."
    if on == 0:
        return "both are 0 (perfectly even usage), so there is no ratio." if off == 0 else "0 with it, so the ratio is unbounded."
    return f"{off / on:.1f}x lower with lb 0.01."


def noise_condition_table(study: StudyResult) -> pd.DataFrame:
    """Test PPL (:data:`~moe_lib.studies.verdicts.VERDICT_METRIC`), usage CV and time per condition: mean ± std and the 95% CI of the mean."""
    ppl = VERDICT_METRIC
    s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=[ppl, "expert_usage_cv", "training_time_minutes"])
    table = pd.DataFrame({
        "noise_std": s.noise_std,
        "lb weight": s.load_balancing_weight,
        "n": s[f"{ppl}_n"],
        "test PPL": [format_mean_std(m, d, 2) for m, d in zip(s[f"{ppl}_mean"], s[f"{ppl}_std"])],
        "PPL 95% CI": [interval_cell(lo, hi, 2) for lo, hi in zip(s[f"{ppl}_ci_low"], s[f"{ppl}_ci_high"])],
        "usage CV": [format_mean_std(m, d, 4) for m, d in zip(s.expert_usage_cv_mean, s.expert_usage_cv_std)],
        "CV 95% CI": [interval_cell(lo, hi, 4) for lo, hi in zip(s.expert_usage_cv_ci_low, s.expert_usage_cv_ci_high)],
        "time (min)": [format_mean_std(m, float("nan"), 2) for m in s.training_time_minutes_mean],
    })
    return table.reset_index(drop=True)


def per_seed_table(study: StudyResult, metrics: list[str]) -> pd.DataFrame:
    """Rows: conditions; columns: (metric, seed)."""
    table = study.results.pivot_table(index="condition", columns="seed", values=metrics, sort=False)
    return table.reindex(conditions(study)).round(4)


def _original_noise() -> pd.DataFrame:
    """The original's noise table, one row per noise level: PPL cost of noise vs noise 0 and of lb 0 vs 0.01, and the CV ratio."""
    t = originals.NOISE.set_index(["noise_std", "load_balancing_weight"])
    ppl, cv = t.best_val_perplexity_mean, t.expert_usage_cv
    rows = []
    for noise in NOISE_LEVELS:
        cost = [ppl[noise, lb] - ppl[0.0, lb] for lb in LB_WEIGHTS]
        rows.append({
            "noise_std": noise,
            "noise_cost_ppl": np.mean(cost),
            "noise_cost_pct": np.mean([100 * c / ppl[0.0, lb] for c, lb in zip(cost, LB_WEIGHTS)]),
            "lb_edge_ppl": ppl[noise, 0.0] - ppl[noise, 0.01],
            "cv_ratio": cv[noise, 0.0] / cv[noise, 0.01],
        })
    return pd.DataFrame(rows).set_index("noise_std")


def _ppl_line(study: StudyResult, baseline: str, condition: str, label: str, metric: str = VERDICT_METRIC) -> str:
    """``condition`` vs ``baseline`` on ``metric`` (PPL), seed-paired: % and PPL change, CI, p, verdict."""
    cmp = paired_table(study, metric, baseline).loc[condition]
    if cmp.n_pairs == 0:
        return f"{label}: no seed has a {metric} for both, so no comparison."
    return (
        f"{label}: {-cmp.improvement_pct:+.1f}% {metric.replace('_', ' ')} "
        f"({cmp.mean_difference:+.2f} PPL, {ci_text(-cmp.improvement_pct_ci_high, -cmp.improvement_pct_ci_low, 1, '%')}, "
        f"paired t-test p = {p_text(cmp.p_value)}): "
        f"{significance(cmp.difference_ci_low, cmp.difference_ci_high, pair_values(study, metric, baseline, condition), 1, ' PPL')}."
    )


def noise_verdicts(study: StudyResult, metric: str = VERDICT_METRIC) -> list[str]:
    """Noise and load-balancing effects on ``metric`` (seed-paired, with CIs), each followed by what the original reported."""
    r = study.results
    orig = _original_noise()
    lines = []
    for lb in LB_WEIGHTS:
        for noise in NOISE_LEVELS[1:]:
            lines.append(_ppl_line(study, f"noise=0.0, lb={lb}", f"noise={noise}, lb={lb}", f"noise {noise} vs 0 (lb {lb})", metric))
    high, low = orig.loc[NOISE_LEVELS[2]], orig.loc[NOISE_LEVELS[1]]
    lines.append(
        f"Original: noise {NOISE_LEVELS[2]} cost about {high.noise_cost_ppl:+.0f} PPL ({high.noise_cost_pct:+.0f}%) at both lb settings; "
        f"noise {NOISE_LEVELS[1]} about {low.noise_cost_ppl:+.0f} PPL ({low.noise_cost_pct:+.1f}%)."
    )
    for noise in NOISE_LEVELS:
        for column, name in (("expert_usage_cv", "usage CV (per layer, mean over layers)"), ("expert_usage_cv_pooled", "pooled usage CV (the original's)")):
            if column not in r.columns:
                continue
            on = r[(r.noise_std == noise) & (r.load_balancing_weight == 0.01)][column].mean()
            off = r[(r.noise_std == noise) & (r.load_balancing_weight == 0.0)][column].mean()
            cv_off, cv_on = format_mean_std(off, float("nan"), 4), format_mean_std(on, float("nan"), 4)
            lines.append(f"noise {noise}: {name} {cv_off} without load balancing vs {cv_on} with it: {_cv_ratio_phrase(off, on)}")
    ratios = ", ".join(f"{x:.1f}x" for x in orig.cv_ratio.iloc[:-1]) + f" and {orig.cv_ratio.iloc[-1]:.1f}x"
    levels = ", ".join(f"{n:g}" for n in NOISE_LEVELS[:-1]) + f" and {NOISE_LEVELS[-1]:g}"
    lines.append(f"Original (pooled CV): lb 0.01 cut the CV {ratios} at noise {levels}.")
    for noise in NOISE_LEVELS:
        lines.append(_ppl_line(study, f"noise={noise}, lb=0.01", f"noise={noise}, lb=0.0", f"lb 0 vs 0.01 at noise {noise}", metric))
    lines.append(
        f"Original: lb 0.01 gave at most a {orig.lb_edge_ppl.max():.1f} PPL edge, inside its seed spread "
        f"(std about {originals.NOISE.best_val_perplexity_std.mean():.0f} PPL)."
    )
    return lines + overfit_lines(study.results)


FACTORS = ("noise_std", "load_balancing_weight")


def noise_factorial_analysis(study: StudyResult, metric: str = VERDICT_METRIC) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The noise study analysed as the 3 x 2 factorial it is, on log ``metric`` with the seed as a block.

    Returns ``(anova, contrasts)``: :func:`~moe_lib.stats.factorial_anova` (main effects of noise
    and lb, their interaction, the seed block, partial eta squared) and the effect sizes of
    :func:`~moe_lib.stats.factorial_contrasts` for both factors (noise vs 0; lb 0 vs 0.01), each
    main effect and interaction contrast with its seed-paired t interval, as % change in ``metric``.
    """
    r = study.results
    anova = factorial_anova(r, metric, list(FACTORS), block="seed", log=True)
    contrasts = pd.concat([
        factorial_contrasts(r, metric, "noise_std", "load_balancing_weight", baseline=NOISE_LEVELS[0]),
        factorial_contrasts(r, metric, "load_balancing_weight", "noise_std", baseline=LB_WEIGHTS[0]),
    ], ignore_index=True)
    return anova, contrasts


def noise_factorial_verdicts(study: StudyResult, metric: str = VERDICT_METRIC) -> list[str]:
    """Main effects and the noise x lb interaction, from :func:`noise_factorial_analysis`, in words. An interaction
    whose CI excludes 0 is called real only when it survives Holm's correction over the notebook's :func:`verdict_family`."""
    anova, contrasts = noise_factorial_analysis(study, metric)
    family = verdict_tests(study, metric)
    holm = pd.Series(holm_adjusted(family.p), index=family.index)
    lines = anova_lines(anova, metric)
    for _, row in contrasts.iterrows():
        if row.effect == "noise_std main effect":
            lines.append(f"Noise {row.level:g} vs 0, averaged over lb: {contrast_text(row)}.")
        elif row.effect == "load_balancing_weight main effect":
            lines.append(f"lb {row.level:g} vs {LB_WEIGHTS[0]:g}, averaged over noise: {contrast_text(row)}.")
    for _, row in contrasts[contrasts.effect.str.startswith("noise_std x")].iterrows():
        bounded = pd.notna(row.pct_ci_low)
        claim = (
            "no interval, so the original's claim of a limited interaction is untested here" if not bounded else
            f"no evidence of an interaction, consistent with the original's claim that it is limited, but only to the CI's "
            f"resolution: interactions from {row.pct_ci_low:+.1f}% to {row.pct_ci_high:+.1f}% remain possible" if row.ci_low <= 0 <= row.ci_high else
            f"the interaction survives Holm's correction over this notebook's {len(family)} tests (Holm p = "
            f"{p_text(holm[_interaction_label(row.level)])}): real here, against the original's claim that it is limited"
            if holm[_interaction_label(row.level)] < 0.05 else
            f"but only uncorrected: after Holm's correction over this notebook's {len(family)} tests, p = "
            f"{p_text(holm[_interaction_label(row.level)])}, so it is a lead, not evidence against the original's claim that it is limited"
        )
        lines.append(
            f"Noise x lb interaction at noise {row.level:g} (the noise effect with lb {LB_WEIGHTS[0]:g} minus with lb {LB_WEIGHTS[1]:g}): "
            f"{contrast_text(row)}; {claim}."
        )
    return lines


# --------------------------------------------------------------------------- what we found
def _noise_change(study: StudyResult, noise: float, metric: str) -> tuple[float, float, float, int]:
    """``(pct, low, high, n)``: the seed-paired % change in ``metric`` of noise ``noise`` vs noise 0, both at lb 0.01."""
    c = paired_table(study, metric, f"noise=0.0, lb={LB_WEIGHTS[0]}").loc[f"noise={noise}, lb={LB_WEIGHTS[0]}"]
    return -c.improvement_pct, -c.improvement_pct_ci_high, -c.improvement_pct_ci_low, int(c.n_pairs)


def _interaction_label(level: float) -> str:
    return f"noise x lb interaction at noise {level:g}"


def verdict_tests(study: StudyResult, metric: str = VERDICT_METRIC) -> pd.DataFrame:
    """Every test this notebook's verdicts make on ``metric``, one row each (the family a multiple-comparison
    correction is over): the seed-paired t-tests of :func:`noise_verdicts`, the ANOVA terms and the contrasts of
    :func:`noise_factorial_verdicts` (each interaction once). Columns: ``estimate`` (% change, or the ANOVA's F),
    ``verdict`` (the CI's :func:`~moe_lib.studies.verdicts.interval_side`; for an ANOVA term, p against 0.05) and ``p``."""
    rows = []
    for lb in LB_WEIGHTS:
        for noise in NOISE_LEVELS[1:]:
            rows.append((f"noise {noise:g} vs 0 (lb {lb:g})", f"noise=0.0, lb={lb}", f"noise={noise}, lb={lb}"))
    rows += [(f"lb 0 vs 0.01 at noise {noise:g}", f"noise={noise}, lb=0.01", f"noise={noise}, lb=0.0") for noise in NOISE_LEVELS]
    tests = {}
    for label, baseline, condition in rows:
        c = paired_table(study, metric, baseline).loc[condition]
        tests[label] = (f"{-c.improvement_pct:+.1f}%", interval_side(c.difference_ci_low, c.difference_ci_high), c.p_value)
    anova, contrasts = noise_factorial_analysis(study, metric)
    for term in anova.index.drop(["Residual", "seed"], errors="ignore"):
        p = anova.loc[term, "PR(>F)"]
        name = term.replace("noise_std", "noise").replace("load_balancing_weight", "lb").replace(":", " x ")
        tests[f"ANOVA: {name}"] = (f"F = {anova.loc[term, 'F']:.2f}", "p < 0.05" if p < 0.05 else "p >= 0.05" if pd.notna(p) else "no test", p)
    for _, row in contrasts.iterrows():
        if row.effect == "noise_std main effect":
            label = f"noise {row.level:g} vs 0, averaged over lb"
        elif row.effect == "load_balancing_weight main effect":
            label = f"lb {row.level:g} vs {LB_WEIGHTS[0]:g}, averaged over noise"
        elif row.effect.startswith("noise_std x"):
            label = _interaction_label(row.level)
        else:  # the lb-side interactions repeat the noise-side ones with the roles swapped
            continue
        tests[label] = (f"{row.pct:+.1f}%", interval_side(row.ci_low, row.ci_high), row.p_value)
    table = pd.DataFrame.from_dict(tests, orient="index", columns=["estimate", "verdict", "p"])
    table.index.name = "test"
    return table


def verdict_family(study: StudyResult, metric: str = VERDICT_METRIC) -> list[tuple[str, float]]:
    """``(label, p)`` of every test of :func:`verdict_tests`, for :func:`~moe_lib.studies.verdicts.family_table` (Holm)."""
    tests = verdict_tests(study, metric)
    return list(zip(tests.index, tests.p))


def metric_changes(study: StudyResult, other: str = "best_val_perplexity", metric: str = VERDICT_METRIC) -> pd.DataFrame:
    """Which verdicts differ between ``metric`` and ``other`` on the same runs: each test of :func:`verdict_tests` with
    its estimate and verdict under both, and ``differs`` where the verdicts are not the same."""
    ours, theirs = verdict_tests(study, metric), verdict_tests(study, other)
    return pd.DataFrame({
        metric: ours.estimate + " (" + ours.verdict + ")",
        other: theirs.estimate + " (" + theirs.verdict + ")",
        "differs": ours.verdict != theirs.verdict,
    })


def _scale_findings(study: StudyResult, metric: str) -> tuple[list[str], dict[str, str]]:
    """Two sentences for one profile (noise; load balancing and the interaction) and each effect's :func:`interval_side`."""
    name, label = study.profile.name, metric.replace("_", " ")
    high, low = (_noise_change(study, noise, metric) for noise in NOISE_LEVELS[:0:-1])
    _, contrasts = noise_factorial_analysis(study, metric)
    lb = contrasts[contrasts.effect == "load_balancing_weight main effect"].iloc[0]
    r = study.results
    cv = r.groupby(["noise_std", "load_balancing_weight"]).expert_usage_cv.mean()
    ratios = [cv[noise, LB_WEIGHTS[1]] / cv[noise, LB_WEIGHTS[0]] for noise in NOISE_LEVELS if cv[noise, LB_WEIGHTS[0]] > 0]
    ratio_text = f"{min(ratios):.1f}-{max(ratios):.1f}x" if ratios else "by no finite ratio (its CV is 0)"
    family = verdict_tests(study, metric)
    holm = pd.Series(holm_adjusted(family.p), index=family.index)
    corrected = [test for test in family.index if holm[test] < 0.05]
    uncorrected = int(((family.p < 0.05) & ~(holm < 0.05)).sum())
    interaction = "ANOVA: noise x lb"
    sentences = [
        f"At the {name} profile ({len(r)} runs), routing noise {NOISE_LEVELS[2]:g} changed {label} by {change_text(*high)} "
        f"and noise {NOISE_LEVELS[1]:g} by {change_text(*low)}, both against no noise at lb {LB_WEIGHTS[0]:g}.",
        f"There, training without the load-balancing loss changed {label} by {change_text(lb.pct, lb.pct_ci_low, lb.pct_ci_high, int(lb.n))} "
        f"averaged over noise, and the per-layer usage CV without it was {ratio_text} the CV with it across the noise levels; of the "
        f"{len(family)} tests in this notebook's verdicts, {len(corrected)} {'stays' if len(corrected) == 1 else 'stay'} significant after Holm's correction"
        f"{' (' + '; '.join(corrected) + ')' if corrected else ''} and {uncorrected} more have p < 0.05 only uncorrected, "
        f"and the noise x lb interaction's ANOVA p = {p_text(family.p[interaction])} (Holm {p_text(holm[interaction])}).",
    ]
    sides = {
        f"noise {NOISE_LEVELS[2]:g}": interval_side(high[1], high[2]),
        f"noise {NOISE_LEVELS[1]:g}": interval_side(low[1], low[2]),
        "no load balancing": interval_side(lb.pct_ci_low, lb.pct_ci_high),
    }
    return sentences, sides


def findings(cpu_study: StudyResult, gpu_study: StudyResult | None = None, metric: str = VERDICT_METRIC) -> list[str]:
    """Notebook 03's "What we found": at most 6 plain sentences with the numbers that carry them, computed from
    the studies' results (the cpu profile's and, where stored, the gpu profile's), so the text follows the numbers."""
    cpu_lines, cpu_sides = _scale_findings(cpu_study, metric)
    if gpu_study is None:
        return cpu_lines + [f"No gpu results are stored for this study, so this holds at the {cpu_study.profile.name} profile only."]
    gpu_lines, gpu_sides = _scale_findings(gpu_study, metric)
    sides = {effect: (cpu_sides[effect], gpu_sides[effect]) for effect in cpu_sides}
    return cpu_lines + gpu_lines + [scale_sentence(sides, cpu_study.profile.name, gpu_study.profile.name)]
