"""How close the course came to the machine's peak: training FLOPs / (wall time x measured fp32 peak).

``python -m moe_lib course`` (``python tasks.py course``) measures the machine's fp32 GEMM peak at
the start (a square ``torch.mm`` for about two seconds on all threads), times the whole course, and
at the end counts the training FLOPs of every grid run the course really trained: rows of
``results/<profile>/*.csv`` finished after the start and not copied from another study
(``reused_from``), at ``flops_per_token(model, seq_len) x steps x tokens per step``
(:func:`moe_lib.moe.model.flops_per_token`). Evaluation, tokenizer training, data preparation,
analysis and the few runs a notebook trains outside a grid count in the wall time but not in
the FLOPs, so the efficiency is a lower bound. The result is printed and appended to
``benchmarks/RESULTS.md`` (atomically) with the machine it ran on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pandas as pd

from ..config import RunConfig
from ..files import atomic_write_text
from ..moe.model import flops_per_token
from ..profiles import default_profile_name, project_root

SECTION = "## Course efficiency (`python -m moe_lib course`)"
TABLE_HEADER = (
    "| date (UTC) | machine | profile | jobs | runs trained | training PFLOP | wall time (min) | fp32 peak (GFLOP/s) | course efficiency |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|"
)


def measure_fp32_peak(size: int = 2048, seconds: float = 2.0, threads: int | None = None) -> float:
    """FLOP/s of a square fp32 ``torch.mm`` (``2 size^3`` FLOPs), the median over at least ``seconds``."""
    import torch
    from torch.utils import benchmark

    a, b = torch.randn(size, size), torch.randn(size, size)
    timer = benchmark.Timer(stmt="torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}, num_threads=threads or torch.get_num_threads())
    return 2.0 * size**3 / timer.blocked_autorange(min_run_time=seconds).median


def machine_description() -> str:
    """``"AMD EPYC 7B13, 2 cores"`` (the CPU model from /proc/cpuinfo where there is one), plus the GPU if any."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from ..runs import available_cores

    text = f"{cpu}, {available_cores()} cores"
    with contextlib.suppress(ImportError, RuntimeError):
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
    return text


def run_training_flops(config: RunConfig) -> float:
    """``flops_per_token(model, seq_len) x steps x tokens per step``: forward and backward of every trained token."""
    t = config.train
    return float(flops_per_token(config.model, t.seq_len)) * t.steps * t.tokens_per_step


def runs_trained_since(results_dir: str | Path, since: datetime) -> pd.DataFrame:
    """``grid, run_id, flops`` of every run in ``results_dir`` finished at or after ``since`` and trained, not reused."""
    rows = []
    for csv in sorted(Path(results_dir).glob("*.csv")):
        described = Path(results_dir) / csv.stem / "grid.json"
        if not described.is_file():
            continue
        configs = {r["run_id"]: r["config"] for r in json.loads(described.read_text(encoding="utf-8"))["runs"]}
        table = pd.read_csv(csv, dtype={"run_id": str})
        finished = pd.to_datetime(table["finished_at"], utc=True)
        trained = table["reused_from"].isna() if "reused_from" in table.columns else pd.Series(True, index=table.index)
        for _, row in table[(finished >= pd.Timestamp(since)) & trained].iterrows():
            config = RunConfig.from_dict(configs[row.run_id])
            if "vocab_size" in row and pd.notna(row.vocab_size):  # train_run sizes the model to the corpus's vocabulary
                config = config.with_model(vocab_size=int(row.vocab_size))
            rows.append({"grid": csv.stem, "run_id": row.run_id, "flops": run_training_flops(config)})
    return pd.DataFrame(rows, columns=["grid", "run_id", "flops"])


