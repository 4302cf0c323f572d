"""The results store: where a grid's results live, how a finished run is committed, and reuse.

:func:`moe_lib.runs.run_grid` trains every run of a :class:`~moe_lib.runs.grid.Grid` that is not yet
in the grid's results CSV and commits each finished run on its own:

* ``<results_dir>/<grid>.csv`` - one row per finished run: ``run_id, condition, <factors>,
  seed, config_hash, <metrics...>, finished_at``.
* ``<results_dir>/<grid>/history/<run_id>.csv`` - that run's per-step log.
* ``<results_dir>/<grid>/grid.json`` - every run's id, condition, seed, hash and config.

Every file is replaced atomically (temp file in the same folder, fsync, ``os.replace``) and a
run's history is written before its row, so the row is the commit point: a run killed at any
moment either has its row or is trained again on the next call, and no CSV is ever half
written. A run whose config changed since its row was written is refused, never mixed in.
A run that another grid in the same folder already finished with the same config hash, on the
same kind of device and precision, is copied, not trained again (:func:`find_identical_run`; its
row says so in ``reused_from``), unless the grid's verdicts compare time (``Grid.compares_time``).
A copied row's timing and memory columns are blank, their source's values kept in ``<column>_source``:
they were measured at another time, perhaps on another machine.

``run_grid(..., jobs=N)`` trains N runs at once in worker processes (:mod:`moe_lib.runs.workers`). Each
worker commits its own runs; a lock file (``.<grid>.csv.lock``) serialises the CSV's
read-modify-write, so no row is lost when two finish together.

The statistics over a results table live in :mod:`moe_lib.stats`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from filelock import FileLock

from ..config import RunConfig
from ..files import atomic_write_text
from .grid import FINISHED_COLUMN, ID_COLUMNS, RUN_COLUMNS, Grid, Run

# The original studies' result columns: always present (NaN if the trainer did not report one).
STUDY_METRICS = (
    "val_loss",
    "val_accuracy",
    "val_perplexity",
    "training_time_minutes",
    "peak_memory_gb",
    "best_val_perplexity",
    "expert_usage_cv",
)
# Measured, not computed: a reused row blanks them and keeps the source's values in "<name>_source".
TIMING_COLUMNS = ("training_time_minutes", "ms_per_step", "tokens_per_second", "peak_memory_gb")


@dataclass(frozen=True)
class GridPaths:
    """Where a grid's results live under ``results_dir``."""

    results_dir: Path
    name: str

    @property
    def csv(self) -> Path:
        return self.results_dir / f"{self.name}.csv"

    @property
    def folder(self) -> Path:
        return self.results_dir / self.name

    @property
    def grid_json(self) -> Path:
        return self.folder / "grid.json"

    def history(self, run_id: str) -> Path:
        return self.folder / "history" / f"{run_id}.csv"


def write_results_csv(df: pd.DataFrame, path: Path) -> None:
    """Write a results/history CSV atomically (no half-written file survives a kill)."""
    atomic_write_text(path, df.to_csv(index=False))


# pandas >= 3 parses floats exactly by default (and deprecates the option); pandas 2 needs asking.
_EXACT_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def read_results_csv(path: Path) -> pd.DataFrame:
    """Read a results/history CSV: labels stay strings, floats round-trip exactly."""
    if not path.exists():
        return pd.DataFrame(columns=[*ID_COLUMNS, *RUN_COLUMNS])
    return pd.read_csv(path, dtype={c: str for c in ("run_id", "condition", "config_hash")}, **_EXACT_FLOATS)


def remove_stale_temps(paths: GridPaths) -> None:
    """This grid's temp files left by a process killed mid-write (SIGKILL skips the cleanup)."""
    stale = [
        *paths.results_dir.glob(f".{paths.csv.name}.*.tmp"),
        *paths.folder.glob(".*.tmp"),
        *(paths.folder / "history").glob(".*.tmp"),
    ]
    for tmp in stale:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def move_aside(paths: GridPaths) -> list[Path]:
    """Rename the grid's CSV and folder to ``*.bak-<UTC time>`` (``fresh=True``); nothing is deleted."""
    stamp, moved = _utc_stamp(), []
    for path in (paths.csv, paths.folder):
        if path.exists():
            target = path.with_name(f"{path.name}.bak-{stamp}")
            os.replace(path, target)
            moved.append(target)
    return moved


