"""The course's three studies as experiment grids, sized by a profile.

* ``routing`` - top-1, top-2, top-1 random and top-2 random routing with 4 experts
  (the moe-experiments study).
* ``noise`` - routing noise_std {0, 0.1, 0.5} x load_balancing_weight {0.01, 0}
  (the routing-noise factorial; 6 conditions x seeds 42, 43, 44 = 18 runs).
* ``zloss`` - baseline, z-loss 0.001, z-loss 0.001 without router noise, z-loss 0.01
  (the z-loss tutorial; the original ran one seed, we run several).
* ``specialization`` - learned vs random top-2 routing (load balancing 0.01, dropless) on the
  profile's seeds, checkpoints kept: the models notebook 05 opens to see what experts learn.
* ``capacity`` - capacity factor {0.5, 1.0, 1.25, 2.0, dropless} x load balancing {0.01, 0}
  on one seed (42): 10 runs, the token-dropping trade-off of GShard and Switch.

:func:`run_study` trains what is missing, appends each finished run to
``results/<profile>/<study>.csv`` and returns the results with their histories.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .config import RunConfig
from .experiments import (
    Grid, Run, format_mean_std, load_histories, load_results, mean_ci, paired_comparison, retrain_run, run_grid, summarize,
)
from .profiles import Profile, get_profile, output_paths


def _runs(conditions: dict[str, tuple[dict[str, Any], RunConfig]], seeds) -> list[Run]:
    return [
        Run(condition=label, factors=factors, seed=seed, config=config.with_train(seed=seed))
        for label, (factors, config) in conditions.items()
        for seed in seeds
    ]


def routing_grid(profile: Profile, seeds=None) -> Grid:
    """Learned vs random routing, k = 1 and 2, with 4 experts as in the original grid."""
    base = profile.base.with_model(num_experts=4, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0)
    conditions = {}
    for router, k in (("topk", 1), ("topk", 2), ("random", 1), ("random", 2)):
        label = f"top-{k}" + (" random" if router == "random" else "")
        conditions[label] = ({"router": router, "top_k": k}, base.with_model(router=router, top_k=k))
    return Grid(name="routing_types", runs=_runs(conditions, seeds or profile.seeds), factors=("router", "top_k"), baseline="top-2")


NOISE_LEVELS = (0.0, 0.1, 0.5)
LB_WEIGHTS = (0.01, 0.0)


def noise_grid(profile: Profile, seeds=None) -> Grid:
    """noise_std x load_balancing_weight, 8 experts top-2, the original's Muon + AdamW hybrid."""
    base = profile.base.with_train(optimizer="muon")
    conditions = {}
    for noise, lb in itertools.product(NOISE_LEVELS, LB_WEIGHTS):
        label = f"noise={noise}, lb={lb}"
        conditions[label] = ({"noise_std": noise, "load_balancing_weight": lb}, base.with_model(noise_std=noise, load_balancing_weight=lb))
    return Grid(
        name="noise_factorial",
        runs=_runs(conditions, seeds or profile.seeds),
        factors=("noise_std", "load_balancing_weight"),
        baseline="noise=0.0, lb=0.01",
    )


ZLOSS_CONDITIONS = {
    "baseline": {"z_loss_weight": 0.0, "noise_std": 0.1},
    "z=0.001": {"z_loss_weight": 0.001, "noise_std": 0.1},
    "z=0.001, no noise": {"z_loss_weight": 0.001, "noise_std": 0.0},
    "z=0.01": {"z_loss_weight": 0.01, "noise_std": 0.1},
}


def zloss_grid(profile: Profile, seeds=None) -> Grid:
    """The z-loss tutorial's four runs (load balancing 0.01 throughout), on several seeds."""
    base = profile.base.with_train(optimizer="muon", steps=profile.zloss_steps).with_model(load_balancing_weight=0.01)
    conditions = {label: (levels, base.with_model(**levels)) for label, levels in ZLOSS_CONDITIONS.items()}
    return Grid(name="zloss", runs=_runs(conditions, seeds or profile.seeds), factors=("z_loss_weight", "noise_std"), baseline="baseline")


