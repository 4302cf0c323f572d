"""Notebook 05's specialization study: learned vs random top-2 routing, traced to see what experts learn.

Its grid (checkpoints kept: the analysis opens the trained models), the traces of every run
(:func:`analyze_specialization`), and the tables and verdicts of mutual information between the
expert choice and a token label, each against the random router's chance level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..training.checkpoint import load_checkpoint
from ..runs import Grid
from ..information import conditional_mutual_information
from ..profiles import Profile
from ..stats import mean_ci, paired_comparison, paired_differences
from ..training.loop import load_data
from ..training.system import resolve_device
from .result import StudyResult, checkpoint_dir
from .trace_counts import coactivation, label_permutation_test, label_utilization, mi_by_layer
from .traces import annotate_split, trace_routing
from .verdicts import interval_text, seed_interval, significance


SPECIALIZATION_ROUTERS = {"learned top-2": "topk", "random top-2": "random"}


def specialization_grid(profile: Profile, seeds=None) -> Grid:
    """Learned vs random top-2 routing, load balancing 0.01, no noise, dropless, on the profile's seeds.

    The random router is the control: whatever "specialization" it shows is chance. The
    analysis needs the trained models, so :func:`run_study` always saves this grid's checkpoints.
    """
    base = profile.base.with_model(top_k=2, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0, capacity_factor=None)
    conditions = {label: {"router": router} for label, router in SPECIALIZATION_ROUTERS.items()}
    return Grid.from_conditions("specialization", base, conditions, seeds or profile.seeds, baseline="random top-2")


@dataclass
class SpecializationAnalysis:
    """Every run of the specialization study traced over one split.

    ``traces[(condition, seed)]`` is a :class:`~moe_lib.studies.traces.RoutingTrace`;
    ``mi`` has one row per (condition, seed, variable, layer) with the columns of
    :func:`~moe_lib.studies.trace_counts.mi_by_layer`.
    """

    study: StudyResult
    split: str
    annotation: Any
    traces: dict[tuple[str, int], Any]
    mi: pd.DataFrame

    def trace(self, condition: str, seed: int | None = None):
        """The trace of ``condition`` for ``seed`` (default: its first seed)."""
        keys = [k for k in self.traces if k[0] == condition and (seed is None or k[1] == seed)]
        if not keys:
            raise ValueError(f"no trace for condition={condition!r}, seed={seed!r}; traced: {sorted(self.traces)}")
        return self.traces[keys[0]]

    def traces_of(self, condition: str) -> list:
        return [t for (c, _), t in self.traces.items() if c == condition]


def analyze_specialization(
    study: StudyResult, split: str = "test", variables: tuple[str, ...] = ("genre", "token_class"), batch_size: int = 32
) -> SpecializationAnalysis:
    """Load every finished run's checkpoint, trace ``split`` through it and measure ``I(expert; label)`` per layer.

    A document field the corpus does not have (``genre`` outside Shakespeare) is left out of ``variables``.
    """
    finished = set(study.results["run_id"])
    runs = [r for r in study.grid.runs if r.run_id in finished]
    if not runs:
        raise ValueError(f"grid {study.grid.name!r} has no finished runs to analyse")
    data = load_data(runs[0].config.data)
    tokens = getattr(data, split)
    annotation = annotate_split(tokens, data.tokenizer)
    fields = {k for doc in annotation.documents for k, v in doc.items() if v is not None}
    variables = tuple(v for v in variables if v in ("token_class", "token") or v in fields)
    device = resolve_device(study.profile.base.train.device)
    traces, frames = {}, []
    for run in runs:
        model, config, _ = load_checkpoint(checkpoint_dir(study, run.condition, run.seed), device=device)
        trace = trace_routing(
            model, tokens, annotation=annotation, seq_len=config.train.seq_len, batch_size=batch_size, seed=run.seed,
            name=f"{run.condition}, seed {run.seed}",
        )
        traces[(run.condition, run.seed)] = trace
        frame = mi_by_layer(trace, variables)
        frame.insert(0, "seed", run.seed)
        frame.insert(0, "condition", run.condition)
        frames.append(frame)
    return SpecializationAnalysis(study, split, annotation, traces, pd.concat(frames, ignore_index=True))


def mi_comparison(analysis: SpecializationAnalysis, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """Per (variable, layer): learned and random-router MI (seed mean and 95% CI), their ratio, and the
    seed-paired difference with its 95% CI and paired t-test p-value (numbers, for verdicts)."""
    rows = []
    for (variable, layer), part in analysis.mi.groupby(["variable", "layer"], sort=False):
        a, b = mean_ci(part[part.condition == learned].mi_bits), mean_ci(part[part.condition == control].mi_bits)
        cmp = paired_comparison(part, baseline=control, metric="mi_bits", lower_is_better=False).set_index("condition").loc[learned]
        rows.append({
            "variable": variable, "layer": layer,
            "learned_mean": a[0], "learned_ci_low": a[3], "learned_ci_high": a[4],
            "random_mean": b[0], "random_ci_low": b[3], "random_ci_high": b[4],
            "ratio": a[0] / b[0] if b[0] > 0 else float("inf"),
            "difference": cmp.mean_difference, "difference_ci_low": cmp.difference_ci_low, "difference_ci_high": cmp.difference_ci_high,
            "p_value": cmp.p_value, "n_pairs": int(cmp.n_pairs),
            "learned_fraction": part[part.condition == learned].mi_fraction.mean(),
            "label_entropy_bits": part.label_entropy_bits.iloc[0],
            "miller_madow_bits": part.miller_madow_bits.iloc[0],
        })
    return pd.DataFrame(rows)


def mi_table(analysis: SpecializationAnalysis, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """:func:`mi_comparison` for display: MI in bits as "mean [95% CI]" over seeds."""
    c = mi_comparison(analysis, learned, control)
    table = pd.DataFrame({
        "variable": c.variable,
        "layer": c.layer,
        f"{learned} (bits)": [interval_text(m, lo, hi) for m, lo, hi in zip(c.learned_mean, c.learned_ci_low, c.learned_ci_high)],
        f"{control} (bits)": [interval_text(m, lo, hi) for m, lo, hi in zip(c.random_mean, c.random_ci_low, c.random_ci_high)],
        "x chance": [f"{r:.1f}" for r in c.ratio],
        "paired difference [95% CI]": [interval_text(m, lo, hi) for m, lo, hi in zip(c.difference, c.difference_ci_low, c.difference_ci_high)],
        "p (paired t)": [f"{p:.3f}" if pd.notna(p) else "–" for p in c.p_value],
        "share of H(label)": [f"{100 * f:.2f}%" for f in c.learned_fraction],
        "Miller-Madow bias": [f"{b:.5f}" for b in c.miller_madow_bits],
    })
    return table.set_index(["variable", "layer"])


def _mi_differences(analysis: SpecializationAnalysis, variable: str, layer: int, learned: str, control: str) -> np.ndarray:
    """Per-seed learned - control MI (bits) of ``variable`` at ``layer``."""
    part = analysis.mi[(analysis.mi.variable == variable) & (analysis.mi.layer == layer)]
    pairs = paired_differences(part, baseline=control, metric="mi_bits", lower_is_better=False)
    return pairs.loc[pairs.condition == learned, "difference"].to_numpy(dtype=float)


def genre_controls(
    analysis: SpecializationAnalysis, label: str = "genre", unit: str = "play", permutations: int = 200
) -> pd.DataFrame:
    """Two controls for a document-level label, per (condition, seed, layer).

    Genre is a property of a whole play, so its tokens are not independent draws, and plays of
    one genre share words. ``mi_bits`` is tested against a null that shuffles genres across
    plays (:func:`~moe_lib.studies.trace_counts.label_permutation_test`: ``null_q95_bits``,
    ``p_value``), and ``cmi_given_token_bits`` is ``I(E; genre | token)``, what the expert choice
    says about the genre beyond the token itself (plug-in, so biased upwards: read it against
    the random router's).
    """
    rows = []
    for (condition, seed), trace in analysis.traces.items():
        labels, tokens = trace.labels(label), trace.labels("token")
        for layer in range(trace.num_layers):
            test = label_permutation_test(trace, layer, label=label, unit=unit, permutations=permutations, seed=seed)
            cmi = conditional_mutual_information(
                trace.experts[layer].ravel(), np.repeat(labels, trace.top_k), np.repeat(tokens, trace.top_k))
            rows.append({"condition": condition, "seed": seed, "layer": layer, **test, "cmi_given_token_bits": cmi})
    return pd.DataFrame(rows)


def genre_control_table(controls: pd.DataFrame, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """:func:`genre_controls` per layer: seeds whose MI beats the play-shuffled null at the 5% level,
    for each router, and ``I(E; genre | token)`` learned vs random, seed-paired with a 95% CI."""
    rows = []
    for layer, part in controls.groupby("layer"):
        cmp = paired_comparison(part, baseline=control, metric="cmi_given_token_bits", lower_is_better=False).set_index("condition").loc[learned]
        rows.append({
            "layer": layer,
            f"{learned}: seeds p < 0.05": f"{int((part[part.condition == learned].p_value < 0.05).sum())}/{int((part.condition == learned).sum())}",
            f"{control}: seeds p < 0.05": f"{int((part[part.condition == control].p_value < 0.05).sum())}/{int((part.condition == control).sum())}",
            f"I(E; genre | token), {learned} (bits)": seed_interval(part[part.condition == learned].cmi_given_token_bits),
            f"I(E; genre | token), {control} (bits)": seed_interval(part[part.condition == control].cmi_given_token_bits),
            "paired difference [95% CI]": interval_text(cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high),
        })
    return pd.DataFrame(rows).set_index("layer")


def genre_control_verdicts(controls: pd.DataFrame, learned: str = "learned top-2", control: str = "random top-2") -> list[str]:
    """What survives the two genre controls, in words."""
    units = int(controls.units.iloc[0])
    lines = []
    for condition in (learned, control):
        part = controls[controls.condition == condition]
        lines.append(
            f"{condition}: I(expert; genre) beats the play-shuffled null (p < 0.05, {units} plays) in "
            f"{int((part.p_value < 0.05).sum())} of {len(part)} layer-seed pairs (about 5% would by chance)."
        )
    beyond = 0
    layers = sorted(controls.layer.unique())
    for layer in layers:
        part = controls[controls.layer == layer]
        cmp = paired_comparison(part, baseline=control, metric="cmi_given_token_bits", lower_is_better=False).set_index("condition").loc[learned]
        beyond += int(cmp.difference_ci_low > 0)
    lines.append(
        f"Given the token, I(expert; genre | token) is above the random router's in {beyond} of {len(layers)} layers "
        "(seed-paired 95% CI above 0). "
        + ("So beyond what the token itself says, the learned experts carry genre information in those layers."
           if beyond else "So what genre information the learned experts carry is explained by which tokens they take.")
    )
    return lines


def specialization_verdicts(analysis: SpecializationAnalysis, learned: str = "learned top-2", control: str = "random top-2") -> list[str]:
    """Plain-language findings computed from the traces: MI beyond chance, the strongest
    class preferences and co-activations, each against the random router's chance level."""
    c = mi_comparison(analysis, learned, control)
    n_seeds = int(c.n_pairs.max()) if len(c) else 0
    lines = []
    for variable, part in c.groupby("variable", sort=False):
        beyond = part[part.difference_ci_low > 0]
        best = part.loc[part.difference.idxmax()]
        lines.append(
            f"I(expert; {variable}): the learned router beats the random-router control in {len(beyond)} of {len(part)} layers "
            f"(counting a layer when the seed-paired 95% CI of the difference, {n_seeds} seeds, lies above 0). "
            f"Largest difference at layer {int(best.layer)}: {best.learned_mean:.4f} bits "
            f"vs {best.random_mean:.4f} by chance ({best.ratio:.1f}x), i.e. {100 * best.learned_fraction:.2f}% of "
            f"H({variable}) = {best.label_entropy_bits:.3f} bits; "
            f"{significance(best.difference_ci_low, best.difference_ci_high, _mi_differences(analysis, variable, best.layer, learned, control), 4, ' bits')}."
            + (" For genre this control corrects the estimator's bias only: genre belongs to whole plays, whose words differ, "
               "so only the play-level controls (genre_controls) can say whether the experts track genre." if variable == "genre" else "")
        )
    mm = c.miller_madow_bits.mean()
    rnd = c.random_mean.mean()
    lines.append(
        f"Estimator bias: the random router's plug-in MI averages {rnd:.5f} bits against a Miller-Madow expectation of {mm:.5f} "
        f"bits for independent variables ({rnd / mm:.1f}x): {'the control MI is' if rnd / mm < 3 else 'the control MI is NOT'} "
        f"of the size sampling noise alone predicts."
    )
    # Chance threshold: the largest value the random router produced over all its layers, experts
    # (or pairs) and seeds, the maximum statistic of the control.
    for label, kind in (("token_class", "token class"), ("genre", "genre")):
        if label not in set(analysis.mi.variable):
            continue
        best = {}
        for condition in (learned, control):
            rows = []
            for trace in analysis.traces_of(condition):
                table = label_utilization(trace, trace.labels(label), label)
                rows.append(table.loc[table.lift.idxmax()])
            best[condition] = rows
        top = max(best[learned], key=lambda r: r.lift)
        chance = max(r.lift for r in best[control])
        lines.append(
            f"Strongest {kind} preference (learned, any seed): layer {int(top.layer)} expert {int(top.expert)} takes "
            f"{100 * top.share:.1f}% of the {top[label]} slots, {top.lift:.2f}x its overall share. The random router's largest "
            f"such lift (any layer, expert, seed) is {chance:.2f}x, so this is "
            f"{'beyond' if top.lift > chance else 'within'} what chance produced."
        )
    if analysis.trace(learned).top_k >= 2:
        maxima = {}
        for condition in (learned, control):
            maxima[condition] = [float(np.nanmax(lift)) for trace in analysis.traces_of(condition) for lift in coactivation(trace)[1]]
        chance = max(maxima[control])
        above = sum(m > chance for m in maxima[learned])
        lines.append(
            f"Co-activation: the most over-represented expert pair of a layer has lift {np.mean(maxima[learned]):.2f} on average "
            f"for the learned router (over layers and seeds) and at most {chance:.2f} for the random router; "
            f"{above} of {len(maxima[learned])} learned layer-seed maxima exceed that chance maximum."
        )
    return lines
