"""A finished study (:class:`StudyResult`), its checkpoints, and the per-condition and seed-paired
views of its results table that every study's tables and verdicts read."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..runs import Grid, load_results, retrain_run
from ..profiles import Profile, describe_config, output_paths
from ..stats import condition_differences, paired_comparison
from ..training.loop import train_run


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
        first = self.grid.runs[0]
        return (f"profile={self.profile.name} | {describe_config(first.config)} | "
                f"varied: {', '.join(self.grid.factors)} (values of the first condition, {first.condition!r}, shown)")


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
        retrain_run(study.grid, runs[0].run_id, study.results_path.parent, root,
                    train_fn=functools.partial(train_run, profile=study.profile.name))
        study.results = load_results(study.grid, study.results_path.parent)
    return path


# --------------------------------------------------------------------------- views of the results table
def conditions(study: StudyResult) -> list[str]:
    """The grid's conditions in grid order (the row order of every table)."""
    return list(dict.fromkeys(run.condition for run in study.grid.runs))


def layer_means(rows: pd.DataFrame, prefix: str) -> list[float]:
    """Seed-mean of each ``<prefix>_L<n>`` column of ``rows``, in layer order."""
    layers = sorted(int(c.rsplit("_L", 1)[1]) for c in rows.columns if c.startswith(prefix + "_L") and c.rsplit("_L", 1)[1].isdigit())
    return [float(rows[f"{prefix}_L{l}"].mean()) for l in layers]


def per_layer(rows: pd.DataFrame, prefix: str) -> str:
    """Seed-mean of ``<prefix>_L<n>`` for each layer, as '1.10 1.05 ...'."""
    return " ".join(f"{v:.2f}" for v in layer_means(rows, prefix))


def paired_table(study: StudyResult, metric: str, baseline: str) -> pd.DataFrame:
    """:func:`~moe_lib.stats.paired_comparison` of every condition against ``baseline``, indexed by condition."""
    return paired_comparison(study.results, baseline=baseline, metric=metric).set_index("condition")


def pair_series(study: StudyResult, metric: str, baseline: str, condition: str, column: str = "difference") -> pd.Series:
    """The per-seed paired ``column`` (``difference`` or ``improvement_pct``) of ``condition`` vs ``baseline``, indexed by seed."""
    return condition_differences(study.results, baseline, condition, metric, column)


def pair_values(study: StudyResult, metric: str, baseline: str, condition: str, column: str = "difference") -> np.ndarray:
    """:func:`pair_series` as an array, in seed order."""
    return pair_series(study, metric, baseline, condition, column).to_numpy()
