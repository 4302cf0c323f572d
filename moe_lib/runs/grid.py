"""What to run: a :class:`Grid` of :class:`Run` s, and the config hash that names a run's config.

A :class:`Grid` is a list of :class:`Run` s: a condition (a human label and its factor
levels), a seed and the full :class:`~moe_lib.config.RunConfig`. :func:`config_hash` identifies
what a run computes, so a stored result is matched to its config (:mod:`moe_lib.runs.store`) and
a changed config is refused, never mixed in. Running a grid: :func:`moe_lib.runs.run_grid`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..config import RunConfig
from ..data.corpora import corpus_identity

# Columns every results row starts with (the grid's factors go between condition and seed).
ID_COLUMNS = ("run_id", "condition")
RUN_COLUMNS = ("seed", "config_hash")
FINISHED_COLUMN = "finished_at"
RESERVED_COLUMNS = frozenset((*ID_COLUMNS, *RUN_COLUMNS, FINISHED_COLUMN))

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
