"""Notebook 07's study: the same model trained with the sort + grouped-GEMM dispatch and with the
reference loop over experts. Its grid and table.
"""

from __future__ import annotations

import pandas as pd

from ..runs import Grid
from ..benchmark_results import benchmark_layer_frame
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
    rows = []
    for condition in conditions(study):
        part = study.results[study.results.condition == condition]
        gaps = loss_gaps(study.histories, condition, part.seed)
        rows.append({
            "dispatch": condition,
            "seeds": len(part),
            "ms/step": f"{part.ms_per_step.mean():.0f}",
            "tokens/s": f"{part.tokens_per_second.mean():,.0f}",
            "test loss": f"{part.test_loss.mean():.4f}",
            "max |train loss gap|": f"{max(gaps):.2e}" if gaps else "–",
        })
    return pd.DataFrame(rows).set_index("dispatch")


def loss_gaps(histories: pd.DataFrame, condition: str, seeds) -> list[float]:
    """Per seed: the largest ``|logged training loss of condition - the other dispatch's|`` over the steps both logged."""
    gaps = []
    for seed in seeds:
        mine = histories[(histories.condition == condition) & (histories.seed == seed)].set_index("step").lm_loss
        other = histories[(histories.condition != condition) & (histories.seed == seed)].set_index("step").lm_loss
        if len(other):
            gaps.append(float((mine - other).abs().max()))
    return gaps


FAST, LOOP, FLOOR = "moe_lib fast path", "moe_lib reference loop", "grouped matmuls alone (floor)"


def findings(study: StudyResult, benchmark: dict | None = None, tokens: int = 4096) -> list[str]:
    """Notebook 07's conclusions, each with its number: the training runs' ms/step (grouped vs loop) and,
    given the benchmark's results (``perf.load_benchmark_results()``), per layer shape at ``tokens``
    tokens (else the largest measured) how much of the fast path's time is outside the grouped matmuls
    (``1 - floor ms / fast ms``: the dispatch's share) and how long the loop takes against the fast path."""
    results = study.results
    missing = {"grouped", "loop"} - set(results.condition)
    if missing:
        raise ValueError(f"the dispatch study has no runs of {sorted(missing)}; it needs both 'grouped' and 'loop'")
    ms = results.groupby("condition").ms_per_step.mean()
    seeds = sorted(set(results.seed))
    gaps = loss_gaps(study.histories, "loop", seeds)
    if not gaps:
        same = "no training histories were stored to compare their losses"
    elif max(gaps) == 0:
        same = "their logged training losses are identical: the same function"
    else:
        same = f"their logged training losses differ by at most {max(gaps):.1e} nats, float round-off: the same function"
    lines = [f"Training the {study.profile.name} profile's model ({results.device.iloc[0]}, {len(seeds)} seed(s)), the loop over "
             f"experts took {ms['loop'] / ms['grouped']:.2f}x the grouped dispatch's time per step ({ms['loop']:.0f} vs "
             f"{ms['grouped']:.0f} ms), and {same}."]
    if benchmark is None:
        return lines
    layer = benchmark_layer_frame(benchmark)
    measured = sorted(set(layer.tokens))
    at = tokens if tokens in measured else max(measured)
    part = layer[layer.tokens == at]
    shares = {}
    for shape, rows in part.groupby("shape", sort=False):
        by, label = rows.set_index("implementation").ms, rows.label.iloc[0]
        shares[shape] = 1 - by[FLOOR] / by[FAST]
        lines.append(f"{label[:1].upper()}{label[1:]} layer ({shape}, {at} tokens, forward + backward): dispatch and "
                     f"everything else outside the grouped matmuls is {shares[shape]:.0%} of the fast path's time, and the "
                     f"loop over experts takes {by[LOOP] / by[FAST]:.2f}x as long as the fast path.")
    most, least = max(shares, key=shares.get), min(shares, key=shares.get)
    lines.append(f"So how much dispatch decides depends on the shape: most at {most} ({shares[most]:.0%}), least at {least} "
                 f"({shares[least]:.0%}), in fp32, measured {benchmark['date']} on {benchmark['machine']['cpu']} "
                 f"with {benchmark['machine']['threads']} threads.")
    return lines