SPECIALIZATION_ROUTERS = {"learned top-2": "topk", "random top-2": "random"}


def specialization_grid(profile: Profile, seeds=None) -> Grid:
    """Learned vs random top-2 routing, load balancing 0.01, no noise, dropless, on the profile's seeds.

    The random router is the control: whatever "specialization" it shows is chance. The
    analysis needs the trained models, so :func:`run_study` always saves this grid's checkpoints.
    """
    base = profile.base.with_model(top_k=2, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0, capacity_factor=None)
    conditions = {label: ({"router": router}, base.with_model(router=router)) for label, router in SPECIALIZATION_ROUTERS.items()}
    return Grid(name="specialization", runs=_runs(conditions, seeds or profile.seeds), factors=("router",), baseline="random top-2")


CAPACITY_FACTORS: tuple[float | None, ...] = (0.5, 1.0, 1.25, 2.0, None)  # None = dropless
CAPACITY_SEED = 42


def capacity_label(cf: float | None) -> str:
    """``"0.5"``, ``"1.25"``, ... or ``"dropless"`` for a capacity factor of None (NaN once read back from a CSV)."""
    return "dropless" if cf is None or (isinstance(cf, float) and math.isnan(cf)) else str(float(cf))


def capacity_grid(profile: Profile, seeds=None) -> Grid:
    """capacity_factor x load_balancing_weight, learned top-2, on ONE seed (42) unless seeds are given.

    Ten runs at about a minute each on the cpu profile; a single seed keeps the sweep affordable,
    so its perplexity differences come without a confidence interval.
    """
    base = profile.base.with_model(top_k=2, router="topk", noise_std=0.0, z_loss_weight=0.0)
    conditions = {}
    for lb, cf in itertools.product(LB_WEIGHTS, CAPACITY_FACTORS):
        conditions[f"cf={capacity_label(cf)}, lb={lb}"] = (
            {"capacity_factor": cf, "load_balancing_weight": lb},
            base.with_model(capacity_factor=cf, load_balancing_weight=lb),
        )
    return Grid(
        name="capacity",
        runs=_runs(conditions, seeds or (CAPACITY_SEED,)),
        factors=("capacity_factor", "load_balancing_weight"),
        baseline="cf=dropless, lb=0.01",
    )


DISPATCH_SEED = 42


def dispatch_grid(profile: Profile, seeds=None) -> Grid:
    """The same model trained twice, with the sort + grouped-GEMM dispatch and with the reference
    loop over experts, on one seed (42) unless seeds are given: same maths, different speed."""
    base = profile.base.with_model(top_k=2, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0)
    conditions = {label: ({"dispatch": d}, base.with_model(dispatch=d)) for label, d in (("grouped", "grouped"), ("loop", "loop"))}
    return Grid(name="dispatch", runs=_runs(conditions, seeds or (DISPATCH_SEED,)), factors=("dispatch",), baseline="loop")


STUDIES: dict[str, Callable[..., Grid]] = {
    "routing": routing_grid,
    "noise": noise_grid,
    "zloss": zloss_grid,
    "specialization": specialization_grid,
    "capacity": capacity_grid,
    "dispatch": dispatch_grid,
}
# Studies whose analysis opens the trained models: run_study always keeps their checkpoints.
CHECKPOINTED_STUDIES = frozenset({"specialization"})


@dataclass
class StudyResult:
    """A finished grid: one results row per run, and every run's per-step history."""

    grid: Grid
    profile: Profile
    results: pd.DataFrame
    histories: pd.DataFrame
    results_path: Path

    def describe(self) -> str:
        """The profile and the settings shared by the grid's runs (from its first run), and what varies."""
        from .profiles import describe_config

        first = self.grid.runs[0]
        return (f"profile={self.profile.name} | {describe_config(first.config)} | "
                f"varied: {', '.join(self.grid.factors)} (values of the first condition, {first.condition!r}, shown)")


def build_grid(study: str, profile: Profile | str | None = None, seeds=None) -> Grid:
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}: valid studies are {sorted(STUDIES)}")
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    return STUDIES[study](profile, seeds=tuple(seeds) if seeds else None)


