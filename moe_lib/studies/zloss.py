"""Notebook 04's study: baseline, z-loss 0.001, z-loss 0.001 without router noise, z-loss 0.01 (the
z-loss tutorial; the original ran one seed, we run several). Its grid, table and verdicts.
"""

from __future__ import annotations

import pandas as pd

from ..runs import Grid
from ..profiles import Profile
from ..stats import mean_std_text, paired_comparison
from . import originals
from .result import StudyResult, conditions, pair_values, paired_table
from .verdicts import (VERDICT_METRIC, change_text, ci_text, holm_sentence, interval_cell, interval_side, overfit_lines, p_text,
                       scale_sentence, significance)


ZLOSS_CONDITIONS = {
    "baseline": {"z_loss_weight": 0.0, "noise_std": 0.1},
    "z=0.001": {"z_loss_weight": 0.001, "noise_std": 0.1},
    "z=0.001, no noise": {"z_loss_weight": 0.001, "noise_std": 0.0},
    "z=0.01": {"z_loss_weight": 0.01, "noise_std": 0.1},
}


def zloss_grid(profile: Profile, seeds=None) -> Grid:
    """The z-loss tutorial's four runs (load balancing 0.01 throughout), on several seeds.

    ``profile.zloss_steps`` long. The original trained 1,000 steps; the gpu profile trains 400,
    as its other studies do. At 1,000 steps on the embedded corpus (Shakespeare: its 1.36M-token
    GPT-2 training split seen 9 times; :func:`moe_lib.studies.comparison.scale_statement`), all 8
    stored gpu runs (results/gpu/zloss/history) reached their best validation loss at step 400-500
    and then rose by 0.62 nats while the training loss fell to about 1.4: their final test
    perplexity measured memorisation, not z-loss. With 400 steps the cosine schedule ends where
    validation bottoms out: in all 36 stored 400-step gpu runs (routing, noise) the last
    validation is the best. Fewer steps rather than the best checkpoint on test, so that every
    number of the study (test, routing statistics, logit sizes) describes one model, the final
    one; ``overfit`` in each row checks it.
    """
    base = profile.base.with_train(optimizer="muon", steps=profile.zloss_steps).with_model(load_balancing_weight=0.01)
    return Grid.from_conditions("zloss", base, ZLOSS_CONDITIONS, seeds or profile.seeds, baseline="baseline")


def zloss_table(study: StudyResult) -> pd.DataFrame:
    """Test PPL, paired improvement vs baseline with its CI and p-value, ms/step, router entropy and logsumexp."""
    paired = paired_table(study, VERDICT_METRIC, study.grid.baseline)
    rows = []
    for condition in conditions(study):
        part = study.results[study.results.condition == condition]
        row = {
            "condition": condition,
            "seeds": len(part),
            "test PPL": mean_std_text(part.test_perplexity, 2),
            "improvement vs baseline": "–",
            "improvement 95% CI": "–",
            "p (paired t)": "–",
            "ms/step": f"{part.ms_per_step.mean():.0f}",
            "router entropy": mean_std_text(part.router_entropy, 3),
            "router logsumexp": mean_std_text(part.router_logsumexp, 3),
        }
        if condition in paired.index:
            c = paired.loc[condition]
            row.update({
                "improvement vs baseline": f"{c.improvement_pct:+.2f}%",
                "improvement 95% CI": interval_cell(c.improvement_pct_ci_low, c.improvement_pct_ci_high, 2, "%", "+"),
                "p (paired t)": p_text(c.p_value),
            })
        rows.append(row)
    return pd.DataFrame(rows).set_index("condition")


def _versus_reported(inside: bool, below: bool, improvement: float) -> str:
    if inside:
        return ": our runs are consistent with it."
    if not below:
        return ": at this scale z=0.01 helped more than reported."
    mean = f"mean improvement {improvement:+.2f}%" if improvement >= 0 else f"mean {-improvement:.2f}% worse than the baseline"
    return f": at this scale z=0.01 helped less than reported ({mean})."


