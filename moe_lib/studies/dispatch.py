"""Notebook 06's study: the same model trained with the sort + grouped-GEMM dispatch and with the
reference loop over experts. Its grid and table.
"""

from __future__ import annotations

import pandas as pd

from ..runs import Grid
from ..profiles import Profile
from .result import StudyResult, conditions


DISPATCH_SEED = 42


def dispatch_grid(profile: Profile, seeds=None) -> Grid:
    """The same model trained twice, with the sort + grouped-GEMM dispatch and with the reference
    loop over experts, on one seed (42) unless seeds are given: same maths, different speed."""
    base = profile.base.with_model(top_k=2, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0)
    conditions = {d: {"dispatch": d} for d in ("grouped", "loop")}
    return Grid.from_conditions("dispatch", base, conditions, seeds or (DISPATCH_SEED,), baseline="loop", compares_time=True)


def dispatch_table(study: StudyResult) -> pd.DataFrame:
    """Per dispatch: ms/step, tokens/s, test loss, and the largest gap in logged training loss to
    the other dispatch on the same seed (the two compute the same function; float rounding differs)."""
    h = study.histories
    rows = []
    for condition in conditions(study):
        part = study.results[study.results.condition == condition]
        gaps = []
        for seed in part.seed:
            mine = h[(h.condition == condition) & (h.seed == seed)].set_index("step").lm_loss
            other = h[(h.condition != condition) & (h.seed == seed)].set_index("step").lm_loss
            if len(other):
                gaps.append((mine - other).abs().max())
        rows.append({
            "dispatch": condition,
            "seeds": len(part),
            "ms/step": f"{part.ms_per_step.mean():.0f}",
            "tokens/s": f"{part.tokens_per_second.mean():,.0f}",
            "test loss": f"{part.test_loss.mean():.4f}",
            "max |train loss gap|": f"{max(gaps):.2e}" if gaps else "–",
        })
    return pd.DataFrame(rows).set_index("dispatch")