def run_study(
    study: str,
    profile: Profile | str | None = None,
    seeds=None,
    fresh: bool = False,
    save_checkpoints: bool = False,
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) a study; finished runs already in its CSV are not trained again.

    Checkpoints go to ``saved_models/<grid>/<run_id>/`` when ``save_checkpoints`` is set, and
    always for the studies in :data:`CHECKPOINTED_STUDIES`.
    """
    from .train import train_run

    save_checkpoints = save_checkpoints or study in CHECKPOINTED_STUDIES
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    grid = build_grid(study, profile, seeds)
    paths = output_paths(profile)
    train_fn = functools.partial(train_run, profile=profile.name)
    checkpoint_root = paths.saved_models / grid.name if save_checkpoints else None
    results = run_grid(grid, paths.results, train_fn=train_fn, checkpoint_root=checkpoint_root, progress=progress, fresh=fresh)
    histories = load_histories(grid, paths.results)
    return StudyResult(grid, profile, results, histories, paths.results / f"{grid.name}.csv")


# --------------------------------------------------------------------------- tables and verdicts
ORIGINAL_NOISE_COLUMNS = [
    "seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
    "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv",
    "expert_usage_cv_pooled",  # the original's expert_usage_cv: counts of all layers summed, then CV
]


def _mean_std(values: pd.Series, digits: int) -> str:
    mean, std, *_ = mean_ci(values.astype(float))
    return format_mean_std(mean, std, digits)


def _conditions(study: StudyResult) -> list[str]:
    return list(dict.fromkeys(run.condition for run in study.grid.runs))


def _per_layer(rows: pd.DataFrame, prefix: str) -> str:
    """Seed-mean of ``<prefix>_L<n>`` for each layer, as '1.10 1.05 ...'."""
    layers = sorted(int(c.rsplit("_L", 1)[1]) for c in rows.columns if c.startswith(prefix + "_L") and c.rsplit("_L", 1)[1].isdigit())
    return " ".join(f"{rows[f'{prefix}_L{l}'].mean():.2f}" for l in layers)


def routing_table(study: StudyResult) -> pd.DataFrame:
    """Per condition: test loss/PPL (mean ± std), top-3 accuracy, entropy and usage std per layer."""
    rows = []
    for condition in _conditions(study):
        part = study.results[study.results.condition == condition]
        rows.append({
            "condition": condition,
            "seeds": len(part),
            "test loss": _mean_std(part.test_loss, 3),
            "test PPL": _mean_std(part.test_perplexity, 2),
            "test top-3 acc. (%)": _mean_std(100 * part.test_top3_accuracy, 2),
            "routing entropy per layer": _per_layer(part, "val_entropy"),
            "usage std per layer": _per_layer(part, "val_util_std"),
        })
    return pd.DataFrame(rows).set_index("condition")


def best_condition(study: StudyResult, metric: str = "test_loss") -> str:
    """The condition with the lowest seed-mean ``metric``."""
    return study.results.groupby("condition")[metric].mean().idxmin()


def checkpoint_dir(study: StudyResult, condition: str, seed: int | None = None, train_if_missing: bool = True) -> Path:
    """The saved checkpoint of ``condition`` for ``seed`` (default: its first seed).

    Checkpoints are large, so a clone of the course has results rows without most of them.
    A missing one is trained again (same config and seed; its results row is replaced) unless
    ``train_if_missing=False``, which raises instead.
    """
    runs = [r for r in study.grid.runs if r.condition == condition and (seed is None or r.seed == seed)]
    if not runs:
        valid = sorted({(r.condition, r.seed) for r in study.grid.runs})
        raise ValueError(f"no run with condition={condition!r} and seed={seed!r} in grid {study.grid.name!r}; valid: {valid}")
    root = output_paths(study.profile).saved_models / study.grid.name
    path = root / runs[0].run_id
    if not (path / "model.safetensors").is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"no checkpoint at {path}; checkpoint_dir(..., train_if_missing=True) trains it")
        from .train import train_run

        retrain_run(study.grid, runs[0].run_id, study.results_path.parent, root,
                    train_fn=functools.partial(train_run, profile=study.profile.name))
        study.results = load_results(study.grid, study.results_path.parent)
    return path


def _paired(study: StudyResult, metric: str, baseline: str) -> pd.DataFrame:
    return paired_comparison(study.results, baseline=baseline, metric=metric).set_index("condition")


def _ci_text(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    return f"95% CI [{low:+.{digits}f}{unit}, {high:+.{digits}f}{unit}]"


def _significance(low: float, high: float) -> str:
    if pd.isna(low) or pd.isna(high):
        return "too few seeds for an interval"
    return "the CI excludes 0" if low > 0 or high < 0 else "the CI includes 0, so this is within seed noise"


def _lower_is_better_phrase(subject: str, difference: float, low: float, high: float) -> str:
    """``subject`` vs its baseline for a lower-is-better metric, claiming a winner only when the CI excludes 0."""
    if pd.isna(low) or pd.isna(high):
        return f"{subject} has the {'lower' if difference < 0 else 'higher'} mean ({_significance(low, high)})"
    if high < 0:
        return f"{subject} is better (the CI excludes 0)"
    if low > 0:
        return f"{subject} is worse (the CI excludes 0)"
    return f"{subject} has the {'lower' if difference < 0 else 'higher'} mean, but the CI includes 0, so the difference is within seed noise"


def routing_verdicts(study: StudyResult) -> list[str]:
    """Plain-language comparisons computed from the routing study's results."""
    means = study.results.groupby("condition").test_loss.mean()
    lines = []
    for k in (1, 2):
        learned, random = f"top-{k}", f"top-{k} random"
        cmp = _paired(study, "test_loss", random).loc[learned]
        lines.append(
            f"Learned top-{k} vs random top-{k}: test loss {means[learned]:.3f} vs {means[random]:.3f}; "
            f"paired difference {cmp.mean_difference:+.3f} nats, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
            f"{_lower_is_better_phrase('learned routing', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high)}. "
            "The original found learned better (2.46/2.42 vs 2.53), on one seed."
        )
    cmp = _paired(study, "test_loss", "top-1").loc["top-2"]
    lines.append(
        f"Top-2 vs top-1 (learned): paired difference {cmp.mean_difference:+.3f} nats, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
        f"{_lower_is_better_phrase('top-2', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high)}. "
        "The original found top-2 best (2.42 vs 2.46), on one seed."
    )
    best = best_condition(study)
    lines.append(f"Best condition by mean test loss: {best}. The original's best: Top-2.")
    random_entropy = study.results[study.results.router == "random"].router_entropy
    lines.append(
        f"Random routing entropy: {random_entropy.mean():.4f} nats (ln 4 = 1.3863), as it must be; the original's 1.27 "
        "was the entropy of softmax([1,0,0,0]), not of the routing."
    )
    learned = study.results[study.results.router == "topk"]
    lines.append(
        f"Learned routers end below the uniform entropy: mean {learned.router_entropy.mean():.3f} nats "
        f"(original: 0.65-1.11, falling with depth)."
    )
    return lines