@dataclass
class CourseEfficiency:
    """One course run's totals; ``efficiency = training_flops / (wall_seconds x peak_flops)``."""

    training_flops: float
    runs_trained: int
    wall_seconds: float
    peak_flops: float  # FLOP/s
    machine: str
    profile: str
    jobs: str
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"))

    @property
    def efficiency(self) -> float:
        return self.training_flops / (self.wall_seconds * self.peak_flops)

    def text(self) -> str:
        return (
            f"[course] {self.runs_trained} runs trained, {self.training_flops / 1e15:.2f} PFLOP of training "
            f"in {self.wall_seconds / 60:.1f} min on {self.machine} (profile {self.profile}, jobs {self.jobs}); "
            f"fp32 peak {self.peak_flops / 1e9:,.0f} GFLOP/s; course efficiency = training FLOPs / (wall time x peak) "
            f"= {100 * self.efficiency:.1f}%"
        )

    def markdown_row(self) -> str:
        return (
            f"| {self.date} | {self.machine} | {self.profile} | {self.jobs} | {self.runs_trained} | {self.training_flops / 1e15:.3f} | "
            f"{self.wall_seconds / 60:.1f} | {self.peak_flops / 1e9:,.0f} | {100 * self.efficiency:.1f}% |"
        )


def _section_span(text: str, section: str) -> tuple[int, int]:
    """Start and end of ``section`` (its heading to the next ``## `` heading or the end) in ``text``."""
    start = text.index(section)
    following = text.find("\n## ", start + len(section))
    return start, len(text) if following < 0 else following + 1


def write_section(path: str | Path, section: str, body: str) -> None:
    """Replace ``section`` of a Markdown file with ``body`` (added at the end if missing), atomically."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    start, end = _section_span(text, section)
    block = f"{section}\n\n{body.strip()}\n" + ("\n" if end < len(text) else "")
    atomic_write_text(path, text[:start] + block + text[end:])


def append_row_to_section(path: str | Path, section: str, header: str, row: str, preamble: str = "") -> None:
    """Add ``row`` to the table under ``section`` in a Markdown file (the section and table are
    created at the end when missing), written atomically."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{preamble}{header}\n"
    start, end = _section_span(text, section)
    body = text[start:end].rstrip("\n") + f"\n{row}\n"
    atomic_write_text(path, text[:start] + body + ("\n" + text[end:] if end < len(text) else ""))


PREAMBLE = (
    "Training FLOPs of the grid runs each course trained (`flops_per_token x tokens`, reused runs excluded) / "
    "(wall time of the whole course x the fp32 GEMM peak measured at its start, all threads). Written by "
    "`moe_lib.course.efficiency`; a lower bound: evaluation, data preparation and analysis count only in the time.\n\n"
)


@dataclass
class CourseMeasurement:
    report: CourseEfficiency | None = None


def _default_jobs() -> int:
    import torch

    from ..runs import default_jobs

    return default_jobs("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def measure_course(profile: str | None, results_md: str | Path | None = None) -> Iterator[CourseMeasurement]:
    """Measure the peak, time the block, then report and store its efficiency (only if the block finished)."""
    profile = profile or default_profile_name()
    peak = measure_fp32_peak()
    since = datetime.now(timezone.utc).replace(microsecond=0)  # results rows record whole seconds
    start, measured = time.perf_counter(), CourseMeasurement()
    print(f"[course] fp32 GEMM peak of this machine: {peak / 1e9:,.0f} GFLOP/s (2048^3 torch.mm, all threads)", flush=True)
    yield measured
    runs = runs_trained_since(project_root() / "results" / profile, since)
    measured.report = CourseEfficiency(
        training_flops=float(runs.flops.sum()), runs_trained=len(runs), wall_seconds=time.perf_counter() - start,
        peak_flops=peak, machine=machine_description(), profile=profile, jobs=os.environ.get("MOE_JOBS") or f"default ({_default_jobs()})",
    )
    if results_md is None:
        results_md = project_root() / "benchmarks" / "RESULTS.md"
    append_row_to_section(results_md, SECTION, TABLE_HEADER, measured.report.markdown_row(), PREAMBLE)