def zloss_verdicts(study: StudyResult) -> list[str]:
    paired = paired_table(study, VERDICT_METRIC, study.grid.baseline)
    r = study.results
    base_lse = r[r.condition == study.grid.baseline].router_logsumexp.mean()
    base_h = r[r.condition == study.grid.baseline].router_entropy.mean()
    lines = []
    for condition, c in paired.iterrows():
        part = r[r.condition == condition]
        lines.append(
            f"{condition}: test PPL {abs(c.improvement_pct):.2f}% {'lower' if c.improvement_pct > 0 else 'higher'} than the baseline's "
            f"(improvement {c.improvement_pct:+.2f}%, {ci_text(c.improvement_pct_ci_low, c.improvement_pct_ci_high, 2, '%')}, "
            f"p = {p_text(c.p_value)}, {int(c.n_pairs)} paired seeds): "
            f"{significance(c.improvement_pct_ci_low, c.improvement_pct_ci_high, pair_values(study, VERDICT_METRIC, study.grid.baseline, condition, 'improvement_pct'), 2, '%')}. Router logsumexp {part.router_logsumexp.mean():.3f} "
            f"vs baseline {base_lse:.3f}; entropy {part.router_entropy.mean():.3f} vs {base_h:.3f} nats."
        )
    # "Confidence": does z-loss lower the routing entropy (the original's claim) or raise it (the gradient's direction)?
    entropy = paired_table(study, "router_entropy", study.grid.baseline)
    for condition, c in entropy.iterrows():
        diffs = pair_values(study, "router_entropy", study.grid.baseline, condition)
        if c.difference_ci_high < 0:
            reading = "more confident routing, as the original claimed"
        elif c.difference_ci_low > 0:
            reading = "less confident routing, the direction the gradient 2 LSE p_i predicts"
        else:
            reading = significance(c.difference_ci_low, c.difference_ci_high, diffs, 3, " nats")
        lines.append(
            f"{condition}: routing entropy {c.mean_difference:+.3f} nats vs the baseline (seed-paired, "
            f"{ci_text(c.difference_ci_low, c.difference_ci_high, 3)}): {reading}."
        )
    c = paired.loc["z=0.01"]
    reported = originals.ZLOSS.improvement_pct["z=0.01"]
    inside = c.improvement_pct_ci_low <= reported <= c.improvement_pct_ci_high
    if pd.isna(c.improvement_pct_ci_low) or pd.isna(c.improvement_pct_ci_high):
        lines.append(
            f"The original reported a {reported:.1f}% lower test PPL at z=0.01 (improvement {reported:+.1f}%, one seed). "
            f"Ours is {c.improvement_pct:+.2f}% on {int(c.n_pairs)} paired seed(s): too few for an interval, so no comparison."
        )
        return lines + overfit_lines(study.results)
    lines.append(
        f"The original reported a {reported:.1f}% lower test PPL at z=0.01 (improvement {reported:+.1f}%, one seed). "
        f"That is {'inside' if inside else 'outside'} "
        f"our 95% CI for the improvement, [{c.improvement_pct_ci_low:+.2f}%, {c.improvement_pct_ci_high:+.2f}%]"
        + _versus_reported(inside, c.improvement_pct_ci_high < reported, c.improvement_pct)
    )
    return lines + overfit_lines(study.results)


# --------------------------------------------------------------------------- what we found
NO_NOISE = "z=0.001, no noise"
# The noise factorial's conditions that share this grid's design: its noise 0.1, lb 0.01 runs are this
# grid's baseline (same config), and its noise 0, lb 0.01 runs differ from NO_NOISE only in the z-loss.
NOISE_STUDY_TWIN = {"baseline": "noise=0.1, lb=0.01", NO_NOISE: "noise=0.0, lb=0.01"}


def _change(rows: pd.DataFrame, baseline: str, condition: str, metric: str) -> tuple[float, float, float, int] | None:
    """``(pct, low, high, n)``: the seed-paired % change in ``metric`` of ``condition`` vs ``baseline``; None without a pair."""
    paired = paired_comparison(rows, baseline=baseline, metric=metric).set_index("condition")
    if condition not in paired.index or paired.loc[condition].n_pairs == 0:
        return None
    c = paired.loc[condition]
    return -c.improvement_pct, -c.improvement_pct_ci_high, -c.improvement_pct_ci_low, int(c.n_pairs)


def same_design(study: StudyResult, noise_study: StudyResult | None) -> bool:
    """Whether ``noise_study``'s runs share this study's design apart from z: its noise 0.1, lb 0.01 runs have the
    config hashes of this study's baseline runs, seed by seed (the hash covers every setting, steps included)."""
    if noise_study is None or "config_hash" not in study.results or "config_hash" not in noise_study.results:
        return False
    mine = study.results[study.results.condition == "baseline"].set_index("seed").config_hash
    theirs = noise_study.results[noise_study.results.condition == NOISE_STUDY_TWIN["baseline"]].set_index("seed").config_hash
    return not mine.empty and mine.index.equals(theirs.index.intersection(mine.index)) and (theirs.reindex(mine.index) == mine).all()


def _twin_rows(study: StudyResult, noise_study: StudyResult) -> pd.DataFrame:
    """The no-noise z-loss runs beside the noise study's runs with the same settings and no z-loss, for pairing by seed."""
    twin = NOISE_STUDY_TWIN[NO_NOISE]
    return pd.concat([study.results[study.results.condition == NO_NOISE],
                      noise_study.results[noise_study.results.condition == twin].assign(condition=twin)], ignore_index=True)