def noise_condition_table(study: StudyResult) -> pd.DataFrame:
    """Best val PPL, usage CV and time per condition: mean ± std and the 95% CI of the mean."""
    metrics = ["best_val_perplexity", "expert_usage_cv", "training_time_minutes"]
    s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=metrics)
    table = pd.DataFrame({
        "noise_std": s.noise_std,
        "lb weight": s.load_balancing_weight,
        "n": s.best_val_perplexity_n,
        "best val PPL": [format_mean_std(m, d, 2) for m, d in zip(s.best_val_perplexity_mean, s.best_val_perplexity_std)],
        "PPL 95% CI": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(s.best_val_perplexity_ci_low, s.best_val_perplexity_ci_high)],
        "usage CV": [format_mean_std(m, d, 4) for m, d in zip(s.expert_usage_cv_mean, s.expert_usage_cv_std)],
        "CV 95% CI": [f"[{lo:.4f}, {hi:.4f}]" for lo, hi in zip(s.expert_usage_cv_ci_low, s.expert_usage_cv_ci_high)],
        "time (min)": [f"{m:.2f}" for m in s.training_time_minutes_mean],
    })
    return table.reset_index(drop=True)


def per_seed_table(study: StudyResult, metrics: list[str]) -> pd.DataFrame:
    """Rows: conditions; columns: (metric, seed)."""
    table = study.results.pivot_table(index="condition", columns="seed", values=metrics, sort=False)
    return table.reindex(_conditions(study)).round(4)


