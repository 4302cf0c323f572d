"""Notebook 06's capacity study: capacity factor {1.0, 1.25, dropless} x load balancing {0.01, 0} on the
profile's seeds, the token-dropping trade-off of GShard and Switch, lb on/off paired by seed.

Its grid, table and verdicts (on the course's verdict metric, test perplexity, and on the dropped
fraction), the family of tests those verdicts make (for Holm's correction), the reconciliation of the
dropped fraction measured in training with the one a capacity would impose post hoc on a dropless
model's routing, and the notebook's findings.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from ..data import eval_batches
from ..files import atomic_write_text
from ..moe.experts import capacity_keep_mask, expert_capacity
from ..moe.model import MoETransformer
from ..profiles import Profile, output_paths
from ..runs import Grid
from ..stats import capacity_label, factorial_anova, holm_adjusted, mean_std_text, paired_comparison, paired_differences
from ..training.checkpoint import load_checkpoint
from ..training.loop import load_data
from .noise import LB_WEIGHTS
from .result import StudyResult, checkpoint_dir, conditions
from .specialization import SPECIALIZATION_ROUTERS
from .verdicts import VERDICT_METRIC, anova_lines, change_text, ci_text, overfit_lines, significance

GRID = "capacity"
CAPACITY_FACTORS: tuple[float | None, ...] = (1.0, 1.25, None)  # None = dropless
LB_ON, LB_OFF = LB_WEIGHTS
DROPPED = "train_dropped_fraction"  # slots dropped at the run's capacity factor, mean over training steps and layers
RECONCILED_FACTORS = (1.0, 1.25)
RECONCILIATION_FILE = "analysis_reconciliation.csv"
POSTHOC_BATCHES = 16
# The specialization study's learned top-2 runs are this study's dropless lb 0.01 configuration, checkpoints kept.
DROPLESS_TWIN = next(label for label, router in SPECIALIZATION_ROUTERS.items() if router == "topk")


def capacity_grid(profile: Profile, seeds=None) -> Grid:
    """capacity_factor x load_balancing_weight, learned top-2, on the profile's seeds.

    Three levels x two lb weights x 3 seeds = 18 runs, about 14 minutes on the cpu profile: seeds
    pair lb on/off at each capacity factor, so their difference comes with a confidence interval.
    cf 1.0 (buffers exactly the even share) and 1.25 (Switch's default) are where lb can matter.
    """
    base = profile.base.with_model(top_k=2, router="topk", noise_std=0.0, z_loss_weight=0.0)
    levels = {
        f"cf={capacity_label(cf)}, lb={lb}": {"capacity_factor": cf, "load_balancing_weight": lb}
        for lb, cf in itertools.product(LB_WEIGHTS, CAPACITY_FACTORS)
    }
    return Grid.from_conditions(GRID, base, levels, seeds or profile.seeds, baseline=f"cf=dropless, lb={LB_ON}", compares_time=True)


def metric_name(metric: str) -> str:
    """``"test_perplexity"`` -> ``"test PPL"``: a metric's short name in tables and verdicts."""
    return metric.replace("_perplexity", " PPL").replace("_", " ")


def capacity_table(study: StudyResult, metric: str = VERDICT_METRIC) -> pd.DataFrame:
    """Per condition: dropped slots (in training at the run's capacity factor, mean over steps; mean over
    layers and per layer), the floor ``1 - cf`` that any routing must drop when cf < 1, validation and
    ``metric`` perplexity (evaluation is dropless, ``ModelConfig.capacity_factor_eval``) and the change of
    ``metric`` vs dropless at the same lb."""
    r = study.results
    layer_cols = sorted((c for c in r.columns if c.startswith("train_dropped_L")), key=lambda c: int(c.rsplit("L", 1)[1]))
    rows = []
    for condition in conditions(study):
        part = r[r.condition == condition]
        cf, lb = part.capacity_factor.iloc[0], part.load_balancing_weight.iloc[0]
        dropless = r[(r.capacity_factor.isna()) & (r.load_balancing_weight == lb)]
        rows.append({
            "capacity factor": capacity_label(cf),
            "lb weight": lb,
            "seeds": len(part),
            "dropped (%)": f"{100 * part[DROPPED].mean():.2f}",
            "dropped per layer (%)": " ".join(f"{100 * part[c].mean():.1f}" for c in layer_cols),
            "floor 1 - cf (%)": f"{100 * max(0.0, 1 - cf):.0f}" if pd.notna(cf) else "0",
            "val PPL": mean_std_text(part.val_perplexity, 2),
            metric_name(metric): mean_std_text(part[metric], 2),
            "vs dropless": f"{100 * (part[metric].mean() / dropless[metric].mean() - 1):+.1f}%" if len(dropless) else "–",
            "ms/step": f"{part.ms_per_step.mean():.0f}",
        })
    return pd.DataFrame(rows).set_index(["capacity factor", "lb weight"])


# --------------------------------------------------------------------------- the seed-paired tests
def paired(rows: pd.DataFrame, baseline: str, condition: str, metric: str) -> tuple[pd.Series, np.ndarray] | None:
    """``condition`` vs ``baseline`` among ``rows`` (a ``condition`` column), paired by seed: the
    :func:`~moe_lib.stats.paired_comparison` row and the per-seed differences; None when either is absent."""
    if not {baseline, condition} <= set(rows.condition):
        return None
    comparison = paired_comparison(rows, baseline=baseline, metric=metric).set_index("condition").loc[condition]
    pairs = paired_differences(rows, baseline=baseline, metric=metric)
    return comparison, pairs[pairs.condition == condition].difference.to_numpy(dtype=float)


def lb_comparison(results: pd.DataFrame, cf: float | None, metric: str = VERDICT_METRIC):
    """lb 0.01 against lb 0 at capacity factor ``cf`` (None: dropless), seed-paired (:func:`paired`)."""
    at = results[results.capacity_factor.isna()] if cf is None else results[results.capacity_factor == cf]
    return paired(at.assign(condition="lb=" + at.load_balancing_weight.astype(str)), f"lb={LB_OFF}", f"lb={LB_ON}", metric)


def dropless_comparison(results: pd.DataFrame, cf: float, lb: float, metric: str = VERDICT_METRIC):
    """Capacity factor ``cf`` against dropless at the same lb weight, seed-paired (:func:`paired`)."""
    at = results[results.load_balancing_weight == lb]
    return paired(at.assign(condition=at.capacity_factor.map(capacity_label)), "dropless", capacity_label(cf), metric)


def capacity_anova(results: pd.DataFrame, metric: str = VERDICT_METRIC) -> pd.DataFrame | None:
    """The 3 x 2 factorial's two-way ANOVA on log ``metric``, seed as a block; None with one seed or one level."""
    r = results.assign(cf=results.capacity_factor.map(capacity_label))
    if r.seed.nunique() < 2 or r.cf.nunique() < 2 or r.load_balancing_weight.nunique() < 2:
        return None
    anova = factorial_anova(r, metric, ["cf", "load_balancing_weight"], block="seed", log=True)
    return anova.rename(index=lambda term: term.replace("cf", "capacity factor"))


def finite_factors(results: pd.DataFrame) -> list[float]:
    return sorted(results.capacity_factor.dropna().unique())


def verdict_family(study: StudyResult, metric: str = VERDICT_METRIC) -> list[tuple[str, float]]:
    """``(label, p)`` of every test this notebook's verdicts make, for :func:`~moe_lib.studies.verdicts.family_table`
    (Holm): lb on vs off at each capacity factor on the dropped fraction (finite cf) and on ``metric`` (every cf),
    each finite cf vs dropless at the same lb on ``metric`` (seed-paired t-tests), and the two-way ANOVA's terms."""
    r, family, name = study.results, [], metric_name(metric)
    for cf in finite_factors(r):
        if (test := lb_comparison(r, cf, DROPPED)) is not None:
            family.append((f"lb {LB_ON:g} vs {LB_OFF:g} at cf {capacity_label(cf)}, dropped fraction", float(test[0].p_value)))
    for cf in [*finite_factors(r), None]:
        if (test := lb_comparison(r, cf, metric)) is not None:
            family.append((f"lb {LB_ON:g} vs {LB_OFF:g} at cf {capacity_label(cf)}, {name}", float(test[0].p_value)))
    for lb, cf in itertools.product(LB_WEIGHTS, finite_factors(r)):
        if (test := dropless_comparison(r, cf, lb, metric)) is not None:
            family.append((f"cf {capacity_label(cf)} vs dropless at lb {lb:g}, {name}", float(test[0].p_value)))
    anova = capacity_anova(r, metric)
    if anova is not None:
        for term in anova.index.drop(["Residual", "seed"], errors="ignore"):
            family.append((f"ANOVA on log {name}: {term.replace(':', ' x ')}", float(anova.loc[term, "PR(>F)"])))
    return family


# --------------------------------------------------------------------------- verdicts
def capacity_verdicts(study: StudyResult, seed_std: float | None = None, threshold: float = 0.01, metric: str = VERDICT_METRIC) -> list[str]:
    """Findings computed from the capacity sweep, seed means with seed-paired 95% CIs where there are seeds.

    ``seed_std``: with one seed only, the seed-to-seed std of ``metric`` of the dropless lb 0.01
    configuration (from a multi-seed study), the yardstick for a one-seed difference.
    """
    r, name = study.results, metric_name(metric)
    lines = []
    for (cf, lb), part in r[r.capacity_factor < 1].groupby(["capacity_factor", "load_balancing_weight"], sort=False):
        floor = 1 - cf
        lines.append(
            f"cf={capacity_label(cf)}, lb={lb}: {100 * part[DROPPED].mean():.1f}% of slots dropped (mean of {len(part)} seed(s)); "
            f"the experts hold at most ceil(cf N k / E) x E ~ {100 * cf:.0f}% of the routed slots, so at least "
            f"{100 * floor:.0f}% must drop: {'consistent' if (part[DROPPED] >= floor - 1e-6).all() else 'INCONSISTENT'} with the formula."
        )
    for lb, part in r.groupby("load_balancing_weight", sort=False):
        means = part.dropna(subset=["capacity_factor"]).groupby("capacity_factor")[DROPPED].mean().sort_index()
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
    measures = ((DROPPED, "dropped slots", 100, " points", 1), (metric, name, 1, " PPL", 2))
    for cf in [*finite_factors(r), None]:
        for column, label, scale, unit, digits in measures[1:] if cf is None else measures:  # dropless drops nothing
            if (test := lb_comparison(r, cf, column)) is None:
                continue
            cmp, diffs = test
            lines.append(
                f"cf={capacity_label(cf)}, lb {LB_ON} vs {LB_OFF:g}: {label} {scale * cmp.baseline_mean:.{digits}f} without load balancing vs "
                f"{scale * cmp.treatment_mean:.{digits}f} with it, paired difference {scale * cmp.mean_difference:+.{digits}f}{unit}, "
                f"{ci_text(scale * cmp.difference_ci_low, scale * cmp.difference_ci_high, digits, unit)}: "
                f"{significance(cmp.difference_ci_low, cmp.difference_ci_high, scale * diffs, digits, unit)}."
            )
    for lb in r.load_balancing_weight.unique():
        for cf in finite_factors(r):
            if (test := dropless_comparison(r, cf, lb, metric)) is None:
                continue
            cmp, diffs = test
            label = capacity_label(cf)
            if r.seed.nunique() >= 2:
                lines.append(
                    f"lb={lb}, cf={label} vs dropless: {name} {cmp.treatment_mean:.2f} vs {cmp.baseline_mean:.2f}, paired difference "
                    f"{cmp.mean_difference:+.2f} PPL, {ci_text(cmp.difference_ci_low, cmp.difference_ci_high)}: "
                    f"{significance(cmp.difference_ci_low, cmp.difference_ci_high, diffs, 2, ' PPL')}."
                )
                continue
            diff = cmp.mean_difference
            noise = ""
            if seed_std is not None and pd.notna(seed_std):
                noise = f"; {'more' if abs(diff) > 2 * seed_std else 'less'} than 2 seed-std ({2 * seed_std:.2f} PPL) of the dropless model"
            lines.append(f"lb={lb}, cf={label}: {name} {cmp.treatment_mean:.2f} vs dropless {cmp.baseline_mean:.2f} "
                         f"({diff:+.2f}, {100 * diff / cmp.baseline_mean:+.1f}%{noise}).")
    anova = capacity_anova(r, metric)
    if anova is not None:
        lines += anova_lines(anova, metric)
    fast = r[r.capacity_factor == r.capacity_factor.min()].ms_per_step.mean()
    slow = r[r.capacity_factor.isna()].ms_per_step.mean()
    if pd.notna(fast) and pd.notna(slow):
        lines.append(
            f"Time per step: {fast:.0f} ms at cf={capacity_label(r.capacity_factor.min())} vs {slow:.0f} ms dropless "
            "(wall-clock on this machine; on shared CPUs a rough guide only)."
        )
    return lines + overfit_lines(study.results)


# --------------------------------------------------------------------------- reconciling the two dropped fractions
def second_half_dropped(histories: pd.DataFrame) -> pd.Series:
    """Per ``run_id``: the dropped fraction of the training batches (mean of the layers' ``dropped_L<n>``) averaged
    over the logged steps in the second half of the run (step > last logged step / 2)."""
    layers = [c for c in histories.columns if re.fullmatch(r"dropped_L\d+", c)]
    if not layers:
        raise ValueError(f"the histories have no dropped_L<n> columns; columns: {list(histories.columns)}")
    logged = histories.dropna(subset=layers)
    late = logged[logged.step > logged.groupby("run_id").step.transform("max") / 2]
    return late[layers].mean(axis=1).groupby(late.run_id).mean()


@torch.no_grad()
def posthoc_dropped_fraction(model: MoETransformer, batches: Iterable, capacity_factor: float) -> float:
    """The share of routed slots a capacity ``C = ceil(cf N k / E)`` would drop from ``model``'s own dropless routing:
    each layer's ``[N, k]`` choices on each batch through :func:`~moe_lib.moe.experts.capacity_keep_mask` (training's
    queue), ``1 - kept / routed`` pooled over batches and layers. No slot is actually dropped, so every layer routes
    what a dropless model computes. ``batches``: ``(inputs, targets)`` pairs as ``eval_batches`` yields (targets unused);
    give them training's micro-batch shape so that N, and so C, is training's."""
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: expected a number > 0 (None, dropless, drops nothing)")
    if model.cfg.capacity_factor_eval is not None or model.cfg.router == "expert_choice":
        raise ValueError(f"the model has router={model.cfg.router!r}, capacity_factor_eval={model.cfg.capacity_factor_eval!r}: "
                         "expected a token-choice router ('topk' or 'random') evaluated dropless (capacity_factor_eval=None)")
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    kept = routed = 0
    try:
        for inputs, _ in batches:
            for routing in model(inputs.to(device)).routing:
                n, k = routing.expert_indices.shape
                capacity = expert_capacity(n, k, model.cfg.num_experts, capacity_factor)
                kept += int(capacity_keep_mask(routing.expert_indices, model.cfg.num_experts, capacity).sum())
                routed += n * k
    finally:
        model.train(was_training)
    if routed == 0:
        raise ValueError("no routed slots: batches is empty or the model has no MoE layer")
    return 1 - kept / routed


def posthoc_drops(dropless_study: StudyResult, capacity_factors=RECONCILED_FACTORS, split: str = "test",
                  max_batches: int = POSTHOC_BATCHES) -> pd.DataFrame | None:
    """:func:`posthoc_dropped_fraction` of each stored checkpoint of ``dropless_study``'s :data:`DROPLESS_TWIN` runs
    (the specialization study: this study's dropless lb 0.01 configuration) at each capacity factor, on the first
    ``max_batches`` full batches of ``split`` in training's batch shape. Columns ``seed``, ``capacity_factor``,
    ``posthoc_dropped_fraction``; None when no checkpoint is stored (nothing is trained)."""
    rows = []
    for run in dropless_study.grid.runs:
        if run.condition != DROPLESS_TWIN:
            continue
        try:
            path = checkpoint_dir(dropless_study, run.condition, run.seed, train_if_missing=False)
        except FileNotFoundError:
            continue
        model, config, _ = load_checkpoint(path)
        tokens = getattr(load_data(config.data), split).tokens
        batches = [b for b in eval_batches(tokens, config.train.seq_len, config.train.batch_size, max_batches) if bool((b[1] != -100).all())]
        for cf in capacity_factors:
            rows.append({"seed": run.seed, "capacity_factor": cf, "posthoc_dropped_fraction": posthoc_dropped_fraction(model, batches, cf)})
    return pd.DataFrame(rows) if rows else None


def drop_reconciliation(study: StudyResult, posthoc: pd.DataFrame | None = None, capacity_factors=RECONCILED_FACTORS,
                        load_balancing_weight: float = LB_ON) -> pd.DataFrame:
    """One row per capacity factor at ``load_balancing_weight``, seed means of three dropped fractions:
    ``train_all_steps`` (what the results row stores: every training step), ``train_second_half`` (the logged
    steps of the second half, :func:`second_half_dropped`) and ``posthoc_dropless`` (:func:`posthoc_drops`; NaN
    without it), with ``n_seeds`` and ``n_posthoc``."""
    r = study.results
    late = second_half_dropped(study.histories)
    rows = []
    for cf in capacity_factors:
        part = r[(r.capacity_factor == cf) & (r.load_balancing_weight == load_balancing_weight)]
        after = posthoc[posthoc.capacity_factor == cf] if posthoc is not None else pd.DataFrame(columns=["posthoc_dropped_fraction"])
        rows.append({
            "capacity_factor": cf, "load_balancing_weight": load_balancing_weight, "n_seeds": len(part),
            "train_all_steps": part[DROPPED].mean(), "train_second_half": late.reindex(part.run_id).mean(),
            "posthoc_dropless": after.posthoc_dropped_fraction.mean() if len(after) else float("nan"), "n_posthoc": len(after),
        })
    return pd.DataFrame(rows)


def reconciliation_path(profile: Profile) -> Path:
    """``results/<profile>/capacity/analysis_reconciliation.csv``."""
    return output_paths(profile).results / GRID / RECONCILIATION_FILE


def save_reconciliation(table: pd.DataFrame, profile: Profile) -> Path:
    """Write :func:`drop_reconciliation`'s table atomically where :func:`stored_reconciliation` reads it."""
    path = reconciliation_path(profile)
    atomic_write_text(path, table.to_csv(index=False))
    return path


def stored_reconciliation(profile: Profile) -> pd.DataFrame | None:
    """The stored :func:`drop_reconciliation` table of ``profile``, None when there is none."""
    path = reconciliation_path(profile)
    return pd.read_csv(path) if path.is_file() else None


# --------------------------------------------------------------------------- what we found
def series_text(parts: list[str], sep: str = ", ") -> str:
    """``"a, b and c"``."""
    if not parts:
        return "nothing (no seed-paired runs)"
    return parts[0] if len(parts) < 2 else sep.join(parts[:-1]) + " and " + parts[-1]


def lb_effects(results: pd.DataFrame, metric: str) -> str:
    """``"+1.2% (95% CI ...) at cf 1.0, ..."``: lb 0.01 vs 0 on ``metric`` at each capacity factor, as
    :func:`~moe_lib.studies.verdicts.change_text` (dropped fraction in points, a perplexity in %)."""
    parts = []
    for cf in finite_factors(results) + ([] if metric == DROPPED else [None]):
        if (test := lb_comparison(results, cf, metric)) is None:
            continue
        c, diffs = test
        if metric == DROPPED:
            text = change_text(100 * c.mean_difference, 100 * c.difference_ci_low, 100 * c.difference_ci_high, len(diffs), " points")
        else:
            text = change_text(-c.improvement_pct, -c.improvement_pct_ci_high, -c.improvement_pct_ci_low, len(diffs))
        parts.append(f"{text} {'dropless' if cf is None else f'at cf {capacity_label(cf)}'}")
    return series_text(parts)


def dropless_effects(results: pd.DataFrame, metric: str) -> str:
    """Each finite capacity factor vs dropless at each lb on ``metric``, as % changes with their CI."""
    parts = []
    for cf, lb in itertools.product(finite_factors(results), LB_WEIGHTS):
        if (test := dropless_comparison(results, cf, lb, metric)) is not None:
            c, diffs = test
            parts.append(f"cf {capacity_label(cf)} at lb {lb:g} by "
                         f"{change_text(-c.improvement_pct, -c.improvement_pct_ci_high, -c.improvement_pct_ci_low, len(diffs))}")
    return series_text(parts, "; ")


def holm_counts(study: StudyResult, metric: str) -> tuple[int, list[str], int]:
    """``(tests, significant after Holm, significant only uncorrected)`` over :func:`verdict_family` at level 0.05."""
    family = verdict_family(study, metric)
    holm = holm_adjusted([p for _, p in family])
    kept = [label for (label, _), q in zip(family, holm) if q < 0.05]
    return len(family), kept, sum(1 for (_, p), q in zip(family, holm) if p < 0.05 and not q < 0.05)


def holm_sentence(study: StudyResult, metric: str) -> str:
    """How many of :func:`verdict_family`'s tests survive Holm's correction, and which."""
    tests, kept, uncorrected = holm_counts(study, metric)
    if study.results.seed.nunique() < 2:
        return f"With one seed none of the {tests} tests in this notebook's verdicts has a p-value, so Holm's correction has nothing to correct."
    return (f"Of the {tests} tests in this notebook's verdicts, {len(kept)} {'stays' if len(kept) == 1 else 'stay'} "
            f"significant after Holm's correction{' (' + '; '.join(kept) + ')' if kept else ''} and {uncorrected} more "
            f"{'has' if uncorrected == 1 else 'have'} p < 0.05 only uncorrected.")


def reconciliation_sentence(table: pd.DataFrame) -> str:
    """The reconciliation table's first row (the tightest capacity factor) in one sentence."""
    row = table.sort_values("capacity_factor").iloc[0]
    head = (f"At cf {capacity_label(row.capacity_factor)} and lb {row.load_balancing_weight:g}, training dropped "
            f"{100 * row.train_all_steps:.1f}% of slots averaged over all steps and {100 * row.train_second_half:.1f}% over "
            "the second half")
    if pd.isna(row.posthoc_dropless):
        return head + "; the post hoc fraction on a dropless model needs the specialization study's checkpoints, which are not stored here."
    return (head + f", while the same capacity applied post hoc to the routing of the dropless model (no drops in training) "
            f"would drop {100 * row.posthoc_dropless:.1f}%.")


def findings(cpu_study: StudyResult, gpu_study: StudyResult | None = None, reconciliation: pd.DataFrame | None = None,
             metric: str = VERDICT_METRIC) -> list[str]:
    """Notebook 06's "What we found": at most 6 plain sentences with their numbers, from the stored studies (cpu,
    and gpu where stored) and the stored :func:`drop_reconciliation` table (else its training columns, computed)."""
    r, name = cpu_study.results, metric.replace("_", " ")
    lines = [
        f"At the {cpu_study.profile.name} profile ({len(r)} runs), the load-balancing loss (lb {LB_ON:g} vs {LB_OFF:g}, paired by seed) "
        f"changed the share of slots dropped in training by {lb_effects(r, DROPPED)}.",
        f"It changed {name} by {lb_effects(r, metric)}.",
        f"Against dropless training at the same lb, {name} changed with {dropless_effects(r, metric)}.",
        holm_sentence(cpu_study, metric),
        reconciliation_sentence(reconciliation if reconciliation is not None else drop_reconciliation(cpu_study)),
    ]
    if gpu_study is None:
        return lines + [f"The gpu runs of this study are missing, so these findings hold at the {cpu_study.profile.name} profile only."]
    g = gpu_study.results
    tests, kept, _ = holm_counts(gpu_study, metric)
    return lines + [
        f"At the {gpu_study.profile.name} profile ({len(g)} runs), the load-balancing loss changed the dropped share by "
        f"{lb_effects(g, DROPPED)} and {name} by {lb_effects(g, metric)}; {len(kept)} of its {tests} tests survive Holm's correction."
    ]
