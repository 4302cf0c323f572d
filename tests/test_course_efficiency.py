"""The course's efficiency report: FLOPs of the runs trained in this invocation / (wall time x peak)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pandas as pd
import pytest

from moe_lib.course import cli
from moe_lib.course import efficiency as ce
from moe_lib.config import RunConfig
from moe_lib.runs import Grid, run_grid
from moe_lib.moe.model import flops_per_token


def test_efficiency_is_training_flops_over_wall_time_times_peak():
    report = ce.CourseEfficiency(training_flops=1.5e14, runs_trained=3, wall_seconds=3000.0, peak_flops=100e9,
                                 machine="Test CPU, 2 cores", profile="cpu", jobs="2", date="2026-01-01 00:00")
    assert report.efficiency == pytest.approx(0.5)  # 1.5e14 / (3000 s x 1e11 FLOP/s)
    assert "= 50.0%" in report.text() and "0.15 PFLOP" in report.text() and "50.0 min" in report.text()
    assert report.markdown_row() == "| 2026-01-01 00:00 | Test CPU, 2 cores | cpu | 2 | 3 | 0.150 | 50.0 | 100 | 50.0% |"


def test_run_flops_are_flops_per_token_times_tokens_trained():
    config = RunConfig()
    t = config.train
    assert ce.run_training_flops(config) == flops_per_token(config.model, t.seq_len) * t.steps * t.batch_size * t.seq_len * t.grad_accum_steps


def test_only_runs_trained_after_the_start_and_not_reused_count(tmp_path):
    grid = Grid.from_conditions("g", RunConfig(), {"a": {"noise_std": 0.1}, "b": {"noise_std": 0.2}}, (1, 2))
    run_ids = grid.run_ids
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "grid.json").write_text(json.dumps(grid.describe(), default=str))
    pd.DataFrame({
        "run_id": run_ids, "condition": ["a", "a", "b", "b"], "seed": [1, 2, 1, 2], "config_hash": [r.config_hash for r in grid.runs],
        "vocab_size": [100, 100, 100, 100],
        "reused_from": [None, None, "other/x", None],
        "finished_at": ["2026-01-01T10:00:00+00:00", "2026-01-01T12:00:00+00:00", "2026-01-01T12:30:00+00:00", "2026-01-01T13:00:00+00:00"],
    }).to_csv(tmp_path / "g.csv", index=False)
    found = ce.runs_trained_since(tmp_path, datetime(2026, 1, 1, 11, tzinfo=timezone.utc))
    assert found.run_id.tolist() == [run_ids[1], run_ids[3]]  # run 0 is older, run 2 was copied
    expected = ce.run_training_flops(grid.runs[1].config.with_model(vocab_size=100))
    assert found.flops.iloc[0] == expected and expected != ce.run_training_flops(grid.runs[1].config)


def test_the_report_is_appended_under_its_own_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Machine\n\nsome table\n\n## Targets\n\nlast\n")
    for row in ("| row 1 |", "| row 2 |"):
        ce.append_row_to_section(results, ce.SECTION, ce.TABLE_HEADER, row, ce.PREAMBLE)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## Machine\n\nsome table\n\n## Targets\n\nlast\n")
    section = text[text.index(ce.SECTION):]
    assert section.count(ce.TABLE_HEADER) == 1 and section.index("| row 1 |") < section.index("| row 2 |")
    # a section in the middle keeps what follows it
    results.write_text(f"# R\n\n{ce.SECTION}\n\n{ce.TABLE_HEADER}\n| old |\n\n## After\n\nkept\n")
    ce.append_row_to_section(results, ce.SECTION, ce.TABLE_HEADER, "| new |")
    assert results.read_text() == f"# R\n\n{ce.SECTION}\n\n{ce.TABLE_HEADER}\n| old |\n| new |\n\n## After\n\nkept\n"


def test_measure_course_reports_the_runs_trained_inside_it(tmp_path, monkeypatch):
    import worker_stubs

    monkeypatch.setattr(ce, "project_root", lambda: tmp_path)
    monkeypatch.setattr(ce, "measure_fp32_peak", lambda: 50e9)
    monkeypatch.setenv(worker_stubs.CONTROL_ENV, str(tmp_path))
    grid = worker_stubs.stub_grid(2)
    run_grid(Grid.from_conditions("before", RunConfig(), {"a": {"noise_std": 0.3}}, (1,)), tmp_path / "results" / "cpu",
             train_fn=worker_stubs.fake_train, progress=False)  # finished before the course: not counted
    time.sleep(1.1)  # rows record whole seconds
    with ce.measure_course("cpu") as measured:
        run_grid(grid, tmp_path / "results" / "cpu", train_fn=worker_stubs.fake_train, progress=False)
    report = measured.report
    assert report.runs_trained == 2 and report.profile == "cpu" and report.peak_flops == 50e9
    assert report.training_flops == sum(ce.run_training_flops(r.config) for r in grid.runs)
    assert report.efficiency == report.training_flops / (report.wall_seconds * 50e9)
    assert report.markdown_row() in (tmp_path / "benchmarks" / "RESULTS.md").read_text()


def test_cli_run_accepts_study_lists_and_all_and_jobs(capsys):
    args = cli.build_parser().parse_args(["run", "all", "--jobs", "3"])
    assert args.study == list(cli.STUDIES) and args.jobs == 3
    assert cli.build_parser().parse_args(["run", "routing,zloss"]).study == ["routing", "zloss"]
    for bad in (["run", "routing,nope"], ["run", "zloss", "--jobs", "0"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(bad)
    assert "unknown study ['nope']" in capsys.readouterr().err


def test_cli_run_trains_several_studies_in_workers_on_the_smoke_profile(capsys):
    """`run STUDY,STUDY --jobs 2` on the smoke profile (its results go to a temp folder)."""
    assert cli.main(["run", "dispatch,specialization", "--profile", "smoke", "--seeds", "42", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "in 2 worker processes" in out
    paths = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("results: ")]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["dispatch.csv", "specialization.csv"]
    assert [len(pd.read_csv(p)) for p in paths] == [2, 2]


def test_write_section_replaces_only_its_own_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## A\n\na\n\n## B\n\nb\n")
    ce.write_section(results, "## Grid", "first")
    ce.write_section(results, "## Grid", "second")
    assert results.read_text() == "# R\n\n## A\n\na\n\n## B\n\nb\n\n## Grid\n\nsecond\n"
    ce.write_section(results, "## A", "new a")
    assert results.read_text() == "# R\n\n## A\n\nnew a\n\n## B\n\nb\n\n## Grid\n\nsecond\n"
