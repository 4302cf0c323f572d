"""Notebook 06's capacity study: capacity factor {1.0, 1.25, dropless} x load balancing {0.01, 0} on the
profile's seeds, the token-dropping trade-off of GShard and Switch, lb on/off paired by seed.
Its grid, table and verdicts.
"""

from __future__ import annotations

import itertools

import pandas as pd

from ..runs import Grid
from ..profiles import Profile
from ..stats import capacity_label, factorial_anova, mean_std_text, paired_comparison, paired_differences
from .noise import LB_WEIGHTS
from .result import StudyResult, conditions
from .verdicts import anova_lines, ci_text, overfit_lines, significance


CAPACITY_FACTORS: tuple[float | None, ...] = (1.0, 1.25, None)  # None = dropless


def capacity_grid(profile: Profile, seeds=None) -> Grid:
    """capacity_factor x load_balancing_weight, learned top-2, on the profile's seeds.

    Three levels x two lb weights x 3 seeds = 18 runs, about 14 minutes on the cpu profile: seeds
    pair lb on/off at each capacity factor, so their difference comes with a confidence interval.
    cf 1.0 (buffers exactly the even share) and 1.25 (Switch's default) are where lb can matter.
    """
    base = profile.base.with_model(top_k=2, router="topk", noise_std=0.0, z_loss_weight=0.0)
    conditions = {
        f"cf={capacity_label(cf)}, lb={lb}": {"capacity_factor": cf, "load_balancing_weight": lb}
        for lb, cf in itertools.product(LB_WEIGHTS, CAPACITY_FACTORS)
    }
    return Grid.from_conditions("capacity", base, conditions, seeds or profile.seeds, baseline="cf=dropless, lb=0.01", compares_time=True)


def capacity_table(study: StudyResult) -> pd.DataFrame:
    """Per condition: dropped slots (in training at the run's capacity factor, mean over steps; mean over
    layers and per layer), the floor ``1 - cf`` that any routing must drop when cf < 1, validation
    perplexity (at the evaluation capacity, ``ModelConfig.capacity_factor_eval``) and its change vs
    dropless at the same lb."""
    r = study.results.copy()
    rows = []
    for condition in conditions(study):
        part = r[r.condition == condition]
        cf, lb = part.capacity_factor.iloc[0], part.load_balancing_weight.iloc[0]
        dropless = r[(r.capacity_factor.isna()) & (r.load_balancing_weight == lb)]
        layer_cols = sorted((c for c in r.columns if c.startswith("train_dropped_L")), key=lambda c: int(c.rsplit("L", 1)[1]))
        rows.append({
            "capacity factor": capacity_label(cf),
            "lb weight": lb,
            "seeds": len(part),
            "dropped (%)": f"{100 * part.train_dropped_fraction.mean():.2f}",
            "dropped per layer (%)": " ".join(f"{100 * part[c].mean():.1f}" for c in layer_cols),
            "floor 1 - cf (%)": f"{100 * max(0.0, 1 - cf):.0f}" if pd.notna(cf) else "0",
            "val PPL": mean_std_text(part.val_perplexity, 2),
            "vs dropless": f"{100 * (part.val_perplexity.mean() / dropless.val_perplexity.mean() - 1):+.1f}%" if len(dropless) else "–",
            "ms/step": f"{part.ms_per_step.mean():.0f}",
        })
    return pd.DataFrame(rows).set_index(["capacity factor", "lb weight"])


