"""Notebook 05's specialization study: learned vs random top-2 routing, traced to see what experts learn.

Its grid (checkpoints kept: the analysis opens the trained models), the traces of every run
(:func:`analyze_specialization`), the tables and verdicts of mutual information between the
expert choice and a token label, each against the random router's chance level, the play-level
genre tests, and the analysis tables stored under ``results/<profile>/specialization/`` that the
notebook's "What we found" reads (:func:`save_analysis_tables`, :func:`stored_analysis`, :func:`findings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..training.checkpoint import load_checkpoint
from ..runs import Grid
from ..files import atomic_write_text
from ..profiles import Profile, get_profile, output_paths
from ..stats import holm_adjusted, mean_ci, paired_comparison, paired_differences
from ..training.loop import load_data
from ..training.system import resolve_device
from .result import StudyResult, checkpoint_dir
from .trace_counts import coactivation, conditional_permutation_test, label_permutation_test, label_utilization, mi_by_layer
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


def mi_comparison(analysis: SpecializationAnalysis | pd.DataFrame, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """Per (variable, layer): learned and random-router MI (seed mean and 95% CI), their ratio, and the
    seed-paired difference with its 95% CI and paired t-test p-value (numbers, for verdicts). ``analysis``
    may also be its ``mi`` frame as stored (:func:`stored_analysis`)."""
    mi = analysis if isinstance(analysis, pd.DataFrame) else analysis.mi
    rows = []
    for (variable, layer), part in mi.groupby(["variable", "layer"], sort=False):
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
    """The play-level tests of a document-level label, per (condition, seed, layer), each against the
    same trace with the labels shuffled across plays (``permutations`` relabellings, seeded by the run's seed).

    Genre is a property of a whole play, so its tokens are not independent draws, and plays of one
    genre share words. ``mi_bits`` is ``I(E; genre)`` with its null (``null_q95_bits``, ``p_value``,
    :func:`~moe_lib.studies.trace_counts.label_permutation_test`); ``cmi_bits`` is ``I(E; genre | token)``,
    what the expert choice says about the genre beyond the token itself, with its null (``cmi_p_value``,
    :func:`~moe_lib.studies.trace_counts.conditional_permutation_test`). The random router is no null
    for the CMI: the plug-in CMI's bias grows with ``H(E | token)``, largest for a router that spreads every token.
    """
    rows = []
    for (condition, seed), trace in analysis.traces.items():
        for layer in range(trace.num_layers):
            test = label_permutation_test(trace, layer, label=label, unit=unit, permutations=permutations, seed=seed)
            cmi = conditional_permutation_test(trace, layer, label=label, unit=unit, permutations=permutations, seed=seed)
            rows.append({"condition": condition, "seed": seed, "layer": layer, **test, **cmi, "permutations": permutations})
    return pd.DataFrame(rows)


def _beating(part: pd.DataFrame, column: str, sep: str = "/") -> str:
    """``"2/3"`` (``sep="/"``): rows of ``part`` whose permutation p in ``column`` is below 0.05."""
    return f"{int((part[column] < 0.05).sum())}{sep}{len(part)}"


def genre_control_table(controls: pd.DataFrame, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """:func:`genre_controls` per layer: for each router, the seeds whose ``I(E; genre)`` and whose
    ``I(E; genre | token)`` beat their play-shuffled nulls at the 5% level, and the learned router's CMI
    against its null's mean (seed means with 95% CIs)."""
    rows = []
    for layer, part in controls.groupby("layer"):
        ours, theirs = part[part.condition == learned], part[part.condition == control]
        rows.append({
            "layer": layer,
            f"I(E; genre), {learned}: seeds p < 0.05": _beating(ours, "p_value"),
            f"I(E; genre), {control}: seeds p < 0.05": _beating(theirs, "p_value"),
            f"I(E; genre | token), {learned}: seeds p < 0.05": _beating(ours, "cmi_p_value"),
            f"I(E; genre | token), {control}: seeds p < 0.05": _beating(theirs, "cmi_p_value"),
            f"I(E; genre | token), {learned} (bits)": seed_interval(ours.cmi_bits),
            "its null mean (bits)": seed_interval(ours.cmi_null_mean_bits),
        })
    return pd.DataFrame(rows).set_index("layer")


def play_level_text(controls: pd.DataFrame, condition: str, column: str = "p_value") -> str:
    """``"2 of 12 layer-seed pairs (about 5% would by chance); none survives Holm's correction over
    those 12"``: how many of ``condition``'s play-level tests (``column``: ``p_value`` or ``cmi_p_value``) have p < 0.05."""
    p = controls.loc[controls.condition == condition, column].to_numpy(dtype=float)
    kept = int((holm_adjusted(p) < 0.05).sum())
    return (f"{_beating(controls[controls.condition == condition], column, ' of ')} layer-seed pairs (about 5% would by chance); "
            f"{'none survives' if not kept else f'{kept} survives' if kept == 1 else f'{kept} survive'} Holm's correction over those {len(p)}")


def genre_control_verdicts(controls: pd.DataFrame, learned: str = "learned top-2", control: str = "random top-2") -> list[str]:
    """What survives the play-level genre tests, in words."""
    units, permutations = int(controls.units.iloc[0]), int(controls.permutations.iloc[0])
    lines = [
        f"{condition}: I(expert; genre) beats the play-shuffled null (p < 0.05, {units} plays, {permutations} shuffles) in "
        f"{play_level_text(controls, condition)}."
        for condition in (learned, control)
    ]
    ours = controls[controls.condition == learned]
    lines.append(
        f"Given the token, I(expert; genre | token) of the {learned} router averages {ours.cmi_bits.mean():.4f} bits against "
        f"{ours.cmi_null_mean_bits.mean():.4f} for the same trace with genres shuffled across plays; it beats that null in "
        f"{play_level_text(controls, learned, 'cmi_p_value')}; the {control} router's beats it in "
        f"{_beating(controls[controls.condition == control], 'cmi_p_value', ' of ')}. The {control} router is no null for this quantity: "
        "the plug-in CMI's upward bias grows with how many experts each token is spread over, and it spreads every token over all of them."
    )
    return lines


def specialization_verdicts(
    analysis: SpecializationAnalysis, controls: pd.DataFrame | None = None, learned: str = "learned top-2", control: str = "random top-2"
) -> list[str]:
    """Plain-language findings computed from the traces: MI beyond chance, the strongest class
    preferences and co-activations, each against the random router's chance level. A genre preference
    is judged at play level, by ``controls`` (:func:`genre_controls`): the random router's lifts are
    token-level chance, which a play's own words already exceed."""
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
        head = (f"Strongest {kind} preference (learned, any seed): layer {int(top.layer)} expert {int(top.expert)} takes "
                f"{100 * top.share:.1f}% of the {top[label]} slots, {top.lift:.2f}x its overall share. The random router's largest "
                f"such lift (any layer, expert, seed) is {chance:.2f}x")
        if label != "genre":
            lines.append(f"{head}, so this is {'beyond' if top.lift > chance else 'within'} what chance produced.")
        elif controls is None:
            lines.append(f"{head}; that chance level is token-level, which a play's own words exceed, so only the "
                         "play-level test (genre_controls) can say whether this is about genre.")
        else:
            lines.append(f"{head}, but that chance level is token-level, which a play's own words exceed. At play level, "
                         f"I(expert; genre) beats the play-shuffled null in {play_level_text(controls, learned)}.")
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


# =========================================================================== stored analysis and findings
@dataclass
class AnalysisTables:
    """An analysis as stored: ``mi`` (:attr:`SpecializationAnalysis.mi`) and ``controls`` (:func:`genre_controls`;
    None for a corpus without genres), for the profile named ``profile``."""

    profile: str
    mi: pd.DataFrame
    controls: pd.DataFrame | None = None


def analysis_path(profile: Profile | str, name: str) -> Path:
    """``results/<profile>/specialization/analysis_<name>.csv``."""
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    return output_paths(profile).results / "specialization" / f"analysis_{name}.csv"


def save_analysis_tables(
    analysis: SpecializationAnalysis, profile: Profile | str, controls: pd.DataFrame | None = None
) -> AnalysisTables:
    """Write the analysis's ``mi`` and genre ``controls`` (computed with :func:`genre_controls`' defaults when not
    given and the corpus has genres) atomically beside the study's results, so its findings can be read again
    without the checkpoints; returns them as :class:`AnalysisTables`."""
    if controls is None and "genre" in set(analysis.mi.variable):
        controls = genre_controls(analysis)
    name = profile.name if isinstance(profile, Profile) else profile
    tables = AnalysisTables(name, analysis.mi, controls)
    atomic_write_text(analysis_path(profile, "mi"), tables.mi.to_csv(index=False))
    if controls is None:
        analysis_path(profile, "genre_controls").unlink(missing_ok=True)  # a stale one from another corpus
    else:
        atomic_write_text(analysis_path(profile, "genre_controls"), controls.to_csv(index=False))
    return tables


def stored_analysis(profile: Profile | str) -> AnalysisTables | None:
    """The tables :func:`save_analysis_tables` stored for ``profile``, or None when none are stored."""
    mi, controls = analysis_path(profile, "mi"), analysis_path(profile, "genre_controls")
    if not mi.exists():
        return None
    name = profile.name if isinstance(profile, Profile) else profile
    return AnalysisTables(name, pd.read_csv(mi), pd.read_csv(controls) if controls.exists() else None)


def verdict_family(tables: AnalysisTables, learned: str = "learned top-2", control: str = "random top-2") -> list[tuple[str, float]]:
    """``(label, p)`` of every test this notebook reads, for :func:`~moe_lib.studies.verdicts.family_table` (Holm):
    the seed-paired t-test of the MI table per (label, layer), and the learned router's play-level tests of
    ``I(E; genre)`` and ``I(E; genre | token)`` per (layer, seed). A label's part before ", layer" names its kind."""
    family = [(f"I(E; {row.variable}) vs random, layer {row.layer} (paired t)", row.p_value)
              for row in mi_comparison(tables.mi, learned, control).itertuples()]
    if tables.controls is not None:
        ours = tables.controls[tables.controls.condition == learned]
        for what, column in (("I(E; genre)", "p_value"), ("I(E; genre | token)", "cmi_p_value")):
            family += [(f"{what} vs play shuffles, layer {row.layer}, seed {row.seed}", getattr(row, column)) for row in ours.itertuples()]
    return family


def _scale_findings(tables: AnalysisTables, compact: bool, learned: str, control: str) -> list[str]:
    """Three (``compact``) or four sentences for one profile: token class, genre at play level, genre given the token, Holm."""
    lines = []
    c = mi_comparison(tables.mi, learned, control)
    part = c[c.variable == "token_class"]
    if len(part):
        best, above = part.loc[part.difference.idxmax()], int((part.difference_ci_low > 0).sum())
        lines.append(
            f"At the {tables.profile} profile, "
            f"{'the experts sort tokens by class' if above else f'whether the experts sort tokens by class is inconclusive at n = {int(best.n_pairs)}'}: "
            f"at layer {int(best.layer)}, I(expert; token class) is {interval_text(best.learned_mean, best.learned_ci_low, best.learned_ci_high)} "
            f"bits for the learned router ({100 * best.learned_fraction:.0f}% of H(class)) against "
            f"{interval_text(best.random_mean, best.random_ci_low, best.random_ci_high)} for the random-router control, and the seed-paired "
            f"95% CI of the difference ({int(best.n_pairs)} seeds) lies above 0 in {above} of {len(part)} layers."
        )
    if tables.controls is not None:
        k = tables.controls
        ours = k[k.condition == learned]
        genre = (f"Genre, tested at play level ({int(k.units.iloc[0])} plays, {int(k.permutations.iloc[0])} shuffles of genres across plays): "
                 f"I(expert; genre) of the learned router beats the shuffled null in {play_level_text(k, learned)}, "
                 f"the random router's in {_beating(k[k.condition == control], 'p_value', ' of ')}")
        given = (f"I(expert; genre | token) of the learned router averages {ours.cmi_bits.mean():.4f} bits against "
                 f"{ours.cmi_null_mean_bits.mean():.4f} for its play-shuffled null and beats that null in "
                 f"{play_level_text(k, learned, 'cmi_p_value')}")
        lines += [f"{genre}; given the token, {given}."] if compact else [f"{genre}.", f"Beyond the token itself, {given}."]
    family = verdict_family(tables, learned, control)
    holm = holm_adjusted([p for _, p in family])
    kinds: dict[str, list[int]] = {}
    for (label, _), q in zip(family, holm):
        kinds.setdefault(label.split(", layer")[0], []).append(int(q < 0.05))
    kept = int(sum(q < 0.05 for q in holm))
    lines.append(f"Of the {len(family)} tests behind these numbers, {kept} {'stays' if kept == 1 else 'stay'} significant after Holm's "
                 f"correction: " + "; ".join(f"{sum(v)} of {len(v)} {kind}" for kind, v in kinds.items())
                 + ("; the random router corrects the estimator's bias only, so for genre the play-level tests are the ones that count."
                    if tables.controls is not None else "."))
    return lines


def findings(cpu: AnalysisTables | None, gpu: AnalysisTables | None = None,
             learned: str = "learned top-2", control: str = "random top-2") -> list[str]:
    """Notebook 05's "What we found": at most 6 plain sentences with their numbers, from the stored analysis
    tables of the cpu profile and, where stored, the gpu profile (:func:`stored_analysis`)."""
    if cpu is None:
        lines = ["No analysis of the specialization study is stored for this profile: run this notebook's analysis "
                 "(it saves results/<profile>/specialization/analysis_*.csv)."]
    else:
        lines = _scale_findings(cpu, gpu is not None, learned, control)
    if gpu is None:
        return lines + ["The gpu runs are missing: results/gpu holds no analysis of the specialization study"
                        + (f", so these findings hold at the {cpu.profile} profile only." if cpu is not None else ".")]
    return lines + _scale_findings(gpu, True, learned, control)
