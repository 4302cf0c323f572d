"""Independent runs in parallel worker processes: every core busy, or several runs sharing one GPU.

A small model leaves most of a machine idle: on a 2-core CPU two single-thread runs side by side
train 1.1-1.3x the runs per hour of one run on both threads (issue 22), and one gpu-profile run
uses a small part of an H200. :func:`run_in_workers` runs independent tasks in ``jobs`` processes
of a ``concurrent.futures.ProcessPoolExecutor`` started with ``spawn`` (a fresh interpreter per
worker: no forked CUDA or OpenMP state, and the same on Linux, macOS and Windows). Each worker
sets ``torch.set_num_threads(threads)`` before its first task; on CUDA each worker holds its own
CUDA context on the one device.

How many (:func:`default_jobs`), unless ``MOE_JOBS`` says otherwise:

* CPU: one worker per core (a run's threads scale worse than runs do), at most
  :data:`MAX_DEFAULT_CPU_JOBS` (every worker holds its own model, data and optimizer in memory);
* CUDA: :data:`DEFAULT_CUDA_JOBS` workers sharing the GPU, the CPU cores split between them;
* MPS: 1 (one Metal device, no measured gain).

Each task commits its own result (the caller's function does; see
:func:`moe_lib.runs.run_grid`), so the parent holds nothing that a kill could lose. On
Linux a worker is killed with its parent (``PR_SET_PDEATHSIG``): a killed notebook kernel leaves
no orphan training the same runs as the next call.

The display is the parent's alone: workers train without progress bars, and one text bar (it
redraws in place in terminals and notebooks alike) counts finished tasks and names the task
each worker holds; a line is printed when a task finishes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

JOBS_ENV = "MOE_JOBS"
MAX_DEFAULT_CPU_JOBS = 8
DEFAULT_CUDA_JOBS = 4
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_jobs(device_type: str = "cpu", cores: int | None = None, environ: dict[str, str] | None = None) -> int:
    """``$MOE_JOBS`` if set, else by device: CPU one per core up to 8, CUDA 4, MPS 1 (module docstring)."""
    environ = os.environ if environ is None else environ
    text = environ.get(JOBS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{JOBS_ENV}={text!r} is invalid: expected a whole number of worker processes >= 1")
        return int(text)
    cores = available_cores() if cores is None else cores
    if device_type == "cuda":
        return DEFAULT_CUDA_JOBS
    if device_type == "mps":
        return 1
    return max(1, min(cores, MAX_DEFAULT_CPU_JOBS))


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """``cores // jobs``, at least 1: the workers split the cores without oversubscribing them."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs!r} is invalid: expected >= 1")
    return max(1, (available_cores() if cores is None else cores) // jobs)


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args)`` in a worker; ``label`` names it in the display."""

    label: str
    fn: Callable[..., Any]
    args: tuple = ()


# --------------------------------------------------------------------------- inside a worker
_events: Any = None


def _die_with_parent(parent_pid: int) -> None:
    """Linux: ask the kernel to SIGKILL this worker when its parent dies (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _start_worker(threads: int, parent_pid: int, events) -> None:
    global _events
    _die_with_parent(parent_pid)
    _events = events
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only allowed before any inter-op work has started
        torch.set_num_interop_threads(1)


def _run_task(index: int, fn: Callable[..., Any], args: tuple) -> float:
    """Run one task; tell the parent when it starts; return its seconds."""
    if _events is not None:
        _events.put((index, os.getpid()))
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- in the parent
class WorkerDied(RuntimeError):
    """A worker process ended without finishing its task (killed, or out of memory)."""


class _Display:
    """One tqdm text bar: finished / total, and the task each worker holds (``w1: label``)."""

    def __init__(self, title: str, total: int, enabled: bool):
        from tqdm.std import tqdm

        self.title, self.total, self.enabled = title, total, enabled
        self.bar = tqdm(total=total, desc=title, unit="run", disable=not enabled, leave=False, mininterval=1.0, dynamic_ncols=True)
        self.slots: dict[int, int] = {}  # worker pid -> worker number (1, 2, ...)
        self.holding: dict[int, str] = {}  # worker number -> label

    def started(self, pid: int, label: str) -> None:
        slot = self.slots.setdefault(pid, len(self.slots) + 1)
        self.holding[slot] = label
        self._refresh()

    def finished(self, label: str, seconds: float) -> None:
        for slot, held in list(self.holding.items()):
            if held == label:
                del self.holding[slot]
        self.bar.update(1)
        if self.enabled:
            self.bar.write(f"{self.title} finished {self.bar.n}/{self.total}: {label} ({seconds / 60:.1f} min)")
        self._refresh()

    def _refresh(self) -> None:
        self.bar.set_postfix_str(" | ".join(f"w{slot}: {label}" for slot, label in sorted(self.holding.items())))

    def close(self) -> None:
        self.bar.close()


def run_in_workers(tasks: Sequence[Task], jobs: int, threads: int, title: str = "", progress: bool = True) -> None:
    """Run every task in ``jobs`` spawned processes with ``threads`` torch threads each.

    Returns when all have finished. The first task that raises cancels those not yet started,
    lets the running ones finish, and is raised again. A worker that dies (``kill -9``, out of
    memory) raises :class:`WorkerDied`: what the tasks committed is kept; call again to resume.
    """
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs={jobs!r} and threads={threads!r} are invalid: expected both >= 1")
    context = multiprocessing.get_context("spawn")
    events = context.SimpleQueue()
    display = _Display(title, len(tasks), progress)
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(threads, os.getpid(), events))
    futures = {pool.submit(_run_task, i, t.fn, t.args): i for i, t in enumerate(tasks)}
    pending, error = set(futures), None
    try:
        while pending:
            done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            while not events.empty():
                index, pid = events.get()
                display.started(pid, tasks[index].label)
            for future in done:
                if future.cancelled():
                    continue
                label = tasks[futures[future]].label
                try:
                    display.finished(label, future.result())
                except cf.process.BrokenProcessPool as err:
                    raise WorkerDied(
                        f"{title} a worker process died (killed, or out of memory) while the pool ran {label!r}: "
                        "every run that finished is committed; call again to train the missing ones (fewer jobs if memory ran out)"
                    ) from err
                except Exception as err:  # a task's own error: let the running tasks finish, start no more
                    error = error or err
                    for other in pending:
                        other.cancel()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        display.close()
    pool.shutdown(wait=True)
    with contextlib.suppress(OSError, ValueError):
        events.close()
    if error is not None:
        raise error