def noise_verdicts(study: StudyResult) -> list[str]:
    r = study.results
    lines = []
    for lb in LB_WEIGHTS:
        base = f"noise=0.0, lb={lb}"
        for noise in NOISE_LEVELS[1:]:
            cmp = _paired(study, "best_val_perplexity", base).loc[f"noise={noise}, lb={lb}"]
            lines.append(
                f"noise {noise} vs 0 (lb {lb}): {-cmp.improvement_pct:+.1f}% best val PPL "
                f"({cmp.mean_difference:+.2f} PPL, {_ci_text(-cmp.improvement_pct_ci_high, -cmp.improvement_pct_ci_low, 1, '%')}, "
                f"paired t-test p = {cmp.p_value:.3f}): {_significance(cmp.difference_ci_low, cmp.difference_ci_high)}."
            )
    lines.append("Original: noise 0.5 cost about +14 PPL (+11%) at both lb settings; noise 0.1 about +1 PPL (+0.9%).")
    for noise in NOISE_LEVELS:
        at = r[r.noise_std == noise]
        on, off = (at[at.load_balancing_weight == w][["expert_usage_cv", "expert_usage_cv_pooled"]].mean() for w in (0.01, 0.0))
        lines.append(
            f"noise {noise}: usage CV (per layer, mean over layers) {off.expert_usage_cv:.4f} without load balancing vs "
            f"{on.expert_usage_cv:.4f} with it: {off.expert_usage_cv / on.expert_usage_cv:.1f}x lower with lb 0.01; "
            f"pooled over layers as the original computed it: {off.expert_usage_cv_pooled:.4f} vs {on.expert_usage_cv_pooled:.4f}, "
            f"{off.expert_usage_cv_pooled / on.expert_usage_cv_pooled:.1f}x."
        )
    lines.append("Original (pooled CV): lb 0.01 cut the CV 3.0x, 3.6x and 5.2x at noise 0, 0.1 and 0.5.")
    for noise in NOISE_LEVELS:
        cmp = _paired(study, "best_val_perplexity", f"noise={noise}, lb=0.01").loc[f"noise={noise}, lb=0.0"]
        lines.append(
            f"lb 0 vs 0.01 at noise {noise}: {cmp.mean_difference:+.2f} best val PPL, "
            f"{_ci_text(cmp.difference_ci_low, cmp.difference_ci_high)}: {_significance(cmp.difference_ci_low, cmp.difference_ci_high)}."
        )
    lines.append("Original: lb 0.01 gave at most a 0.3 PPL edge, inside its seed spread (std about 1 PPL).")
    return lines


def zloss_table(study: StudyResult) -> pd.DataFrame:
    """Test PPL, paired improvement vs baseline with its CI and p-value, ms/step, router entropy and logsumexp."""
    paired = _paired(study, "test_perplexity", study.grid.baseline)
    rows = []
    for condition in _conditions(study):
        part = study.results[study.results.condition == condition]
        row = {
            "condition": condition,
            "seeds": len(part),
            "test PPL": _mean_std(part.test_perplexity, 2),
            "improvement vs baseline": "–",
            "improvement 95% CI": "–",
            "p (paired t)": "–",
            "ms/step": f"{part.ms_per_step.mean():.0f}",
            "router entropy": _mean_std(part.router_entropy, 3),
            "router logsumexp": _mean_std(part.router_logsumexp, 3),
        }
        if condition in paired.index:
            c = paired.loc[condition]
            row.update({
                "improvement vs baseline": f"{c.improvement_pct:+.2f}%",
                "improvement 95% CI": f"[{c.improvement_pct_ci_low:+.2f}%, {c.improvement_pct_ci_high:+.2f}%]",
                "p (paired t)": f"{c.p_value:.3f}",
            })
        rows.append(row)
    return pd.DataFrame(rows).set_index("condition")


