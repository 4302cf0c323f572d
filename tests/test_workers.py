"""run_grid(jobs=N): parallel worker processes that lose no finished run and change no number.

The kill tests run the grid in a real parent process (``tests/worker_stubs.py``) and kill it, or
one of its workers, with SIGKILL; then a resume must train exactly the runs that are missing.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import worker_stubs
from moe_lib.runs import workers
from moe_lib.runs import TIMING_COLUMNS, Grid, load_histories, load_results, run_grid
from moe_lib.profiles import get_profile
from moe_lib.training.loop import train_run

TESTS = Path(__file__).resolve().parent
BLOCKED = "noise_std=0.1__seed=1"  # the run that holds its worker until released


@pytest.fixture
def control(tmp_path, monkeypatch):
    folder = tmp_path / "control"
    folder.mkdir()
    monkeypatch.setenv(worker_stubs.CONTROL_ENV, str(folder))
    return folder


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))  # a zombie is dead


def committed(results: Path) -> list[str]:
    csv = results / "stub.csv"
    return pd.read_csv(csv).run_id.tolist() if csv.exists() else []


def start_parent(results: Path, jobs: int = 2, n_runs: int = 4) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    code = f"import worker_stubs; worker_stubs.main({str(results)!r}, {jobs}, {n_runs})"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


def block_one_run_and_wait(control: Path, results: Path) -> subprocess.Popen:
    """Start the parent with one run blocked; return once the other three are committed."""
    (control / f"block-{BLOCKED}").touch()
    parent = start_parent(results)
    wait_for(lambda: len(committed(results)) == 3 and (control / "started" / BLOCKED).exists(), "three committed runs")
    return parent


def resume_and_check(control: Path, results: Path) -> None:
    """A resume trains only the missing run, and the CSV holds every run exactly once."""
    (control / "release").touch()
    (control / "trained.log").unlink()
    run_grid(worker_stubs.stub_grid(), results, train_fn=worker_stubs.fake_train, progress=False, jobs=2)
    assert (control / "trained.log").read_text().split() == [BLOCKED]
    assert sorted(committed(results)) == sorted(worker_stubs.stub_grid().run_ids)


def test_kill_9_of_the_parent_loses_no_finished_run_and_leaves_no_worker(control, tmp_path):
    results = tmp_path / "results"
    parent = block_one_run_and_wait(control, results)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    assert sorted(committed(results)) == sorted(set(worker_stubs.stub_grid().run_ids) - {BLOCKED})
    if sys.platform.startswith("linux"):  # PR_SET_PDEATHSIG: the orphan does not train on beside the resume
        worker = int((control / "started" / BLOCKED).read_text())
        wait_for(lambda: not alive(worker), "the orphaned worker to die", timeout=30)
    resume_and_check(control, results)


def test_kill_9_of_a_worker_loses_no_finished_run(control, tmp_path):
    results = tmp_path / "results"
    parent = block_one_run_and_wait(control, results)
    os.kill(int((control / "started" / BLOCKED).read_text()), signal.SIGKILL)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode != 0 and "WorkerDied" in stderr and "call again" in stderr
    resume_and_check(control, results)


def test_parallel_commits_lose_no_row(control, tmp_path):
    """Four workers finishing runs as fast as they can: every row lands (the CSV's lock)."""
    grid = worker_stubs.stub_grid(24)
    rows = run_grid(grid, tmp_path, train_fn=worker_stubs.fake_train, progress=False, jobs=4, threads=1)
    assert rows.run_id.tolist() == grid.run_ids
    assert sorted((control / "trained.log").read_text().split()) == sorted(grid.run_ids)


def test_parallel_runs_equal_sequential_runs_at_the_same_thread_count(tmp_path):
    """Same seed, same numbers: two smoke runs in two worker processes (1 thread each) against the same
    two runs trained one after the other in this process (1 thread)."""
    smoke = get_profile("smoke")
    grid = Grid.from_conditions("same", smoke.base, {"top-2": {"top_k": 2}}, (42, 43))
    train_fn = functools.partial(train_run, profile="smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequential = run_grid(grid, tmp_path / "sequential", train_fn=train_fn, progress=False, jobs=1)
    finally:
        torch.set_num_threads(threads)
    parallel = run_grid(grid, tmp_path / "parallel", train_fn=train_fn, progress=False, jobs=2, threads=1)
    measured = [*TIMING_COLUMNS, "finished_at"]
    pd.testing.assert_frame_equal(parallel.drop(columns=measured), sequential.drop(columns=measured), check_exact=True)
    assert parallel.device.tolist() == sequential.device.tolist()  # both ran with 1 thread
    history = {name: load_histories(grid, tmp_path / name).drop(columns="tokens_per_s") for name in ("sequential", "parallel")}
    pd.testing.assert_frame_equal(history["parallel"], history["sequential"], check_exact=True)


def test_default_jobs_follows_the_machine_and_moe_jobs():
    assert workers.default_jobs("cpu", cores=2, environ={}) == 2
    assert workers.default_jobs("cpu", cores=64, environ={}) == workers.MAX_DEFAULT_CPU_JOBS
    assert workers.default_jobs("cuda", cores=16, environ={}) == workers.DEFAULT_CUDA_JOBS
    assert workers.default_jobs("mps", cores=8, environ={}) == 1
    assert workers.default_jobs("cpu", cores=2, environ={"MOE_JOBS": "3"}) == 3
    assert workers.threads_per_job(4, cores=16) == 4 and workers.threads_per_job(4, cores=2) == 1
    with pytest.raises(ValueError, match="MOE_JOBS='two'.*whole number"):
        workers.default_jobs("cpu", environ={"MOE_JOBS": "two"})
    with pytest.raises(ValueError, match="jobs=0 is invalid"):
        run_grid(worker_stubs.stub_grid(1), "unused", train_fn=worker_stubs.fake_train, jobs=0)
