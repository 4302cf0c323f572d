"""Resumable experiment grids and the statistics the course reports on them.

A :class:`Grid` is a list of :class:`Run` s: a condition (a human label and its factor
levels), a seed and the full :class:`~moe_lib.config.RunConfig`. :func:`run_grid` trains
every run that is not yet in the grid's results CSV and commits each finished run on its own:

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

``run_grid(..., jobs=N)`` trains N runs at once in worker processes (:mod:`moe_lib.workers`). Each
worker commits its own runs; a lock file (``.<grid>.csv.lock``) serialises the CSV's
read-modify-write, so no row is lost when two finish together.

The statistics over a results table live in :mod:`moe_lib.statistics`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from filelock import FileLock

from .config import RunConfig
from .data.corpora import corpus_identity
from .files import atomic_write_text
from .workers import Task, default_jobs, run_in_workers, threads_per_job

# Columns every results row starts with (the grid's factors go between condition and seed).
ID_COLUMNS = ("run_id", "condition")
RUN_COLUMNS = ("seed", "config_hash")
FINISHED_COLUMN = "finished_at"
RESERVED_COLUMNS = frozenset((*ID_COLUMNS, *RUN_COLUMNS, FINISHED_COLUMN))

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
# Settings that change how a run is displayed or cached, not what it computes.
HASH_IGNORED = {"train": ("progress", "checkpoint_steps"), "data": ("cache_dir",)}
# Fields added after results were stored, with the default that reproduces the older runs:
# left out of the hash at that default, so the stored runs keep their hashes.
HASH_OMITTED_DEFAULTS = {"model": {
    "num_shared_experts": 0, "score_func": "softmax", "bias_update_rate": 0.0,
    "routed_scaling_factor": 1.0, "expert_groups": 1, "expert_groups_per_token": 1, "shared_expert_gate": False,
}}
# Bumped whenever the same config trains or measures differently (a fix in moe_lib), so that
# runs stored by an older moe_lib are refused instead of mixed with new ones. Version 2: the
# auxiliary losses are summed over layers (not averaged), capacity queues first choices first
# and evaluation is dropless, the router stays fp32 under autocast, evaluation no longer draws
# from the training RNG and skips padding in the routing statistics. Version 3:
# - the CPU Newton-Schulz of Muon runs in fp32, not bf16 (the Muon update changes by about 1.3%);
# - Muon trains the routed experts and the router's gate, as the original's llm.py did;
# - the config hash includes the corpus's content (a ``text:`` file's bytes, a hub revision);
# - expert choice never picks evaluation padding and honours ``capacity_factor_eval``;
# - a step that the fp16 GradScaler skipped moves no aux-loss-free bias;
# - expert parallelism draws router noise and random experts for the global batch.
RESULTS_VERSION = 3

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def _slug(text: str) -> str:
    """Filesystem-safe: anything outside ``[A-Za-z0-9._=+-]`` becomes ``_``."""
    return _SAFE.sub("_", text).strip("_") or "_"


def config_hash(config: RunConfig) -> str:
    """First 12 hex digits of sha256 over the canonical JSON (sorted keys) of the config,
    the corpus's content where it is not part of the package (:func:`corpus_identity`) and
    :data:`RESULTS_VERSION`.

    The fields in :data:`HASH_IGNORED` (progress bar, cache folder) are left out, so turning
    a progress bar off does not make finished runs look changed; so are those of
    :data:`HASH_OMITTED_DEFAULTS` while at their default, so that adding an option to the
    config does not make every stored run look changed.
    """
    data = config.to_dict()
    for section, names in HASH_IGNORED.items():
        for name in names:
            data[section].pop(name, None)
    for section, defaults in HASH_OMITTED_DEFAULTS.items():
        for name, default in defaults.items():
            if data[section].get(name) == default:
                data[section].pop(name)
    identity = corpus_identity(config.data.corpus)
    if identity is not None:  # a text file's content, a hub corpus's revision (the embedded corpus: None)
        data["data"]["corpus_content"] = identity
    if RESULTS_VERSION > 1:  # version 1 (before the constant existed) hashed the config alone
        data["results_version"] = RESULTS_VERSION
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------- runs and grids


@dataclass(frozen=True)
class Run:
    """One training run: a condition, its factor levels, a seed and the config to train.

    The seed is the run's: ``config.train.seed`` is set to ``seed`` if it differs, so
    ``Run("top-2", {}, 43, base)`` trains with seed 43 whatever ``base`` says.
    """

    condition: str
    factors: dict[str, Any] = field(hash=False)
    seed: int
    config: RunConfig

    def __post_init__(self) -> None:
        if not isinstance(self.condition, str) or not self.condition:
            raise ValueError(f"Run.condition={self.condition!r} is invalid: expected a non-empty label")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Run.seed={self.seed!r} is invalid: expected an integer >= 0")
        reserved = sorted(RESERVED_COLUMNS.intersection(self.factors))
        if reserved:
            raise ValueError(f"Run factors {reserved} clash with the results columns {sorted(RESERVED_COLUMNS)}; rename them")
        object.__setattr__(self, "factors", dict(self.factors))
        if self.config.train.seed != self.seed:
            object.__setattr__(self, "config", self.config.with_train(seed=self.seed))

    @property
    def run_id(self) -> str:
        """``factor=level__...__seed=N`` (or the condition label when there are no factors), filesystem-safe."""
        parts = [f"{k}={v}" for k, v in self.factors.items()] or [self.condition]
        return "__".join(_slug(p) for p in [*parts, f"seed={self.seed}"])

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def describe(self) -> dict[str, Any]:
        """What grid.json stores about the run."""
        return {
            "run_id": self.run_id,
            "condition": self.condition,
            "factors": self.factors,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "config": self.config.to_dict(),
        }


def apply_levels(config: RunConfig, **levels: Any) -> RunConfig:
    """Set each named field on whichever of model / train / data config has it."""
    sections = {name: {f.name for f in dataclasses.fields(getattr(config, name))} for name in ("model", "train", "data")}
    changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in levels.items():
        owner = next((name for name, fields in sections.items() if key in fields), None)
        if owner is None or key == "seed":
            valid = sorted(set().union(*sections.values()) - {"seed"})
            raise ValueError(f"unknown config field {key!r} (the seed is set per run); valid fields are {valid}")
        changes[owner][key] = value
    return config.with_model(**changes["model"]).with_train(**changes["train"]).with_data(**changes["data"])


def _level_label(levels: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in levels.items())


@dataclass(frozen=True)
class Grid:
    """A named set of runs. ``factors`` are the results' factor columns; ``baseline`` a condition label.

    Validated on creation: at least one run, unique run ids and (condition, seed) pairs,
    every run has exactly the grid's factors, and the baseline is one of the conditions.
    ``compares_time=True``: the grid's verdicts compare timings, so :func:`run_grid` trains every
    run itself rather than reuse one timed at another moment or on another machine.
    """

    name: str
    runs: Sequence[Run]
    factors: tuple[str, ...] = ()
    baseline: str | None = None
    compares_time: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", tuple(self.runs))
        object.__setattr__(self, "factors", tuple(self.factors))
        if not isinstance(self.name, str) or not self.name or _slug(self.name) != self.name:
            raise ValueError(f"Grid.name={self.name!r} is invalid: expected a non-empty file name of [A-Za-z0-9._=+-]")
        if not self.runs:
            raise ValueError(f"Grid {self.name!r} has no runs")
        for run in self.runs:
            if set(run.factors) != set(self.factors):
                raise ValueError(
                    f"run {run.run_id!r} of grid {self.name!r} has factors {sorted(run.factors)}, "
                    f"but the grid's factors are {list(self.factors)}"
                )
        for what, keys in (("run ids", [r.run_id for r in self.runs]), ("(condition, seed) pairs", [(r.condition, r.seed) for r in self.runs])):
            duplicates = sorted(str(k) for k, count in Counter(keys).items() if count > 1)
            if duplicates:
                raise ValueError(f"grid {self.name!r} has duplicate {what}: {duplicates}")
        if self.baseline is not None and self.baseline not in self.conditions:
            raise ValueError(f"Grid {self.name!r}: baseline {self.baseline!r} is not a condition; valid conditions are {self.conditions}")

    @property
    def conditions(self) -> list[str]:
        """Condition labels in grid order."""
        return list(dict.fromkeys(r.condition for r in self.runs))

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(r.seed for r in self.runs))

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "factors": list(self.factors), "baseline": self.baseline, "runs": [r.describe() for r in self.runs]}

    @classmethod
    def factorial(
        cls,
        name: str,
        base_config: RunConfig,
        factors: Mapping[str, Sequence[Any]],
        seeds: Iterable[int],
        apply: Callable[..., RunConfig] = apply_levels,
        baseline: str | Mapping[str, Any] | None = None,
    ) -> "Grid":
        """Every combination of the factors' levels x every seed.

        ``apply(config, **levels)`` builds a condition's config (default: :func:`apply_levels`).
        Conditions are labelled ``"name=level, name=level"``; ``baseline`` is such a label or
        a dict of levels.
        """
        names, seeds = list(factors), list(seeds)
        runs = []
        for combo in itertools.product(*(factors[n] for n in names)):
            levels = dict(zip(names, combo))
            config = apply(base_config, **levels)
            runs += [Run(_level_label(levels), levels, seed, config) for seed in seeds]
        if isinstance(baseline, Mapping):
            baseline = _level_label({n: baseline[n] for n in names})
        return cls(name, runs, tuple(names), baseline)

    @classmethod
    def from_conditions(
        cls,
        name: str,
        base_config: RunConfig,
        conditions: Mapping[str, Mapping[str, Any]],
        seeds: Iterable[int],
        baseline: str | None = None,
        compares_time: bool = False,
    ) -> "Grid":
        """Named conditions, each a dict of config changes (field names as in :func:`apply_levels`).

        The factors are every field any condition changes; each run's factor levels are read
        from its config, so a condition that leaves a field alone records the base value.
        """
        seeds = list(seeds)
        names = list(dict.fromkeys(k for changes in conditions.values() for k in changes))
        runs = []
        for label, changes in conditions.items():
            config = apply_levels(base_config, **changes)
            levels = {n: _field_value(config, n) for n in names}
            runs += [Run(label, levels, seed, config) for seed in seeds]
        return cls(name, runs, tuple(names), baseline, compares_time)


def _field_value(config: RunConfig, key: str) -> Any:
    for section in (config.model, config.train, config.data):
        if hasattr(section, key):
            return getattr(section, key)
    raise ValueError(f"unknown config field {key!r}")


# --------------------------------------------------------------------------- files


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


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


# pandas >= 3 parses floats exactly by default (and deprecates the option); pandas 2 needs asking.
_EXACT_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a results/history CSV: labels stay strings, floats round-trip exactly."""
    if not path.exists():
        return pd.DataFrame(columns=[*ID_COLUMNS, *RUN_COLUMNS])
    return pd.read_csv(path, dtype={c: str for c in ("run_id", "condition", "config_hash")}, **_EXACT_FLOATS)


