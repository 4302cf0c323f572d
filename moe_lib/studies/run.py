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
* ``modern`` - notebook 08's grid (:mod:`moe_lib.studies.modern`).

:func:`run_study` trains what is missing, appends each finished run to
``results/<profile>/<grid>.csv`` and returns the results with their histories. Each study's grid,
tables and verdicts are in its module, ``moe_lib.studies.<study>``.
"""

from __future__ import annotations

import functools
from typing import Callable

from ..runs import Grid, load_histories, load_results, run_grid
from ..profiles import Profile, get_profile, output_paths
from ..training.loop import train_run
from .capacity import capacity_grid
from .dispatch import dispatch_grid
from .modern import MODERN_STUDIES
from .noise import noise_grid
from .result import StudyResult
from .routing import routing_grid
from .specialization import specialization_grid
from .zloss import zloss_grid


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


def build_grid(study: str, profile: Profile | str | None = None, seeds=None) -> Grid:
    """The grid of ``study`` (a key of :data:`STUDIES`) sized by ``profile`` (a name, default ``$MOE_PROFILE``) on ``seeds``."""
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
    jobs: int | None = None,
) -> StudyResult:
    """Run (or resume) a study; finished runs already in its CSV are not trained again.

    ``jobs`` runs train at once in worker processes (default: ``$MOE_JOBS``, else the machine's,
    :func:`moe_lib.runs.workers.default_jobs`); 1 trains them one after another in this process.

    Checkpoints go to ``saved_models/<grid>/<run_id>/`` when ``save_checkpoints`` is set, and
    always for the studies in :data:`CHECKPOINTED_STUDIES`.
    """
    save_checkpoints = save_checkpoints or study in CHECKPOINTED_STUDIES
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    grid = build_grid(study, profile, seeds)
    paths = output_paths(profile)
    train_fn = functools.partial(train_run, profile=profile.name)
    checkpoint_root = paths.saved_models / grid.name if save_checkpoints else None
    results = run_grid(grid, paths.results, train_fn=train_fn, checkpoint_root=checkpoint_root, progress=progress, fresh=fresh, jobs=jobs)
    histories = load_histories(grid, paths.results)
    return StudyResult(grid, profile, results, histories, paths.results / f"{grid.name}.csv")


def stored_study(study: str, profile: Profile | str, corpus: str | None = None) -> StudyResult | None:
    """The results stored for ``study`` at ``profile`` (e.g. the gpu runs in ``results/gpu/``), read as they
    are, with nothing trained; None when no run of the grid is stored.

    Rows are matched by run id, not config hash, so rows of an older results version are read too:
    say which version and design they come from where they are shown (``results/<profile>/README.md``).
    """
    profile = profile if isinstance(profile, Profile) else get_profile(profile, corpus=corpus)
    grid = build_grid(study, profile)
    results_dir = output_paths(profile).results
    results = load_results(grid, results_dir)
    if results.empty:
        return None
    return StudyResult(grid, profile, results, load_histories(grid, results_dir), results_dir / f"{grid.name}.csv")
