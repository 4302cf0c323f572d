"""Experiment grids and their results: what to run, where it is stored, and running it.

* :mod:`~moe_lib.runs.grid` - :class:`Grid` and :class:`Run`, and the config hash that names a run;
* :mod:`~moe_lib.runs.store` - the results CSVs and histories, each run committed atomically, and the
  reuse of a run another grid already finished;
* :mod:`~moe_lib.runs.execute` - :func:`run_grid` and :func:`retrain_run`;
* :mod:`~moe_lib.runs.workers` - worker processes that train runs in parallel.
"""

from .execute import retrain_run, run_grid
from .grid import HASH_IGNORED, HASH_OMITTED_DEFAULTS, RESULTS_VERSION, Grid, Run, config_hash
from .store import STUDY_METRICS, TIMING_COLUMNS, load_histories, load_results
from .workers import available_cores, default_jobs

__all__ = [
    "HASH_IGNORED", "HASH_OMITTED_DEFAULTS", "RESULTS_VERSION", "STUDY_METRICS", "TIMING_COLUMNS", "Grid", "Run", "available_cores",
    "config_hash", "default_jobs", "load_histories", "load_results", "retrain_run", "run_grid",
]
