"""Every notebook's "What we found" is held against the stored results.

A study notebook's findings cell reads only stored results (``stored_study``; it never trains), so
this test runs its source again on a clean checkout, with the cpu profile the stored outputs were
made with, and asserts that it prints exactly what the notebook stores. A re-run that changes a
result without re-executing the notebook, or prose edited by hand, fails here.

Notebooks 01 and 09 state findings about runs they train in the notebook itself (one first
training run; expert-parallel training on gloo ranks), which no results file stores: their
findings cells must compute every number from those runs' variables, never from literals.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from moe_lib.profiles import get_profile

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
HEADING = "## What we found"
STORED_MARK = "# What we found: reads only stored results"
IN_NOTEBOOK_RUNS = {"moe_basics", "expert_parallelism"}  # findings of runs trained in the notebook itself
SETTINGS_NAMED = {"0.5", "0.01"}  # settings a findings sentence may name as typed (capacity factor, lb weight), not results


def notebook_stem(path: Path) -> str:
    return path.stem.split("_", 1)[1]


def findings_cell(path: Path) -> dict:
    """The code cell right after the notebook's "## What we found" heading."""
    cells = json.loads(path.read_text())["cells"]
    for index, cell in enumerate(cells[:-1]):
        if cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith(HEADING):
            following = cells[index + 1]
            assert following["cell_type"] == "code", f"{path.name}: the cell after {HEADING!r} is not code"
            return following
    raise AssertionError(f"{path.name} has no {HEADING!r} section followed by its findings cell")


def printed(cell: dict) -> str:
    """The stored stdout of a cell (its stream outputs, joined)."""
    return "".join("".join(o["text"]) for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == "stdout")


NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
STUDY_NOTEBOOKS = [p for p in NOTEBOOK_PATHS if notebook_stem(p) not in IN_NOTEBOOK_RUNS]


def test_every_notebook_has_findings_and_the_lists_are_current():
    stems = {notebook_stem(p) for p in NOTEBOOK_PATHS}
    assert IN_NOTEBOOK_RUNS <= stems, f"IN_NOTEBOOK_RUNS names notebooks that do not exist: {IN_NOTEBOOK_RUNS - stems}"
    for path in NOTEBOOK_PATHS:
        cell = findings_cell(path)
        assert printed(cell).strip(), f"{path.name}: the findings cell has no stored output (execute the notebook)"


@pytest.mark.parametrize("path", STUDY_NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_findings_equal_findings_of_the_stored_results(path, monkeypatch):
    cell = findings_cell(path)
    source = "".join(cell["source"])
    assert STORED_MARK in source, f"{path.name}: the findings cell must say {STORED_MARK!r} and read stored results only"
    assert "run_study(" not in source, f"{path.name}: the findings cell must not train (use stored_study)"
    monkeypatch.chdir(path.parent)  # as the notebook runs: its own folder is the working directory
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, f"{path.name}:What we found", "exec"), {"profile": get_profile("cpu")})
    assert out.getvalue() == printed(cell), (
        f"{path.name}: 'What we found' no longer matches the stored results; re-execute the notebook "
        f"(python -m moe_lib course --only {path.name[:2]})")


@pytest.mark.parametrize("name", sorted(IN_NOTEBOOK_RUNS))
def test_in_notebook_findings_are_computed_not_typed(name):
    path = next(p for p in NOTEBOOK_PATHS if notebook_stem(p) == name)
    tree = ast.parse("".join(findings_cell(path)["source"]))
    specs = {id(node.format_spec) for node in ast.walk(tree) if isinstance(node, ast.FormattedValue) and node.format_spec}
    specs |= {id(part) for node in ast.walk(tree) if id(node) in specs for part in ast.walk(node)}
    text = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in specs]
    typed_numbers = [n for t in text for n in re.findall(r"\d+\.\d+%?|\d+%", t) if n not in SETTINGS_NAMED]
    assert not typed_numbers, f"{path.name}: numbers typed into the findings text instead of computed: {typed_numbers}"