def verdict_family(study: StudyResult, noise_study: StudyResult | None = None, metric: str = VERDICT_METRIC) -> list[tuple[str, float]]:
    """``(label, p)`` of every paired t-test this notebook's verdicts and findings make, for Holm's correction: each
    condition vs the baseline on ``metric`` and on the routing entropy, and the z-loss alone against the noise study's
    twin runs where :func:`same_design` holds."""
    family = [(f"{c} vs baseline, {what}", row.p_value)
              for column, what in ((metric, metric.replace("_", " ")), ("router_entropy", "routing entropy"))
              for c, row in paired_table(study, column, study.grid.baseline).iterrows()]
    if same_design(study, noise_study):
        twin = NOISE_STUDY_TWIN[NO_NOISE]
        paired = paired_comparison(_twin_rows(study, noise_study), baseline=twin, metric=metric).set_index("condition")
        if NO_NOISE in paired.index:
            family.append((f"the z-loss alone ({NO_NOISE} vs {twin}), {metric.replace('_', ' ')}", paired.loc[NO_NOISE].p_value))
    return family


def no_noise_sentence(study: StudyResult, noise_study: StudyResult | None, metric: str = VERDICT_METRIC) -> str:
    """z = 0.001 without router noise, against the right baseline (no noise, no z-loss) where the noise study has it,
    else the confound stated: against this grid's baseline it changes two factors at once."""
    name, label = study.profile.name, metric.replace("_", " ")
    confounded = _change(study.results, "baseline", NO_NOISE, metric)
    both = f"changed {label} by {change_text(*confounded)} against the baseline" if confounded else "has no paired run against the baseline"
    head = f"At the {name} profile, {NO_NOISE} {both}, but it differs from the baseline in two factors, z-loss added and router noise removed"
    if not same_design(study, noise_study):
        return f"{head}, and no stored run differs from it in the z-loss alone, so that change mixes both."
    twin = NOISE_STUDY_TWIN[NO_NOISE]
    right = _change(_twin_rows(study, noise_study), twin, NO_NOISE, metric)
    versus = change_text(*right) if right else "no seed run on both sides"
    return (f"{head}; against the noise study's {twin} runs (the same settings without the z-loss: its {NOISE_STUDY_TWIN['baseline']} "
            f"runs are this grid's baseline runs), the z-loss alone changed {label} by {versus}.")


def _scale_findings(study: StudyResult, noise_study: StudyResult | None, metric: str) -> tuple[list[str], dict[str, str]]:
    """One profile's sentences (the z-loss's effect with noise; the no-noise condition) and each effect's :func:`interval_side`."""
    r, label = study.results, metric.replace("_", " ")
    changes = {c: _change(r, "baseline", c, metric) for c in ("z=0.001", "z=0.01")}
    said = [f"{c} by {change_text(*v)}" if v else f"{c} was not run" for c, v in changes.items()]
    lse = r.groupby("condition", sort=False).router_logsumexp.mean()
    entropy = r.groupby("condition", sort=False).router_entropy.mean()
    others = [c for c in lse.index if c != "baseline"]
    cfg = study.grid.runs[0].config.train
    design = cfg.steps * cfg.batch_size * cfg.seq_len
    tokens = r.train_tokens.iloc[0] if "train_tokens" in r else design
    older = "" if tokens == design else f"; these runs trained {tokens:,.0f} tokens each, an older design: the grid now trains {design:,}"
    first = (
        f"At the {study.profile.name} profile ({len(r)} of the grid's {len(study.grid.runs)} runs{older}), against the baseline "
        f"(router noise 0.1, no z-loss) the z-loss changed {label}: {'; '.join(said)}; the router's mean log-sum-exp was "
        f"{lse.get('baseline', float('nan')):.2f} at the baseline ({'; '.join(f'{c}: {lse[c]:.2f}' for c in others)}) and its "
        f"routing entropy {entropy.get('baseline', float('nan')):.2f} nats ({'; '.join(f'{c}: {entropy[c]:.2f}' for c in others)})."
    )
    sides = {c: interval_side(v[1], v[2]) if v else "not run" for c, v in changes.items()}
    return [first, no_noise_sentence(study, noise_study, metric)], sides


def findings(cpu_study: StudyResult, gpu_study: StudyResult | None = None, cpu_noise: StudyResult | None = None,
             gpu_noise: StudyResult | None = None, metric: str = VERDICT_METRIC) -> list[str]:
    """Notebook 04's "What we found": at most 6 plain sentences with their numbers, computed from the z-loss studies'
    results (cpu and, where stored, gpu) and, for the right baseline of the no-noise condition, the noise studies'."""
    cpu_lines, cpu_sides = _scale_findings(cpu_study, cpu_noise, metric)
    families = {cpu_study.profile.name: verdict_family(cpu_study, cpu_noise, metric)}
    if gpu_study is None:
        return cpu_lines + [holm_sentence(families),
                            f"No gpu results are stored for this study, so this holds at the {cpu_study.profile.name} profile only."]
    gpu_lines, gpu_sides = _scale_findings(gpu_study, gpu_noise, metric)
    families[gpu_study.profile.name] = verdict_family(gpu_study, gpu_noise, metric)
    sides = {c: (cpu_sides[c], gpu_sides[c]) for c in cpu_sides}
    return cpu_lines + gpu_lines + [holm_sentence(families), scale_sentence(sides, cpu_study.profile.name, gpu_study.profile.name)]
