"""``moe_lib``: the code of the MoE course. The names a learner uses most, importable from here::

    from moe_lib import ModelConfig, MoETransformer, get_profile, train_run, run_study

The package, in layers (each imports only from its own layer or a lower one):

* core - :mod:`~moe_lib.config`, :mod:`~moe_lib.moe` (the model the notebooks rebuild), :mod:`~moe_lib.data`,
  :mod:`~moe_lib.metrics`, :mod:`~moe_lib.stats`, :mod:`~moe_lib.plots`, :mod:`~moe_lib.profiles`;
* training - :mod:`~moe_lib.training`, :mod:`~moe_lib.parallel` (expert parallelism);
* runs - :mod:`~moe_lib.runs` (grids of runs and their stored results);
* studies - :mod:`~moe_lib.studies` (one module per study: its grid, tables and verdicts);
* course - :mod:`~moe_lib.course` (the command line, the notebook runner, every notebook's first cell).

The names below load on first use (PEP 562), so ``import moe_lib`` itself imports neither torch nor pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_HOMES = {
    "ModelConfig": "config", "DataConfig": "config", "TrainConfig": "config", "RunConfig": "config",
    "MoETransformer": "moe", "MoEFeedForward": "moe", "TopKRouter": "moe",
    "get_profile": "profiles",
    "train_run": "training.loop", "load_checkpoint": "training.checkpoint",
    "Grid": "runs", "run_grid": "runs", "load_results": "runs",
    "run_study": "studies", "build_grid": "studies",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'moe_lib' has no attribute {name!r}; its public names are {__all__}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