def _versus_reported(inside: bool, below: bool, improvement: float) -> str:
    if inside:
        return ": our runs are consistent with it."
    if not below:
        return ": at this scale z=0.01 helped more than reported."
    mean = f"mean improvement {improvement:+.2f}%" if improvement > 0 else f"mean {-improvement:.2f}% worse than the baseline"
    return f": at this scale z=0.01 helped less than reported ({mean})."


def zloss_verdicts(study: StudyResult) -> list[str]:
    paired = _paired(study, "test_perplexity", study.grid.baseline)
    r = study.results
    base_lse = r[r.condition == study.grid.baseline].router_logsumexp.mean()
    base_h = r[r.condition == study.grid.baseline].router_entropy.mean()
    lines = []
    for condition, c in paired.iterrows():
        part = r[r.condition == condition]
        lines.append(
            f"{condition}: test PPL {abs(c.improvement_pct):.2f}% {'lower' if c.improvement_pct > 0 else 'higher'} than the baseline's "
            f"(improvement {c.improvement_pct:+.2f}%, {_ci_text(c.improvement_pct_ci_low, c.improvement_pct_ci_high, 2, '%')}, "
            f"p = {c.p_value:.3f}, {int(c.n_pairs)} paired seeds): "
            f"{_significance(c.improvement_pct_ci_low, c.improvement_pct_ci_high)}. Router logsumexp {part.router_logsumexp.mean():.3f} "
            f"vs baseline {base_lse:.3f}; entropy {part.router_entropy.mean():.3f} vs {base_h:.3f} nats."
        )
    c = paired.loc["z=0.01"]
    inside = c.improvement_pct_ci_low <= 5.7 <= c.improvement_pct_ci_high
    lines.append(
        f"The original reported a 5.7% lower test PPL at z=0.01 (improvement +5.7%, one seed). That is {'inside' if inside else 'outside'} "
        f"our 95% CI for the improvement, [{c.improvement_pct_ci_low:+.2f}%, {c.improvement_pct_ci_high:+.2f}%]"
        + _versus_reported(inside, c.improvement_pct_ci_high < 5.7, c.improvement_pct)
    )
    return lines


# --------------------------------------------------------------------------- specialization (notebook 05)
@dataclass
class SpecializationAnalysis:
    """Every run of the specialization study traced over one split.

    ``traces[(condition, seed)]`` is a :class:`~moe_lib.specialization.RoutingTrace`;
    ``mi`` has one row per (condition, seed, variable, layer) with the columns of
    :func:`~moe_lib.specialization.mi_by_layer`.
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
    from . import specialization as spec
    from .checkpoint import load_checkpoint
    from .train import load_data, resolve_device

    finished = set(study.results["run_id"])
    runs = [r for r in study.grid.runs if r.run_id in finished]
    if not runs:
        raise ValueError(f"grid {study.grid.name!r} has no finished runs to analyse")
    data = load_data(runs[0].config.data)
    tokens = getattr(data, split)
    annotation = spec.annotate_split(tokens, data.tokenizer)
    fields = {k for doc in annotation.documents for k, v in doc.items() if v is not None}
    variables = tuple(v for v in variables if v in ("token_class", "token") or v in fields)
    device = resolve_device(study.profile.base.train.device)
    traces, frames = {}, []
    for run in runs:
        model, config, _ = load_checkpoint(checkpoint_dir(study, run.condition, run.seed), device=device)
        trace = spec.trace_routing(
            model, tokens, annotation=annotation, seq_len=config.train.seq_len, batch_size=batch_size, seed=run.seed,
            name=f"{run.condition}, seed {run.seed}",
        )
        traces[(run.condition, run.seed)] = trace
        frame = spec.mi_by_layer(trace, variables)
        frame.insert(0, "seed", run.seed)
        frame.insert(0, "condition", run.condition)
        frames.append(frame)
    return SpecializationAnalysis(study, split, annotation, traces, pd.concat(frames, ignore_index=True))


def _interval(mean: float, low: float, high: float, digits: int = 4) -> str:
    if pd.isna(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


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
        f"{learned} (bits)": [_interval(m, lo, hi) for m, lo, hi in zip(c.learned_mean, c.learned_ci_low, c.learned_ci_high)],
        f"{control} (bits)": [_interval(m, lo, hi) for m, lo, hi in zip(c.random_mean, c.random_ci_low, c.random_ci_high)],
        "x chance": [f"{r:.1f}" for r in c.ratio],
        "paired difference [95% CI]": [_interval(m, lo, hi) for m, lo, hi in zip(c.difference, c.difference_ci_low, c.difference_ci_high)],
        "p (paired t)": [f"{p:.3f}" if pd.notna(p) else "–" for p in c.p_value],
        "share of H(label)": [f"{100 * f:.2f}%" for f in c.learned_fraction],
        "Miller-Madow bias": [f"{b:.5f}" for b in c.miller_madow_bits],
    })
    return table.set_index(["variable", "layer"])


def specialization_verdicts(analysis: SpecializationAnalysis, learned: str = "learned top-2", control: str = "random top-2") -> list[str]:
    """Plain-language findings computed from the traces: MI beyond chance, the strongest
    class preferences and co-activations, each against the random router's chance level."""
    from . import specialization as spec

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
            f"H({variable}) = {best.label_entropy_bits:.3f} bits; {_significance(best.difference_ci_low, best.difference_ci_high)}."
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
                table = spec.label_utilization(trace, trace.labels(label), label)
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
            maxima[condition] = [float(np.nanmax(lift)) for trace in analysis.traces_of(condition) for lift in spec.coactivation(trace)[1]]
        chance = max(maxima[control])
        above = sum(m > chance for m in maxima[learned])
        lines.append(
            f"Co-activation: the most over-represented expert pair of a layer has lift {np.mean(maxima[learned]):.2f} on average "
            f"for the learned router (over layers and seeds) and at most {chance:.2f} for the random router; "
            f"{above} of {len(maxima[learned])} learned layer-seed maxima exceed that chance maximum."
        )
    return lines


