"""moe_lib.course.runner: which notebooks run, and how their outputs are stored."""

from __future__ import annotations

import pytest

from moe_lib.course.runner import notebook_paths


def test_notebook_paths_picks_numbers_and_names_the_valid_ones(tmp_path):
    for name in ("01_a.ipynb", "02_b.ipynb", "notes.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in notebook_paths(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]
    assert [p.name for p in notebook_paths(tmp_path, only=["02"])] == ["02_b.ipynb"]
    with pytest.raises(ValueError, match=r"valid numbers are \['01', '02'\]"):
        notebook_paths(tmp_path, only=["07"])


def test_tidy_outputs_drops_cleared_progress_bars_and_merges_the_text_around_them():
    import nbformat

    from moe_lib.course.runner import tidy_outputs

    cell = nbformat.v4.new_code_cell("run()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="run 1/2\n"),
        nbformat.v4.new_output("stream", name="stderr", text="  3%|#  | 1/30\r" + " " * 40 + "\r"),
        nbformat.v4.new_output("stream", name="stdout", text="run 2/2\n"),
        nbformat.v4.new_output("stream", name="stderr", text="100%|###| 30/30\n"),
    ]
    nb = tidy_outputs(nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("text")]))
    outputs = nb.cells[0].outputs
    assert [(o.name, o.text) for o in outputs] == [("stdout", "run 1/2\nrun 2/2\n"), ("stderr", "100%|###| 30/30\n")]


def test_tidy_outputs_keeps_a_newline_the_kernel_sent_as_its_own_message():
    """A busy kernel can send print's text and its newline as two stream messages: the line keeps its newline."""
    import nbformat

    from moe_lib.course.runner import tidy_outputs

    cell = nbformat.v4.new_code_cell("check(...)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="exercise 3: not written yet"),
                    nbformat.v4.new_output("stream", name="stdout", text="\n")]
    nb = tidy_outputs(nbformat.v4.new_notebook(cells=[cell]))
    assert [(o.name, o.text) for o in nb.cells[0].outputs] == [("stdout", "exercise 3: not written yet\n")]


def test_kernel_environment_puts_this_checkout_first_and_keeps_the_rest():
    from pathlib import Path

    import moe_lib
    from moe_lib.course.runner import kernel_environment

    root = str(Path(moe_lib.__file__).resolve().parents[1])
    env = kernel_environment({"PYTHONPATH": f"/elsewhere{__import__('os').pathsep}{root}", "HOME": "/h"})
    assert env["PYTHONPATH"].split(__import__("os").pathsep) == [root, "/elsewhere"] and env["HOME"] == "/h"
    assert kernel_environment({})["PYTHONPATH"] == root


def test_run_course_executes_the_notebooks_with_this_checkouts_moe_lib(tmp_path, monkeypatch):
    """The bug: a kernel starts in the notebook's folder and imported whichever moe_lib the
    environment had (an editable install pointing at another clone); here a decoy on PYTHONPATH."""
    from pathlib import Path

    import nbformat

    import moe_lib
    from moe_lib.course.runner import run_course

    decoy = tmp_path / "other_clone" / "moe_lib"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(decoy.parent))
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import moe_lib; print(moe_lib.__file__)")]),
                   notebooks / "01_where.ipynb")
    run_course(notebooks)
    printed = nbformat.read(notebooks / "01_where.ipynb", as_version=4).cells[0].outputs[0].text.strip()
    assert Path(printed).resolve() == Path(moe_lib.__file__).resolve()
