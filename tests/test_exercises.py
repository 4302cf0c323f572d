"""moe_lib.exercises: the one-line verdicts the notebooks' exercise cells print."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from moe_lib.exercises import check, compare


def reference_probs(x, W):
    return (x @ W.T).softmax(-1)


def reference_scores(x, W):
    logits = x @ W.T
    return logits, logits.softmax(-1)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g)


def blank(x, W):
    return None  # YOUR CODE


def not_implemented(x, W):
    raise NotImplementedError


@pytest.mark.parametrize("learner", [blank, not_implemented, lambda x, W: (None, None)])
def test_a_blank_is_not_written_yet(learner, inputs):
    assert compare(learner, reference_scores, *inputs) == "not written yet"


def test_a_correct_answer_in_another_summation_order_is_correct(inputs):
    def mine(x, W):
        logits = torch.einsum("nd,ed->ne", x, W)
        z = logits - logits.max(-1, keepdim=True).values
        return logits, z.exp() / z.exp().sum(-1, keepdim=True)

    assert compare(mine, reference_scores, *inputs, gradients=True) == "correct"


def test_check_prints_one_line_with_the_name(inputs, capsys):
    check("router scores", blank, reference_scores, *inputs)
    check("router scores", reference_scores, reference_scores, *inputs)
    assert capsys.readouterr().out == "router scores: not written yet\nrouter scores: correct\n"


def test_a_wrong_value_names_the_output_and_the_largest_difference(inputs):
    verdict = compare(lambda x, W: (x @ W.T, (x @ W.T).sigmoid()), reference_scores, *inputs)
    assert verdict.startswith("output 1 differs: max |difference| = ")
    assert "output 0" not in verdict


def test_shape_dtype_count_and_exceptions_are_reported_without_raising(inputs):
    assert compare(lambda x, W: (x @ W.T).softmax(0).T, reference_probs, *inputs) == "the output has shape (4, 5), expected (5, 4)"
    assert compare(lambda x, W: reference_probs(x, W).double(), reference_probs, *inputs) == (
        "the output has dtype torch.float64, expected torch.float32")
    assert compare(reference_probs, reference_scores, *inputs) == "returned 1 output(s), expected 2"
    assert compare(lambda x, W: x @ W, reference_probs, *inputs).startswith("raised RuntimeError: ")


def test_integer_outputs_must_be_equal(inputs):
    def top2(x, W):
        return (x @ W.T).topk(2, dim=-1).indices

    assert compare(top2, top2, *inputs) == "correct"
    verdict = compare(lambda x, W: top2(x, W).flip(-1), top2, *inputs)
    assert verdict.startswith("the output differs: tensor of shape (5, 2), expected")


def test_gradients_catch_what_the_values_do_not(inputs):
    """A detached router gives the same probabilities, but no gradient reaches W: only gradients=True sees it."""
    def detached(x, W):
        return reference_probs(x, W.detach())

    assert compare(detached, reference_probs, *inputs) == "correct"
    assert compare(detached, reference_probs, *inputs, gradients=True).startswith("the gradient of input 1 differs")


def test_a_learner_editing_its_inputs_in_place_cannot_change_the_reference(inputs):
    def vandal(x, W):
        W.zero_()
        return reference_probs(x, W)

    assert compare(vandal, reference_probs, *inputs).startswith("the output differs")
    assert compare(reference_probs, reference_probs, *inputs) == "correct"


def test_tolerances_are_the_callers():
    x = torch.tensor([1.0, 2.0])
    assert compare(lambda v: v + 1e-3, lambda v: v, x).startswith("the output differs: max |difference| = 0.001")
    assert compare(lambda v: v + 1e-3, lambda v: v, x, atol=1e-2) == "correct"


def test_numbers_in_a_verdict_are_short_and_unpadded():
    """The bug: the tolerance printed as '1e-06', which reads as round-off noise in a stored notebook output."""
    x = torch.tensor([1.0, 2.0])
    verdict = compare(lambda v: v + 2e-5, lambda v: v, x, rtol=0.0, atol=1e-6)
    assert verdict == "the output differs: max |difference| = 2e-5 (allowed: 1e-6 + 0 x |expected|)"


# --------------------------------------------------------------------------- the notebooks' real blanks
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
BLANK_MARK = "return None  # YOUR CODE"
SOLUTION_MARK = "# Solution (runs under the tests)"
# Notebooks whose blanks run here, with the ids of the cells that define the blanks' inputs (run first, in order).
RUNNABLE_BLANKS = {"06_capacity_and_token_dropping.ipynb": ["1bf9cd32"]}


def blanks_with_solutions(cells: list[dict]) -> list[tuple[str, str, str]]:
    """``(blank, solution markdown, solution code)`` sources for each code cell holding a real blank, from the two
    cells after it."""
    source = ["".join(cell["source"]) for cell in cells]
    return [(source[i], source[i + 1], source[i + 2]) for i, cell in enumerate(cells)
            if cell["cell_type"] == "code" and BLANK_MARK in source[i]]


def printed_by(code: str, namespace: dict) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<notebook cell>", "exec"), namespace)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("name", sorted(RUNNABLE_BLANKS))
def test_a_notebook_blank_is_not_written_yet_and_its_solution_cell_is_correct(name):
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    by_id = {cell.get("id"): "".join(cell["source"]) for cell in cells}
    namespace: dict = {}
    for cell_id in RUNNABLE_BLANKS[name]:
        printed_by(by_id[cell_id], namespace)
    found = blanks_with_solutions(cells)
    assert found, f"{name} has no {BLANK_MARK!r} blank"
    for blank, solution_md, solution in found:
        assert "<details><summary>Solution</summary>" in solution_md and solution.startswith(SOLUTION_MARK)
        unwritten = printed_by(blank, namespace)
        assert unwritten and all(line.endswith(": not written yet") for line in unwritten), unwritten
        solved = printed_by(solution, namespace)
        assert len(solved) == len(unwritten) and all(line.endswith(": correct") for line in solved), solved