# --------------------------------------------------------------------------- capacity (notebook 05)
def capacity_table(study: StudyResult) -> pd.DataFrame:
    """Per condition: dropped slots (in training at the run's capacity factor, mean over steps; mean over
    layers and per layer), the floor ``1 - cf`` that any routing must drop when cf < 1, validation
    perplexity (at the evaluation capacity, ``ModelConfig.capacity_factor_eval``) and its change vs
    dropless at the same lb."""
    r = study.results.copy()
    rows = []
    for condition in _conditions(study):
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
            "val PPL": _mean_std(part.val_perplexity, 2),
            "vs dropless": f"{100 * (part.val_perplexity.mean() / dropless.val_perplexity.mean() - 1):+.1f}%" if len(dropless) else "–",
            "ms/step": f"{part.ms_per_step.mean():.0f}",
        })
    return pd.DataFrame(rows).set_index(["capacity factor", "lb weight"])


def capacity_verdicts(study: StudyResult, seed_std: float | None = None, threshold: float = 0.01) -> list[str]:
    """Findings computed from the capacity sweep. ``seed_std``: the seed-to-seed std of validation
    perplexity for the dropless lb 0.01 configuration (from a multi-seed study), the yardstick for
    whether a one-seed difference is more than noise."""
    r = study.results
    lines = []
    below_one = r[r.capacity_factor < 1]
    for _, row in below_one.iterrows():
        floor = 1 - row.capacity_factor
        lines.append(
            f"cf={capacity_label(row.capacity_factor)}, lb={row.load_balancing_weight}: {100 * row.train_dropped_fraction:.1f}% of slots dropped; "
            f"the experts hold at most ceil(cf N k / E) x E ~ {100 * row.capacity_factor:.0f}% of the routed slots, so at least "
            f"{100 * floor:.0f}% must drop: {'consistent' if row.train_dropped_fraction >= floor - 1e-6 else 'INCONSISTENT'} with the formula."
        )
    for lb, part in r.groupby("load_balancing_weight", sort=False):
        finite = part.dropna(subset=["capacity_factor"]).sort_values("capacity_factor")
        ok = finite[finite.train_dropped_fraction < threshold]
        first = f"cf={capacity_label(ok.capacity_factor.iloc[0])}" if len(ok) else "no finite capacity factor in the sweep"
        lines.append(f"lb={lb}: fewer than {100 * threshold:.0f}% of slots dropped first at {first}.")
    for cf in (1.0, 1.25):
        on = r[(r.capacity_factor == cf) & (r.load_balancing_weight > 0)].train_dropped_fraction.mean()
        off = r[(r.capacity_factor == cf) & (r.load_balancing_weight == 0)].train_dropped_fraction.mean()
        if pd.notna(on) and pd.notna(off):
            lines.append(
                f"cf={cf}: {100 * on:.2f}% dropped with load balancing vs {100 * off:.2f}% without: "
                + (f"the auxiliary loss cuts drops {off / on:.1f}x." if on > 0 and off > on else "load balancing does not reduce drops here." if off <= on else "no drops with load balancing.")
            )
    for lb, part in r.groupby("load_balancing_weight", sort=False):
        base = part[part.capacity_factor.isna()].val_perplexity.mean()
        if pd.isna(base):
            continue
        for _, row in part.dropna(subset=["capacity_factor"]).sort_values("capacity_factor").iterrows():
            diff = row.val_perplexity - base
            noise = ""
            if seed_std is not None and pd.notna(seed_std):
                noise = f"; {'more' if abs(diff) > 2 * seed_std else 'less'} than 2 seed-std ({2 * seed_std:.2f} PPL) of the dropless model"
            lines.append(
                f"lb={lb}, cf={capacity_label(row.capacity_factor)}: val PPL {row.val_perplexity:.2f} vs dropless {base:.2f} "
                f"({diff:+.2f}, {100 * diff / base:+.1f}%{noise})."
            )
    fast = r[r.capacity_factor == r.capacity_factor.min()].ms_per_step.mean()
    slow = r[r.capacity_factor.isna()].ms_per_step.mean()
    if pd.notna(fast) and pd.notna(slow):
        lines.append(
            f"Time per step: {fast:.0f} ms at cf={capacity_label(r.capacity_factor.min())} vs {slow:.0f} ms dropless "
            "(wall-clock on this machine; on shared CPUs a rough guide only)."
        )
    return lines


