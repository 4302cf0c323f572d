"""The one atomic-write helper: old or new content, never a mix, and the umask's file mode."""

from __future__ import annotations

import os
import stat

import pytest

from moe_lib.runs import Grid, run_grid
from moe_lib.files import atomic_path, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_umask_mode_not_tempfiles_0600(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.csv", "x\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00")
    with atomic_path(tmp_path / "entry", directory=True) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert mode(tmp_path / "a.csv") == 0o644
    assert mode(tmp_path / "b.bin") == 0o644
    assert mode(tmp_path / "entry") == 0o755
    assert (tmp_path / "entry" / "meta.json").read_text() == "{}"
    assert not list(tmp_path.glob(".*.tmp"))


def test_results_csv_is_readable_by_the_group_and_others(tmp_path, umask_022):
    from test_experiments import FakeTrainer, noise_grid

    grid = noise_grid(seeds=(42,))
    run_grid(Grid(grid.name, grid.runs[:1], grid.factors), tmp_path, train_fn=FakeTrainer(), progress=False)
    assert mode(tmp_path / "noise.csv") == 0o644
    assert mode(tmp_path / "noise" / "grid.json") == 0o644


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_already_in_place_wins_the_race(tmp_path):
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "first").write_text("1")
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "entry", directory=True) as tmp:
            (tmp / "second").write_text("2")
    assert [p.name for p in (tmp_path / "entry").iterdir()] == ["first"]
    assert not list(tmp_path.glob(".*.tmp"))