def load_results(grid: Grid | str, results_dir: str | Path) -> pd.DataFrame:
    """The results CSV of a grid (or grid name): the grid's finished rows in grid order,
    or every row when given a name. Empty (with the id columns) if nothing ran yet."""
    name = grid.name if isinstance(grid, Grid) else grid
    df = read_results_csv(GridPaths(Path(results_dir), name).csv)
    if not isinstance(grid, Grid):
        return df
    order = {run_id: i for i, run_id in enumerate(grid.run_ids)}
    rows = df[df["run_id"].isin(order)]
    return rows.iloc[np.argsort(rows["run_id"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)


def load_histories(grid: Grid, results_dir: str | Path) -> pd.DataFrame:
    """Every finished run's history, stacked (with run_id, condition, factors, seed columns)."""
    paths = GridPaths(Path(results_dir), grid.name)
    finished = load_results(grid, results_dir)["run_id"]
    parts = [read_results_csv(paths.history(r)) for r in finished if paths.history(r).exists()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*ID_COLUMNS, *grid.factors, "seed"])



def run_columns(run: Run) -> dict[str, Any]:
    """The columns that name a run in its history and results row: run_id, condition, factors, seed."""
    return {"run_id": run.run_id, "condition": run.condition, **run.factors, "seed": run.seed}


def result_row(run: Run, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Run columns, then metrics (a metric named like a run column is dropped: the grid's level wins),
    then the original study's columns if missing, then ``finished_at``."""
    row = {**run_columns(run), "config_hash": run.config_hash}
    row.update((k, v) for k, v in metrics.items() if k not in row and k != FINISHED_COLUMN)
    for name in STUDY_METRICS:
        row.setdefault(name, float("nan"))
    row[FINISHED_COLUMN] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def append_row(csv: Path, row: dict[str, Any], replace: bool = False) -> None:
    """Re-read the CSV, add ``row`` (unless its run_id is already there), write it back atomically.
    ``replace=True`` drops an existing row of the same run_id instead (a retrained run).
    Holds ``.<name>.lock`` beside the CSV meanwhile: parallel workers commit one at a time."""
    csv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(csv.with_name(f".{csv.name}.lock")):
        _append_row_locked(csv, row, replace)


def _append_row_locked(csv: Path, row: dict[str, Any], replace: bool) -> None:
    old = read_results_csv(csv)
    if replace:
        old = old[old["run_id"] != row["run_id"]].reset_index(drop=True)
    elif (old["run_id"] == row["run_id"]).any():
        return  # another process committed this run first; keep its row
    old_columns = list(old.columns) if len(old) else []
    new = pd.concat([old, pd.DataFrame([row])], ignore_index=True) if len(old) else pd.DataFrame([row])
    columns = [c for c in dict.fromkeys([*old_columns, *row]) if c != FINISHED_COLUMN] + [FINISHED_COLUMN]
    write_results_csv(new[columns], csv)


def check_unchanged(grid: Grid, existing: pd.DataFrame, csv: Path) -> None:
    """Refuse a grid whose runs' configs differ from the hashes recorded in the CSV."""
    if "config_hash" not in existing.columns or existing.empty:
        return
    recorded = dict(zip(existing["run_id"], existing["config_hash"]))
    changed = [r for r in grid.runs if r.run_id in recorded and recorded[r.run_id] != r.config_hash]
    if changed:
        run = changed[0]
        raise ValueError(
            f"run {run.run_id!r} of grid {grid.name!r} already has a row in {csv} with config hash "
            f"{recorded[run.run_id]}, but its config now hashes to {run.config_hash} "
            f"({len(changed)} changed run(s) in all). Results of different configs must not mix: "
            f"use a new results_dir or grid name, or call run_grid(..., fresh=True) to move the old "
            f"CSV aside to a timestamped backup and start over."
        )


def device_kind(device: Any) -> str:
    """A results row's ``device`` without the thread count: ``"cpu (x86_64, 2 threads)"`` -> ``"cpu"``;
    a CUDA device keeps its name (``"NVIDIA H200"``); a missing value gives ``""``."""
    return str(device).split(" (", 1)[0] if isinstance(device, str) else ""


def resolved_hardware(config: RunConfig) -> tuple[str, str]:
    """``(device kind, precision)`` that ``config`` would train with here: ``"auto"`` resolved as
    :func:`moe_lib.training.loop.train_run` resolves it, in the terms of a results row's ``device`` and
    ``precision_used``."""
    import torch  # deferred: the grid machinery itself needs no torch

    from ..training.precision import resolve_precision
    from ..training.system import resolve_device

    device = resolve_device(config.train.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return name, resolve_precision(config.train.precision, device).name


def finished_runs_by_hash(results_dir: str | Path, exclude: str) -> dict[str, list[tuple[str, str, tuple[str, str]]]]:
    """Config hash -> ``(grid name, run_id, (device kind, precision_used))`` of every finished run of
    the OTHER grids in ``results_dir`` (those with a row and a history; ``exclude`` is this grid's
    name). Same hash: same model, data, training and seed; the hardware says where it ran."""
    found: dict[str, list[tuple[str, str, tuple[str, str]]]] = {}
    for csv in sorted(Path(results_dir).glob("*.csv")):
        if csv.stem == exclude:
            continue
        rows = read_results_csv(csv)
        if "config_hash" not in rows.columns:
            continue
        devices = rows["device"] if "device" in rows.columns else [None] * len(rows)
        precisions = rows["precision_used"] if "precision_used" in rows.columns else [None] * len(rows)
        for config_hash, run_id, device, precision in zip(rows["config_hash"], rows["run_id"], devices, precisions):
            if GridPaths(Path(results_dir), csv.stem).history(run_id).exists():
                hardware = (device_kind(device), precision if isinstance(precision, str) else "")
                found.setdefault(config_hash, []).append((csv.stem, run_id, hardware))
    return found


def find_identical_run(
    run: Run, finished: Mapping[str, list[tuple[str, str, tuple[str, str]]]], checkpoint_root: str | Path | None = None,
    hardware: tuple[str, str] | None = None,
) -> tuple[str, str] | None:
    """The ``(grid name, run_id)`` in ``finished`` (:func:`finished_runs_by_hash`) with ``run``'s config hash
    and, when ``hardware`` is given, that ``(device kind, precision)`` (:func:`resolved_hardware`): a
    CUDA bf16 run is not a CPU fp32 one. ``None`` if there is none. When ``checkpoint_root`` is given,
    one whose checkpoint sits beside it (``checkpoint_root/../<grid>/<run_id>``) is preferred."""
    candidates = [f for f in finished.get(run.config_hash, []) if hardware is None or f[2] == hardware]
    if checkpoint_root is not None:
        candidates.sort(key=lambda f: not (Path(checkpoint_root).parent / f[0] / f[1]).is_dir())
    return candidates[0][:2] if candidates else None

def reuse_finished(grid: Grid, todo: list[Run], paths: GridPaths, checkpoint_root, say) -> list[Run]:
    """Commit every run of ``todo`` that another grid already finished on this hardware; return the rest."""
    finished, hardware, rest = finished_runs_by_hash(paths.results_dir, grid.name), {}, []
    for i, run in enumerate(todo, 1):
        key = (run.config.train.device, run.config.train.precision)
        hardware.setdefault(key, resolved_hardware(run.config) if run.config_hash in finished else None)
        source = find_identical_run(run, finished, checkpoint_root, hardware[key]) if run.config_hash in finished else None
        if source is None:
            rest.append(run)
            continue
        say(f"[{grid.name}] {run.run_id} = {source[0]}'s {source[1]} (same config, seed, device and precision): reused", flush=True)
        _reuse_and_commit(run, paths, source, checkpoint_root)
    return rest

def _after(columns: list[str], last: str) -> list[str]:
    """The columns after ``last``: a history's run columns end with ``seed``, a results row's with ``config_hash``."""
    return columns[columns.index(last) + 1 :]


def _reuse_and_commit(run: Run, paths: GridPaths, source: tuple[str, str], checkpoint_root) -> None:
    """Commit ``source`` (grid name, run_id), a finished run with ``run``'s config, as ``run`` of this grid."""
    other = GridPaths(paths.results_dir, source[0])
    history = read_results_csv(other.history(source[1]))
    history = history[_after(list(history.columns), "seed")]
    for position, (key, value) in enumerate(run_columns(run).items()):
        history.insert(position, key, value)
    rows = read_results_csv(other.csv)
    row = rows[rows["run_id"] == source[1]].iloc[0]
    metrics = {k: row[k] for k in _after(list(rows.columns), "config_hash") if k != FINISHED_COLUMN}
    for name in TIMING_COLUMNS:  # measured then, perhaps elsewhere: kept aside so no verdict compares it
        measured = metrics.get(name, float("nan"))
        metrics[f"{name}_source"] = measured if pd.notna(measured) else metrics.get(f"{name}_source", float("nan"))
        metrics[name] = float("nan")
    metrics["reused_from"] = f"{source[0]}/{source[1]}"
    if checkpoint_root is not None:
        source_checkpoint, target = Path(checkpoint_root).parent / source[0] / source[1], Path(checkpoint_root) / run.run_id
        if source_checkpoint.is_dir() and not target.exists():
            shutil.copytree(source_checkpoint, target)
    write_results_csv(history, paths.history(run.run_id))  # history first: the row is the commit point
    append_row(paths.csv, result_row(run, metrics))

def write_grid_json(grid: Grid, paths: GridPaths) -> None:
    """Describe the grid; runs recorded by earlier calls but not in this grid are kept."""
    described = grid.describe()
    if paths.grid_json.exists():
        old_runs = json.loads(paths.grid_json.read_text(encoding="utf-8")).get("runs", [])
        current = set(grid.run_ids)
        described["runs"] += [r for r in old_runs if r.get("run_id") not in current]
    atomic_write_text(paths.grid_json, json.dumps(described, indent=2, default=str) + "\n")
