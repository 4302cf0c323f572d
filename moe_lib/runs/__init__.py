"""Experiment grids and their results: what to run, where it is stored, and running it.

* :mod:`~moe_lib.runs.grid` - :class:`Grid` and :class:`Run`, the config hash that names a run;
* :mod:`~moe_lib.runs.workers` - worker processes that train runs in parallel.
"""

from .grid import (
    HASH_IGNORED, HASH_OMITTED_DEFAULTS, RESULTS_VERSION, STUDY_METRICS, TIMING_COLUMNS, Grid, Run, config_hash, load_histories,
    load_results, retrain_run, run_grid,
)
from .workers import available_cores, default_jobs

__all__ = [
    "HASH_IGNORED", "HASH_OMITTED_DEFAULTS", "RESULTS_VERSION", "STUDY_METRICS", "TIMING_COLUMNS", "Grid", "Run", "available_cores",
    "config_hash", "default_jobs", "load_histories", "load_results", "retrain_run", "run_grid",
]
