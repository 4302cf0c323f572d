"""Notebook 04's study: baseline, z-loss 0.001, z-loss 0.001 without router noise, z-loss 0.01 (the
z-loss tutorial; the original ran one seed, we run several). Its grid, table and verdicts.
"""

from __future__ import annotations

import pandas as pd

from ..runs import Grid
from ..profiles import Profile
from ..stats import mean_std_text
from . import originals
from .result import StudyResult, conditions, pair_values, paired_table
from .verdicts import ci_text, interval_cell, overfit_lines, p_text, significance


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
    paired = paired_table(study, "test_perplexity", study.grid.baseline)
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
    paired = paired_table(study, "test_perplexity", study.grid.baseline)
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
            f"{significance(c.improvement_pct_ci_low, c.improvement_pct_ci_high, pair_values(study, 'test_perplexity', study.grid.baseline, condition, 'improvement_pct'), 2, '%')}. Router logsumexp {part.router_logsumexp.mean():.3f} "
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