# --------------------------------------------------------------------------- dispatch (notebook 06)
def dispatch_table(study: StudyResult) -> pd.DataFrame:
    """Per dispatch: ms/step, tokens/s, test loss, and the largest gap in logged training loss to
    the other dispatch on the same seed (the two compute the same function; float rounding differs)."""
    h = study.histories
    rows = []
    for condition in _conditions(study):
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


@dataclass
class StudyReport:
    summary: pd.DataFrame
    figure_paths: list[Path]


def report_study(study: StudyResult, show: bool = False) -> StudyReport:
    """The study's main table and figures (saved under images/ except in the smoke profile)."""
    import matplotlib.pyplot as plt

    from . import plots

    name, h = study.grid.name, study.histories
    num_experts = study.grid.runs[0].config.model.num_experts
    figures = {
        f"{name}_loss": plots.plot_loss_curves(h, title=f"{name}: LM loss"),
        f"{name}_routing_entropy": plots.plot_routing_entropy(h, num_experts=num_experts),
    }
    if name == "noise_factorial":
        summary = noise_condition_table(study)
        s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=["best_val_perplexity"])
        figures[f"{name}_interaction"] = plots.plot_interaction(
            s, "noise_std", "load_balancing_weight", "best_val_perplexity", "best validation perplexity", "Noise x load balancing"
        )
    elif name == "zloss":
        summary = zloss_table(study)
        figures[f"{name}_logit_magnitude"] = plots.plot_layer_metric(h, "logsumexp", "mean logsumexp", "Router logit magnitude")
    elif name == "dispatch":
        summary = dispatch_table(study)
    elif name == "capacity":
        summary = capacity_table(study)
        figures[f"{name}_sweep"] = plots.plot_capacity_sweep(study.results, title="Capacity factor: dropped slots and validation perplexity")
    else:
        summary = routing_table(study)
    paths = [plots.save_figure(f, n, study.profile) for n, f in figures.items()]  # a temp folder under smoke
    if not show:
        for fig in figures.values():
            plt.close(fig)
    return StudyReport(summary, paths)