def _remove_stale_temps(paths: GridPaths) -> None:
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


def _move_aside(paths: GridPaths) -> list[Path]:
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
    df = _read_csv(GridPaths(Path(results_dir), name).csv)
    if not isinstance(grid, Grid):
        return df
    order = {run_id: i for i, run_id in enumerate(grid.run_ids)}
    rows = df[df["run_id"].isin(order)]
    return rows.iloc[np.argsort(rows["run_id"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)


def load_histories(grid: Grid, results_dir: str | Path) -> pd.DataFrame:
    """Every finished run's history, stacked (with run_id, condition, factors, seed columns)."""
    paths = GridPaths(Path(results_dir), grid.name)
    finished = load_results(grid, results_dir)["run_id"]
    parts = [_read_csv(paths.history(r)) for r in finished if paths.history(r).exists()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*ID_COLUMNS, *grid.factors, "seed"])


# --------------------------------------------------------------------------- running


def _run_columns(run: Run) -> dict[str, Any]:
    return {"run_id": run.run_id, "condition": run.condition, **run.factors, "seed": run.seed}


def _result_row(run: Run, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Run columns, then metrics (a metric named like a run column is dropped: the grid's level wins),
    then the original study's columns if missing, then ``finished_at``."""
    row = {**_run_columns(run), "config_hash": run.config_hash}
    row.update((k, v) for k, v in metrics.items() if k not in row and k != FINISHED_COLUMN)
    for name in STUDY_METRICS:
        row.setdefault(name, float("nan"))
    row[FINISHED_COLUMN] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _append_row(csv: Path, row: dict[str, Any], replace: bool = False) -> None:
    """Re-read the CSV, add ``row`` (unless its run_id is already there), write it back atomically.
    ``replace=True`` drops an existing row of the same run_id instead (a retrained run).
    Holds ``.<name>.lock`` beside the CSV meanwhile: parallel workers commit one at a time."""
    csv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(csv.with_name(f".{csv.name}.lock")):
        _append_row_locked(csv, row, replace)


def _append_row_locked(csv: Path, row: dict[str, Any], replace: bool) -> None:
    old = _read_csv(csv)
    if replace:
        old = old[old["run_id"] != row["run_id"]].reset_index(drop=True)
    elif (old["run_id"] == row["run_id"]).any():
        return  # another process committed this run first; keep its row
    old_columns = list(old.columns) if len(old) else []
    new = pd.concat([old, pd.DataFrame([row])], ignore_index=True) if len(old) else pd.DataFrame([row])
    columns = [c for c in dict.fromkeys([*old_columns, *row]) if c != FINISHED_COLUMN] + [FINISHED_COLUMN]
    _write_csv(new[columns], csv)


def _check_unchanged(grid: Grid, existing: pd.DataFrame, csv: Path) -> None:
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

    from .training.precision import resolve_precision
    from .training.system import resolve_device

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
        rows = _read_csv(csv)
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
    (:mod:`moe_lib.workers`); ``None`` picks :func:`moe_lib.workers.default_jobs` (``$MOE_JOBS``, else
    the machine's); 1 trains in this process, one run after another. ``threads`` overrides the workers' threads. ``train_fn`` must then be
    importable by a fresh process (a module-level function or a ``functools.partial`` of one).
    Interrupting (Ctrl-C) or killing the process loses only the runs in progress; call again to carry on.
    """
    if train_fn is None:
        from .training.loop import train_run as train_fn  # deferred: torch and the model, only when no train_fn is given
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs={jobs!r} is invalid: expected a number of worker processes >= 1, or None for the machine's default")
    paths = GridPaths(Path(results_dir), grid.name)
    say = print if progress else (lambda *a, **k: None)
    if fresh:
        for moved in _move_aside(paths):
            say(f"[{grid.name}] moved the old results aside to {moved}")
    _remove_stale_temps(paths)

    existing = _read_csv(paths.csv)
    _check_unchanged(grid, existing, paths.csv)
    _write_grid_json(grid, paths)
    done = set(existing["run_id"])
    todo = [r for r in grid.runs if r.run_id not in done]
    say(f"[{grid.name}] {len(grid.runs) - len(todo)} of {len(grid.runs)} runs already in {paths.csv}; training {len(todo)}")
    todo = _reuse_finished(grid, todo, paths, checkpoint_root, say) if reuse and todo and not grid.compares_time else todo
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


def _reuse_finished(grid: Grid, todo: list[Run], paths: GridPaths, checkpoint_root, say) -> list[Run]:
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


def train_in_worker(grid: Grid, run: Run, paths: GridPaths, train_fn, checkpoint_root) -> None:
    """Train ``run`` and commit it (history, then row): one task of :func:`run_grid`'s worker processes."""
    _train_and_commit(grid, run, paths, train_fn, checkpoint_root, progress=False, say=lambda *a, **k: None)


def _after(columns: list[str], last: str) -> list[str]:
    """The columns after ``last``: a history's run columns end with ``seed``, a results row's with ``config_hash``."""
    return columns[columns.index(last) + 1 :]


def _reuse_and_commit(run: Run, paths: GridPaths, source: tuple[str, str], checkpoint_root) -> None:
    """Commit ``source`` (grid name, run_id), a finished run with ``run``'s config, as ``run`` of this grid."""
    other = GridPaths(paths.results_dir, source[0])
    history = _read_csv(other.history(source[1]))
    history = history[_after(list(history.columns), "seed")]
    for position, (key, value) in enumerate(_run_columns(run).items()):
        history.insert(position, key, value)
    rows = _read_csv(other.csv)
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
    _write_csv(history, paths.history(run.run_id))  # history first: the row is the commit point
    _append_row(paths.csv, _result_row(run, metrics))


def _train_and_commit(grid: Grid, run: Run, paths: GridPaths, train_fn, checkpoint_root, progress: bool, say, replace: bool = False) -> None:
    config = run.config if progress else run.config.with_train(progress=False)
    checkpoint_dir = Path(checkpoint_root) / run.run_id if checkpoint_root is not None else None
    try:
        result = train_fn(config, run_id=run.run_id, checkpoint_dir=checkpoint_dir)
    except KeyboardInterrupt:
        say(f"[{grid.name}] interrupted during {run.run_id}; finished runs are saved - call run_grid again to resume")
        raise
    history = pd.DataFrame(result.history).copy()
    for position, (key, value) in enumerate(_run_columns(run).items()):
        if key in history.columns:
            history = history.drop(columns=key)
        history.insert(position, key, value)
    _write_csv(history, paths.history(run.run_id))  # history first: the row is the commit point
    _append_row(paths.csv, _result_row(run, result.metrics), replace=replace)


def retrain_run(
    grid: Grid, run_id: str, results_dir: str | Path, checkpoint_root: str | Path,
    train_fn: Callable[..., Any] | None = None, progress: bool = True,
) -> None:
    """Train one run of ``grid`` again and save its checkpoint, replacing its results row and history.

    For a run whose row exists but whose checkpoint does not (checkpoints are large and often
    not kept). Same config and seed: on CPU the metrics come out the same, timings aside.
    """
    if train_fn is None:
        from .training.loop import train_run as train_fn  # deferred: torch and the model, only when no train_fn is given
    runs = {r.run_id: r for r in grid.runs}
    if run_id not in runs:
        raise ValueError(f"no run {run_id!r} in grid {grid.name!r}; valid: {sorted(runs)}")
    paths = GridPaths(Path(results_dir), grid.name)
    _check_unchanged(grid, _read_csv(paths.csv), paths.csv)
    say = print if progress else (lambda *a, **k: None)
    say(f"[{grid.name}] retraining {run_id} to save its checkpoint (its results row is replaced)", flush=True)
    _train_and_commit(grid, runs[run_id], paths, train_fn, checkpoint_root, progress, say, replace=True)


def _write_grid_json(grid: Grid, paths: GridPaths) -> None:
    """Describe the grid; runs recorded by earlier calls but not in this grid are kept."""
    described = grid.describe()
    if paths.grid_json.exists():
        old_runs = json.loads(paths.grid_json.read_text(encoding="utf-8")).get("runs", [])
        current = set(grid.run_ids)
        described["runs"] += [r for r in old_runs if r.get("run_id") not in current]
    atomic_write_text(paths.grid_json, json.dumps(described, indent=2, default=str) + "\n")
