"""The course's three studies as experiment grids, sized by a profile.

* ``routing`` - top-1, top-2, top-1 random and top-2 random routing with 4 experts
  (the moe-experiments study).
* ``noise`` - routing noise_std {0, 0.1, 0.5} x load_balancing_weight {0.01, 0}
  (the routing-noise factorial; 6 conditions x seeds 42, 43, 44 = 18 runs).
* ``zloss`` - baseline, z-loss 0.001, z-loss 0.001 without router noise, z-loss 0.01
  (the z-loss tutorial; the original ran one seed, we run several).

:func:`run_study` trains what is missing, appends each finished run to
``results/<profile>/<study>.csv`` and returns the results with their histories.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .config import RunConfig
from .experiments import Grid, Run, load_histories, run_grid
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


STUDIES: dict[str, Callable[..., Grid]] = {"routing": routing_grid, "noise": noise_grid, "zloss": zloss_grid}


@dataclass
class StudyResult:
    """A finished grid: one results row per run, and every run's per-step history."""

    grid: Grid
    profile: Profile
    results: pd.DataFrame
    histories: pd.DataFrame
    results_path: Path


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
    """Run (or resume) a study; finished runs already in its CSV are not trained again."""
    from .train import train_run

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
]


def _mean_std(values: pd.Series, digits: int) -> str:
    values = values.astype(float)
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


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


def checkpoint_dir(study: StudyResult, condition: str) -> Path:
    """The saved checkpoint of ``condition``'s first seed (the study must run with save_checkpoints=True)."""
    run = next(r for r in study.grid.runs if r.condition == condition)
    path = output_paths(study.profile).saved_models / study.grid.name / run.run_id
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run the study with save_checkpoints=True")
    return path


def _paired(study: StudyResult, metric: str, baseline: str) -> pd.DataFrame:
    from .experiments import paired_comparison

    return paired_comparison(study.results, baseline=baseline, metric=metric).set_index("condition")


def _ci_text(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    return f"95% CI [{low:+.{digits}f}{unit}, {high:+.{digits}f}{unit}]"


def _significance(low: float, high: float) -> str:
    if pd.isna(low) or pd.isna(high):
        return "too few seeds for an interval"
    return "the CI excludes 0" if low > 0 or high < 0 else "the CI includes 0, so this is within seed noise"


def routing_verdicts(study: StudyResult) -> list[str]:
    """Plain-language comparisons computed from the routing study's results."""
    means = study.results.groupby("condition").test_loss.mean()
    lines = []
    for k in (1, 2):
        learned, random = f"top-{k}", f"top-{k} random"
        cmp = _paired(study, "test_loss", random).loc[learned]
        better = cmp.mean_difference < 0
        lines.append(
            f"Learned top-{k} vs random top-{k}: test loss {means[learned]:.3f} vs {means[random]:.3f}; "
            f"paired difference {cmp.mean_difference:+.3f} nats, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
            f"{'learned routing is better' if better else 'learned routing is NOT better'} "
            f"({_significance(cmp.difference_ci_low, cmp.difference_ci_high)}). The original found learned better (2.46/2.42 vs 2.53)."
        )
    cmp = _paired(study, "test_loss", "top-1").loc["top-2"]
    lines.append(
        f"Top-2 vs top-1 (learned): paired difference {cmp.mean_difference:+.3f} nats, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
        f"top-2 {'wins' if cmp.mean_difference < 0 else 'does not win'} ({_significance(cmp.difference_ci_low, cmp.difference_ci_high)}). "
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
    from .experiments import summarize

    metrics = ["best_val_perplexity", "expert_usage_cv", "training_time_minutes"]
    s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=metrics)
    table = pd.DataFrame({
        "noise_std": s.noise_std,
        "lb weight": s.load_balancing_weight,
        "n": s.best_val_perplexity_n,
        "best val PPL": [f"{m:.2f} ± {d:.2f}" for m, d in zip(s.best_val_perplexity_mean, s.best_val_perplexity_std)],
        "PPL 95% CI": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(s.best_val_perplexity_ci_low, s.best_val_perplexity_ci_high)],
        "usage CV": [f"{m:.4f} ± {d:.4f}" for m, d in zip(s.expert_usage_cv_mean, s.expert_usage_cv_std)],
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
        on = r[(r.noise_std == noise) & (r.load_balancing_weight == 0.01)].expert_usage_cv.mean()
        off = r[(r.noise_std == noise) & (r.load_balancing_weight == 0.0)].expert_usage_cv.mean()
        lines.append(f"noise {noise}: usage CV {off:.4f} without load balancing vs {on:.4f} with it: {off / on:.1f}x lower with lb 0.01.")
    lines.append("Original: lb 0.01 cut the CV 3.0x, 3.6x and 5.2x at noise 0, 0.1 and 0.5.")
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


def zloss_verdicts(study: StudyResult) -> list[str]:
    paired = _paired(study, "test_perplexity", study.grid.baseline)
    r = study.results
    base_lse = r[r.condition == study.grid.baseline].router_logsumexp.mean()
    base_h = r[r.condition == study.grid.baseline].router_entropy.mean()
    lines = []
    for condition, c in paired.iterrows():
        part = r[r.condition == condition]
        lines.append(
            f"{condition}: {c.improvement_pct:+.2f}% test PPL vs baseline "
            f"({_ci_text(c.improvement_pct_ci_low, c.improvement_pct_ci_high, 2, '%')}, p = {c.p_value:.3f}, {int(c.n_pairs)} paired seeds): "
            f"{_significance(c.improvement_pct_ci_low, c.improvement_pct_ci_high)}. Router logsumexp {part.router_logsumexp.mean():.3f} "
            f"vs baseline {base_lse:.3f}; entropy {part.router_entropy.mean():.3f} vs {base_h:.3f} nats."
        )
    c = paired.loc["z=0.01"]
    inside = c.improvement_pct_ci_low <= 5.7 <= c.improvement_pct_ci_high
    lines.append(
        f"The original's -5.7% PPL at z=0.01 (i.e. +5.7% improvement) is {'inside' if inside else 'outside'} our 95% CI "
        f"[{c.improvement_pct_ci_low:+.2f}%, {c.improvement_pct_ci_high:+.2f}%] for the improvement."
    )
    return lines


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
        from .experiments import summarize

        summary = noise_condition_table(study)
        s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=["best_val_perplexity"])
        figures[f"{name}_interaction"] = plots.plot_interaction(
            s, "noise_std", "load_balancing_weight", "best_val_perplexity", "best validation perplexity", "Noise x load balancing"
        )
    elif name == "zloss":
        summary = zloss_table(study)
        figures[f"{name}_logit_magnitude"] = plots.plot_layer_metric(h, "logsumexp", "mean logsumexp", "Router logit magnitude")
    else:
        summary = routing_table(study)
    paths = [plots.save_figure(f, n, study.profile) for n, f in figures.items()]  # a temp folder under smoke
    if not show:
        for fig in figures.values():
            plt.close(fig)
    return StudyReport(summary, paths)
