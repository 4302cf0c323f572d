"""A fake trainer that worker processes can import (``tests/`` is on their ``sys.path``), for tests/test_workers.py.

The folder named by ``$MOE_TEST_CONTROL`` steers it: every call appends its run id to
``trained.log`` and writes its process id to ``started/<run_id>``; a run with a file
``block-<run_id>`` there waits until a file ``release`` appears (at most two minutes).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moe_lib.config import RunConfig
from moe_lib.runs import Grid, run_grid

CONTROL_ENV = "MOE_TEST_CONTROL"


@dataclass
class StubResult:
    metrics: dict
    history: pd.DataFrame


def fake_train(config: RunConfig, *, run_id: str, checkpoint_dir=None) -> StubResult:
    control = Path(os.environ[CONTROL_ENV])
    (control / "started").mkdir(exist_ok=True)
    (control / "started" / run_id).write_text(str(os.getpid()))
    with open(control / "trained.log", "a") as log:
        log.write(run_id + "\n")
    if (control / f"block-{run_id}").exists():
        deadline = time.monotonic() + 120
        while not (control / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    val_loss = 3.0 + 0.01 * config.train.seed
    metrics = {"val_loss": val_loss, "val_perplexity": math.exp(val_loss), "device": "cpu (stub)", "precision_used": "fp32"}
    return StubResult(metrics, pd.DataFrame({"step": [1, 2], "lm_loss": [val_loss + 1, val_loss]}))


def stub_grid(n_runs: int = 4, name: str = "stub") -> Grid:
    return Grid.from_conditions(name, RunConfig(), {"a": {"noise_std": 0.1}}, range(n_runs))


def main(results_dir: str, jobs: int, n_runs: int) -> None:
    """What the parent process of the kill tests runs."""
    run_grid(stub_grid(n_runs), results_dir, train_fn=fake_train, progress=False, jobs=jobs)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
