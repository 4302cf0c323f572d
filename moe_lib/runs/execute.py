"""Running a grid: :func:`run_grid` trains the runs that have no results row yet, in this process or in
worker processes (:mod:`moe_lib.runs.workers`), and commits each as it finishes (:mod:`moe_lib.runs.store`);
:func:`retrain_run` trains one run again for its checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..config import RunConfig
from .grid import Grid, Run
from .store import (
    GridPaths, append_row, check_unchanged, load_results, move_aside, read_results_csv, remove_stale_temps, resolved_hardware,
    result_row, reuse_finished, run_columns, write_grid_json, write_results_csv,
)
from .workers import Task, default_jobs, run_in_workers, threads_per_job


def run_grid(
    grid: Grid,
    results_dir: str | Path,
    train_fn: Callable[..., Any] | None = None,
    checkpoint_root: str | Path | None = None,
    progress: bool = True,
    fresh: bool = False,
    reuse: bool = True,
    jobs: int | None = 1,
    threads: int | None = None,
) -> pd.DataFrame:
    """Train the grid's runs that have no row yet, committing each as it finishes; return the grid's rows.

    ``train_fn(config, *, run_id, checkpoint_dir)`` returns an object with ``.metrics`` (a
    flat dict) and ``.history`` (a DataFrame); default :func:`moe_lib.training.loop.train_run`.
    ``checkpoint_root``: each run's checkpoint goes to ``checkpoint_root/<run_id>``.
    ``progress=False`` silences this function and the per-run progress bars.
    ``fresh=True`` moves the old CSV and history folder aside (timestamped) first.
    ``reuse=True``: a run that another grid in ``results_dir`` already trained with the same config
    hash (:func:`finished_runs_by_hash`, read once per call) is copied instead of trained again (row,
    history and, if this grid keeps checkpoints, the checkpoint), its row naming the source in ``reused_from``. The
    course trains the classic top-2 model in three studies; this trains it once. Only a run made on the
    same device kind and precision as this one would be (:func:`resolved_hardware`) is reused, never
    into a grid with ``compares_time``, and the copied row's timings are blanked (:data:`TIMING_COLUMNS`).
    ``jobs``: runs trained at once, each in a worker process with ``cores // jobs`` threads
    (:mod:`moe_lib.runs.workers`); ``None`` picks :func:`moe_lib.runs.workers.default_jobs` (``$MOE_JOBS``, else
    the machine's); 1 trains in this process, one run after another. ``threads`` overrides the workers' threads. ``train_fn`` must then be
    importable by a fresh process (a module-level function or a ``functools.partial`` of one).
    Interrupting (Ctrl-C) or killing the process loses only the runs in progress; call again to carry on.
    """
    if train_fn is None:
        from ..training.loop import train_run as train_fn  # deferred: torch and the model, only when no train_fn is given
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs={jobs!r} is invalid: expected a number of worker processes >= 1, or None for the machine's default")
    paths = GridPaths(Path(results_dir), grid.name)
    say = print if progress else (lambda *a, **k: None)
    if fresh:
        for moved in move_aside(paths):
            say(f"[{grid.name}] moved the old results aside to {moved}")
    remove_stale_temps(paths)

    existing = read_results_csv(paths.csv)
    check_unchanged(grid, existing, paths.csv)
    write_grid_json(grid, paths)
    done = set(existing["run_id"])
    todo = [r for r in grid.runs if r.run_id not in done]
    say(f"[{grid.name}] {len(grid.runs) - len(todo)} of {len(grid.runs)} runs already in {paths.csv}; training {len(todo)}")
    todo = reuse_finished(grid, todo, paths, checkpoint_root, say) if reuse and todo and not grid.compares_time else todo
    jobs = max(1, min(_jobs_for(todo[0].config) if jobs is None else jobs, len(todo))) if todo else 1
    if jobs > 1:
        threads = threads or threads_per_job(jobs)
        say(f"[{grid.name}] training {len(todo)} runs in {jobs} worker processes, {threads} thread(s) each", flush=True)
        tasks = [Task(run.run_id, train_in_worker, (grid, run, paths, train_fn, checkpoint_root)) for run in todo]
        run_in_workers(tasks, jobs, threads, title=f"[{grid.name}]", progress=progress)
    for i, run in enumerate(todo if jobs == 1 else [], 1):
        say(f"[{grid.name}] run {i}/{len(todo)}: {run.run_id}", flush=True)
        _train_and_commit(grid, run, paths, train_fn, checkpoint_root, progress, say)
    return load_results(grid, results_dir)


def _jobs_for(config: RunConfig) -> int:
    kind = resolved_hardware(config)[0]
    return default_jobs(kind if kind in ("cpu", "mps") else "cuda")


def train_in_worker(grid: Grid, run: Run, paths: GridPaths, train_fn, checkpoint_root) -> None:
    """Train ``run`` and commit it (history, then row): one task of :func:`run_grid`'s worker processes."""
    _train_and_commit(grid, run, paths, train_fn, checkpoint_root, progress=False, say=lambda *a, **k: None)


def _train_and_commit(grid: Grid, run: Run, paths: GridPaths, train_fn, checkpoint_root, progress: bool, say, replace: bool = False) -> None:
    config = run.config if progress else run.config.with_train(progress=False)
    checkpoint_dir = Path(checkpoint_root) / run.run_id if checkpoint_root is not None else None
    try:
        result = train_fn(config, run_id=run.run_id, checkpoint_dir=checkpoint_dir)
    except KeyboardInterrupt:
        say(f"[{grid.name}] interrupted during {run.run_id}; finished runs are saved - call run_grid again to resume")
        raise
    history = pd.DataFrame(result.history).copy()
    for position, (key, value) in enumerate(run_columns(run).items()):
        if key in history.columns:
            history = history.drop(columns=key)
        history.insert(position, key, value)
    write_results_csv(history, paths.history(run.run_id))  # history first: the row is the commit point
    append_row(paths.csv, result_row(run, result.metrics), replace=replace)


def retrain_run(
    grid: Grid, run_id: str, results_dir: str | Path, checkpoint_root: str | Path,
    train_fn: Callable[..., Any] | None = None, progress: bool = True,
) -> None:
    """Train one run of ``grid`` again and save its checkpoint, replacing its results row and history.

    For a run whose row exists but whose checkpoint does not (checkpoints are large and often
    not kept). Same config and seed: on CPU the metrics come out the same, timings aside.
    """
    if train_fn is None:
        from ..training.loop import train_run as train_fn  # deferred: torch and the model, only when no train_fn is given
    runs = {r.run_id: r for r in grid.runs}
    if run_id not in runs:
        raise ValueError(f"no run {run_id!r} in grid {grid.name!r}; valid: {sorted(runs)}")
    paths = GridPaths(Path(results_dir), grid.name)
    check_unchanged(grid, read_results_csv(paths.csv), paths.csv)
    say = print if progress else (lambda *a, **k: None)
    say(f"[{grid.name}] retraining {run_id} to save its checkpoint (its results row is replaced)", flush=True)
    _train_and_commit(grid, runs[run_id], paths, train_fn, checkpoint_root, progress, say, replace=True)
