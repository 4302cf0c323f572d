"""Every output that nbval compares must read the same on any CPU, BLAS, thread count and library version.

nbval compares the stored output of each cell without ``# NBVAL_IGNORE_OUTPUT`` with a fresh run, character for
character. Round-off differs between machines (vector width, BLAS kernels, summation order), so a compared cell may
print tolerance checks, counts and values rounded well above float32 noise, never raw floats. This static check catches
the usual ways that rule gets broken in the stored outputs:

- scientific notation as printed by a format spec (``1.2e-07``, ``0.0e+00``): how round-off magnitudes get printed.
  A tolerance typed in a label (``within 1e-5``) has no decimal point and no zero-padded exponent, and passes;
- decimals with more than 4 significant digits: float32 carries about 7, and summation order moves the last one or two;
- durations and throughputs (``3.2 s``, ``it/s``): they differ on every run;
- stderr (warnings, progress bars) and rich reprs other than text and the images nbval skips (pandas' HTML, SVG):
  their text changes between library versions.

``.ci/run`` complements it: it re-executes the notebooks under another thread count and another vector ISA, which
catches a value that sits near a rounding boundary.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IGNORE_MARKERS = ("NBVAL_IGNORE_OUTPUT", "NBVAL_SKIP")  # nbval's comment markers; tags use lower case and dashes
NOT_COMPARED_DATA = {"image/png", "image/jpeg"}  # nbval skips these (without --nbdime)
COMPARED_DATA = {"text/plain"}
MAX_SIGNIFICANT_DIGITS = 4

SCIENTIFIC = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+[eE][-+]?\d+|[eE][-+]?0\d+)(?![\w.])")
DECIMAL = re.compile(r"(?<![\w.])[-+]?(\d+\.\d+)(?!\.?\d)")
DURATION = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:s|ms|us|µs|sec|secs|seconds|min|mins|minutes)\b|(?:s/it|it/s)\b")


def is_compared(cell: nbformat.NotebookNode) -> bool:
    """nbval (without --nbval-lax) compares every code cell that carries no ignore/skip marker or tag."""
    if cell.cell_type != "code":
        return False
    tags = {tag.upper().replace("-", "_") for tag in cell.get("metadata", {}).get("tags", [])}
    return not any(marker in cell.source or marker in tags for marker in IGNORE_MARKERS)


def significant_digits(decimal: str) -> int:
    """Printed significant digits: '0.0833' -> 3, '152.294' -> 6, '0.5000' -> 4 (trailing zeros were printed)."""
    return len(decimal.replace(".", "").lstrip("0")) or 1


def noise_in_text(text: str) -> list[str]:
    """The tokens of `text` whose printed value can change with the hardware or the run."""
    found = [m.group(0) for m in SCIENTIFIC.finditer(text)]
    text = SCIENTIFIC.sub(" ", text)
    found += [m.group(0) for m in DECIMAL.finditer(text) if significant_digits(m.group(1)) > MAX_SIGNIFICANT_DIGITS]
    found += [m.group(0) for m in DURATION.finditer(text)]
    return found


def output_problems(output: nbformat.NotebookNode) -> list[str]:
    if output.output_type == "stream":
        if output.name == "stderr":
            return [f"stderr output {output.text[:60]!r} (warnings and progress bars change between versions)"]
        return noise_in_text(output.text)
    if output.output_type in ("execute_result", "display_data"):
        problems = [
            f"{mime} output (its text changes between library versions; print plain text instead)"
            for mime in output.data
            if mime not in COMPARED_DATA | NOT_COMPARED_DATA
        ]
        return problems + noise_in_text(output.data.get("text/plain", ""))
    return []


def notebook_problems(path: Path) -> list[str]:
    notebook = nbformat.read(path, as_version=4)
    problems = []
    for index, cell in enumerate(notebook.cells):
        if not is_compared(cell):
            continue
        first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        for output in cell.get("outputs", []):
            problems += [f"{path.name} cell {index} ({first_line[:50]!r}): {p}" for p in output_problems(output)]
    return problems


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_compared_outputs_are_hardware_independent(path):
    problems = notebook_problems(path)
    assert not problems, (
        "outputs that nbval compares must not depend on hardware, threads or library versions: print a tolerance "
        "check, a count or a well-rounded value, or mark the cell # NBVAL_IGNORE_OUTPUT\n  " + "\n  ".join(problems)
    )


@pytest.mark.parametrize(
    "text, noise",
    [
        ("max |by hand - moe_lib dispatch| = 1.2e-07", ["1.2e-07"]),
        ("max |y_grouped - y_loop|      = 0.0e+00", ["0.0e+00"]),
        ("difference 1e-06", ["1e-06"]),
        ("tensor([1.2000e-07, 3.0000e+00])", ["1.2000e-07", "3.0000e+00"]),
        ("z-loss = 152.294   top prob = 0.711", ["152.294"]),
        ("loss 4.12345, ppl 61.80", ["4.12345"]),
        ("trained in 12.3 s (45.1it/s)", ["12.3 s", "it/s"]),
        ("matches moe_lib within 1e-5: True", []),
        ("usage [0.227, 0.271]  CV 0.0833  L_lb 1.001  -4.631  0.5000", []),
        ("torch 2.13.0, 1,769,472 parameters, cf=1.25, 2 seeds, 6 steps, 24.7%", []),
    ],
)
def test_noise_detector(text, noise):
    assert noise_in_text(text) == noise


def test_detector_reads_cells_as_nbval_does(tmp_path):
    """Ignored cells, skipped cells and markdown are not compared; stderr and HTML in a compared cell are flagged."""
    notebook = nbformat.v4.new_notebook()
    stream = nbformat.v4.new_output("stream", name="stdout", text="diff = 4.8e-07\n")
    notebook.cells = [
        nbformat.v4.new_markdown_cell("diff = 4.8e-07"),
        nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nprint(diff)", outputs=[stream]),
        nbformat.v4.new_code_cell("print(diff)", outputs=[stream], metadata={"tags": ["nbval-skip"]}),
        nbformat.v4.new_code_cell("print(diff)", outputs=[stream]),
        nbformat.v4.new_code_cell("import warnings", outputs=[nbformat.v4.new_output("stream", name="stderr", text="W")]),
        nbformat.v4.new_code_cell(
            "df", outputs=[nbformat.v4.new_output("execute_result", data={"text/plain": "a", "text/html": "<t>"})]
        ),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(notebook, path)
    problems = notebook_problems(path)
    assert [p.split(":")[0] for p in problems] == ["nb.ipynb cell 3 ('print(diff)')"] + [
        "nb.ipynb cell 4 ('import warnings')",
        "nb.ipynb cell 5 ('df')",
    ]
    assert problems[0].endswith("4.8e-07")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cell_with_outputs_has_an_execution_count(path):
    # nbval fails such a cell ("Unrun reference cell has outputs"), even one marked NBVAL_IGNORE_OUTPUT
    nb = nbformat.read(path, as_version=4)
    unnumbered = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.outputs and cell.execution_count is None]
    assert not unnumbered, f"{path.name}: code cells {unnumbered} have stored outputs but no execution_count"



def test_every_figure_a_notebook_saves_carries_its_own_number():
    """After a renumbering, a notebook that still saves ``images/07_...`` writes over another notebook's figures."""
    for path in NOTEBOOKS:
        sources = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        names = re.findall(r'save_figure\([^,]+, f?"(\d\d)_', sources) + re.findall(r'"(\d\d)_[a-z_]+\.html"', sources)
        assert names or not path.name.startswith(("0",)) or "save_figure" not in sources, path.name
        wrong = [n for n in names if n != path.name[:2]]
        assert not wrong, f"{path.name} saves figures numbered {wrong}"
