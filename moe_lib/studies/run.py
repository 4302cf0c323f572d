"""The course's studies as experiment grids, sized by a profile, and how to run them.

* ``routing`` - top-1, top-2, top-1 random and top-2 random routing with 4 experts
  (the moe-experiments study), and learned vs random top-2 with one shared expert (the
  original's layers had one: does it explain why random routing came close?).
* ``noise`` - routing noise_std {0, 0.1, 0.5} x load_balancing_weight {0.01, 0}
  (the routing-noise factorial; 6 conditions x seeds 42, 43, 44 = 18 runs).
* ``zloss`` - baseline, z-loss 0.001, z-loss 0.001 without router noise, z-loss 0.01
  (the z-loss tutorial; the original ran one seed, we run several).
* ``specialization`` - learned vs random top-2 routing (load balancing 0.01, dropless) on the
  profile's seeds, checkpoints kept: the models notebook 05 opens to see what experts learn.
* ``capacity`` - capacity factor {1.0, 1.25, dropless} x load balancing {0.01, 0} on the
  profile's seeds: the token-dropping trade-off of GShard and Switch, lb on/off paired by seed.
* ``dispatch`` - the same model with the grouped-GEMM and the loop dispatch.
* ``modern`` - notebook 07's grid, from :mod:`moe_lib.modern_studies`.

:func:`run_study` trains what is missing, appends each finished run to
``results/<profile>/<study>.csv`` and returns the results with their histories. Tables,
verdicts and figures of a finished study are in :mod:`moe_lib.reports`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from . import specialization as spec
from .checkpoint import load_checkpoint
from .experiments import Grid, load_histories, load_results, retrain_run, run_grid
from .modern_studies import MODERN_STUDIES
from .profiles import Profile, describe_config, get_profile, output_paths
from .statistics import capacity_label
from .train import load_data, resolve_device, train_run


SHARED_EXPERT_CONDITIONS = {"top-2 + shared": "topk", "top-2 random + shared": "random"}


def routing_grid(profile: Profile, seeds=None) -> Grid:
    """Learned vs random routing, k = 1 and 2, with 4 experts as in the original grid; and learned vs
    random top-2 with one shared expert (``num_shared_experts=1``), as in every layer of the original."""
    base = profile.base.with_model(num_experts=4, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0)
    conditions = {
        f"top-{k}" + (" random" if router == "random" else ""): {"router": router, "top_k": k, "num_shared_experts": 0}
        for router, k in (("topk", 1), ("topk", 2), ("random", 1), ("random", 2))
    }
    conditions.update({label: {"router": router, "top_k": 2, "num_shared_experts": 1} for label, router in SHARED_EXPERT_CONDITIONS.items()})
    return Grid.from_conditions("routing_types", base, conditions, seeds or profile.seeds, baseline="top-2")


NOISE_LEVELS = (0.0, 0.1, 0.5)
LB_WEIGHTS = (0.01, 0.0)


def noise_grid(profile: Profile, seeds=None) -> Grid:
    """noise_std x load_balancing_weight, 8 experts top-2, the original's Muon + AdamW hybrid."""
    conditions = {
        f"noise={noise}, lb={lb}": {"noise_std": noise, "load_balancing_weight": lb}
        for noise, lb in itertools.product(NOISE_LEVELS, LB_WEIGHTS)
    }
    base = profile.base.with_train(optimizer="muon")
    return Grid.from_conditions("noise_factorial", base, conditions, seeds or profile.seeds, baseline="noise=0.0, lb=0.01")


ZLOSS_CONDITIONS = {
    "baseline": {"z_loss_weight": 0.0, "noise_std": 0.1},
    "z=0.001": {"z_loss_weight": 0.001, "noise_std": 0.1},
    "z=0.001, no noise": {"z_loss_weight": 0.001, "noise_std": 0.0},
    "z=0.01": {"z_loss_weight": 0.01, "noise_std": 0.1},
}


def zloss_grid(profile: Profile, seeds=None) -> Grid:
    """The z-loss tutorial's four runs (load balancing 0.01 throughout), on several seeds."""
    base = profile.base.with_train(optimizer="muon", steps=profile.zloss_steps).with_model(load_balancing_weight=0.01)
    return Grid.from_conditions("zloss", base, ZLOSS_CONDITIONS, seeds or profile.seeds, baseline="baseline")


SPECIALIZATION_ROUTERS = {"learned top-2": "topk", "random top-2": "random"}


def specialization_grid(profile: Profile, seeds=None) -> Grid:
    """Learned vs random top-2 routing, load balancing 0.01, no noise, dropless, on the profile's seeds.

    The random router is the control: whatever "specialization" it shows is chance. The
    analysis needs the trained models, so :func:`run_study` always saves this grid's checkpoints.
    """
    base = profile.base.with_model(top_k=2, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0, capacity_factor=None)
    conditions = {label: {"router": router} for label, router in SPECIALIZATION_ROUTERS.items()}
    return Grid.from_conditions("specialization", base, conditions, seeds or profile.seeds, baseline="random top-2")


CAPACITY_FACTORS: tuple[float | None, ...] = (1.0, 1.25, None)  # None = dropless


def capacity_grid(profile: Profile, seeds=None) -> Grid:
    """capacity_factor x load_balancing_weight, learned top-2, on the profile's seeds.

    Three levels x two lb weights x 3 seeds = 18 runs, about 14 minutes on the cpu profile: seeds
    pair lb on/off at each capacity factor, so their difference comes with a confidence interval.
    cf 1.0 (buffers exactly the even share) and 1.25 (Switch's default) are where lb can matter.
    """
    base = profile.base.with_model(top_k=2, router="topk", noise_std=0.0, z_loss_weight=0.0)
    conditions = {
        f"cf={capacity_label(cf)}, lb={lb}": {"capacity_factor": cf, "load_balancing_weight": lb}
        for lb, cf in itertools.product(LB_WEIGHTS, CAPACITY_FACTORS)
    }
    return Grid.from_conditions("capacity", base, conditions, seeds or profile.seeds, baseline="cf=dropless, lb=0.01")


DISPATCH_SEED = 42


def dispatch_grid(profile: Profile, seeds=None) -> Grid:
    """The same model trained twice, with the sort + grouped-GEMM dispatch and with the reference
    loop over experts, on one seed (42) unless seeds are given: same maths, different speed."""
    base = profile.base.with_model(top_k=2, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0)
    conditions = {d: {"dispatch": d} for d in ("grouped", "loop")}
    return Grid.from_conditions("dispatch", base, conditions, seeds or (DISPATCH_SEED,), baseline="loop")


STUDIES: dict[str, Callable[..., Grid]] = {
    "routing": routing_grid,
    "noise": noise_grid,
    "zloss": zloss_grid,
    "specialization": specialization_grid,
    "capacity": capacity_grid,
    "dispatch": dispatch_grid,
    **MODERN_STUDIES,
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
    save_checkpoints = save_checkpoints or study in CHECKPOINTED_STUDIES
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    grid = build_grid(study, profile, seeds)
    paths = output_paths(profile)
    train_fn = functools.partial(train_run, profile=profile.name)
    checkpoint_root = paths.saved_models / grid.name if save_checkpoints else None
    results = run_grid(grid, paths.results, train_fn=train_fn, checkpoint_root=checkpoint_root, progress=progress, fresh=fresh)
    histories = load_histories(grid, paths.results)
    return StudyResult(grid, profile, results, histories, paths.results / f"{grid.name}.csv")



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


# --------------------------------------------------------------------------- tracing the specialization study (notebook 05)
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