def capacity_verdicts(study: StudyResult, seed_std: float | None = None, threshold: float = 0.01) -> list[str]:
    """Findings computed from the capacity sweep, seed means with seed-paired 95% CIs where there are seeds.

    ``seed_std``: with one seed only, the seed-to-seed std of validation perplexity of the dropless
    lb 0.01 configuration (from a multi-seed study), the yardstick for a one-seed difference.
    """
    r = study.results.copy()
    r["cf"] = r.capacity_factor.map(capacity_label)
    n_seeds = r.seed.nunique()
    lines = []
    for (cf, lb), part in r[r.capacity_factor < 1].groupby(["capacity_factor", "load_balancing_weight"], sort=False):
        floor = 1 - cf
        lines.append(
            f"cf={capacity_label(cf)}, lb={lb}: {100 * part.train_dropped_fraction.mean():.1f}% of slots dropped (mean of {len(part)} seed(s)); "
            f"the experts hold at most ceil(cf N k / E) x E ~ {100 * cf:.0f}% of the routed slots, so at least "
            f"{100 * floor:.0f}% must drop: {'consistent' if (part.train_dropped_fraction >= floor - 1e-6).all() else 'INCONSISTENT'} with the formula."
        )
    for lb, part in r.groupby("load_balancing_weight", sort=False):
        means = part.dropna(subset=["capacity_factor"]).groupby("capacity_factor").train_dropped_fraction.mean().sort_index()
        if means.empty:
            continue
        ok = means[means < threshold]
        if len(ok):
            lines.append(f"lb={lb}: the smallest capacity factor in the sweep that drops fewer than {100 * threshold:.0f}% of slots (seed mean) is cf={capacity_label(ok.index[0])}.")
        else:
            least = means.idxmin()
            lines.append(
                f"lb={lb}: every finite capacity factor in the sweep drops {100 * threshold:.0f}% of slots or more (seed mean); "
                f"the fewest, {100 * means[least]:.1f}%, at cf={capacity_label(least)}."
            )
    for cf in [*sorted(r.capacity_factor.dropna().unique()), None]:
        at = r[r.capacity_factor.isna() if cf is None else r.capacity_factor == cf]
        at = at.assign(condition=lambda d: "lb=" + d.load_balancing_weight.astype(str))
        if set(at.condition) != {"lb=0.01", "lb=0.0"}:
            continue
        metrics = (("train_dropped_fraction", "dropped slots", 100, " points", 1), ("val_perplexity", "val PPL", 1, " PPL", 2))
        for metric, name, scale, unit, digits in metrics[1:] if cf is None else metrics:  # dropless drops nothing
            cmp = paired_comparison(at, baseline="lb=0.0", metric=metric).set_index("condition").loc["lb=0.01"]
            diffs = scale * paired_differences(at, baseline="lb=0.0", metric=metric).difference.to_numpy(dtype=float)
            lines.append(
                f"cf={capacity_label(cf)}, lb 0.01 vs 0: {name} {scale * cmp.baseline_mean:.{digits}f} without load balancing vs "
                f"{scale * cmp.treatment_mean:.{digits}f} with it, paired difference {scale * cmp.mean_difference:+.{digits}f}{unit}, "
                f"{ci_text(scale * cmp.difference_ci_low, scale * cmp.difference_ci_high, digits, unit)}: "
                f"{significance(cmp.difference_ci_low, cmp.difference_ci_high, diffs, digits, unit)}."
            )
    for lb, part in r.groupby("load_balancing_weight", sort=False):
        part = part.assign(condition=part.cf)
        if "dropless" not in set(part.condition):
            continue
        for cf in sorted(part.capacity_factor.dropna().unique()):
            label = capacity_label(cf)
            if n_seeds >= 2:
                cmp = paired_comparison(part, baseline="dropless", metric="val_perplexity").set_index("condition").loc[label]
                diffs = paired_differences(part, baseline="dropless", metric="val_perplexity")
                diffs = diffs[diffs.condition == label].difference.to_numpy(dtype=float)
                lines.append(
                    f"lb={lb}, cf={label} vs dropless: val PPL {cmp.treatment_mean:.2f} vs {cmp.baseline_mean:.2f}, paired difference "
                    f"{cmp.mean_difference:+.2f} PPL, {ci_text(cmp.difference_ci_low, cmp.difference_ci_high)}: "
                    f"{significance(cmp.difference_ci_low, cmp.difference_ci_high, diffs, 2, ' PPL')}."
                )
                continue
            base = part[part.condition == "dropless"].val_perplexity.mean()
            value = part[part.condition == label].val_perplexity.mean()
            diff = value - base
            noise = ""
            if seed_std is not None and pd.notna(seed_std):
                noise = f"; {'more' if abs(diff) > 2 * seed_std else 'less'} than 2 seed-std ({2 * seed_std:.2f} PPL) of the dropless model"
            lines.append(f"lb={lb}, cf={label}: val PPL {value:.2f} vs dropless {base:.2f} ({diff:+.2f}, {100 * diff / base:+.1f}%{noise}).")
    if n_seeds >= 2 and r.cf.nunique() >= 2 and r.load_balancing_weight.nunique() >= 2:
        anova = factorial_anova(r, "val_perplexity", ["cf", "load_balancing_weight"], block="seed", log=True)
        lines += anova_lines(anova.rename(index=lambda term: term.replace("cf", "capacity factor")), "val_perplexity")
    fast = r[r.capacity_factor == r.capacity_factor.min()].ms_per_step.mean()
    slow = r[r.capacity_factor.isna()].ms_per_step.mean()
    if pd.notna(fast) and pd.notna(slow):
        lines.append(
            f"Time per step: {fast:.0f} ms at cf={capacity_label(r.capacity_factor.min())} vs {slow:.0f} ms dropless "
            "(wall-clock on this machine; on shared CPUs a rough guide only)."
        )
    return lines + overfit_lines(study.results)
