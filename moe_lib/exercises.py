"""Checks for the notebooks' exercises: the learner's function against the reference, in one printed line.

A notebook exercise is a function the learner writes under its formula, left as a blank::

    def my_router_probs(x, W):
        return None  # YOUR CODE

    check("router probabilities", my_router_probs, reference_router_probs, x, W)

:func:`check` prints exactly one line and never raises, so the notebook still runs top to bottom:

* ``<name>: not written yet`` while the function returns ``None`` or raises ``NotImplementedError``;
* ``<name>: correct`` when every output matches the reference (``torch.testing.assert_close``
  with ``rtol``/``atol``) and, with ``gradients=True``, so do the autograd gradients of every
  floating-point input;
* ``<name>: <what differs>`` otherwise: which output, its shape or dtype, or the largest
  absolute difference (printed to 2 significant digits), or the exception the function raised.

The printed text depends only on the two functions' results, never on timings or raw floats at
full precision, so a notebook's stored outputs compare equal on any machine (nbval).
Each function gets its own copies of the inputs, so a learner's in-place edit cannot change
what the reference sees.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

NOT_WRITTEN = "not written yet"
CORRECT = "correct"


def outputs_of(result: Any) -> tuple:
    """A function's result as a flat tuple of outputs (a single tensor or number becomes a 1-tuple)."""
    if isinstance(result, (tuple, list)):
        return tuple(result)
    return (result,)


def copies(inputs: tuple, requires_grad: bool) -> tuple:
    """Fresh copies of the tensors in ``inputs`` (floating-point ones as gradient leaves if asked); other values as they are."""
    def copy(value):
        if not isinstance(value, torch.Tensor):
            return value
        fresh = value.detach().clone()
        return fresh.requires_grad_(requires_grad and fresh.is_floating_point())
    return tuple(copy(value) for value in inputs)


def difference(label: str, actual: Any, expected: Any, rtol: float, atol: float) -> str | None:
    """Why ``actual`` is not ``expected`` (shape, dtype or the largest absolute difference), or None when they match."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"{label} is a {type(actual).__name__}, expected a tensor of shape {tuple(expected.shape)}"
        if actual.shape != expected.shape:
            return f"{label} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        if actual.dtype != expected.dtype:
            return f"{label} has dtype {actual.dtype}, expected {expected.dtype}"
        actual, expected = actual.detach(), expected.detach()
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    except (AssertionError, TypeError, ValueError):
        if isinstance(expected, torch.Tensor) and expected.is_floating_point():
            gap = (actual.double() - expected.double()).abs().nan_to_num(nan=float("inf")).max().item()
            return f"{label} differs: max |difference| = {number(gap)} (allowed: {number(atol)} + {number(rtol)} x |expected|)"
        return f"{label} differs: {summary(actual)}, expected {summary(expected)}"
    return None


def number(value: float) -> str:
    """``value`` to 2 significant digits, exponents unpadded (``1e-6``, not ``1e-06``): short, and the same everywhere."""
    return re.sub(r"e([-+])0*(\d)", r"e\1\2", f"{value:.2g}")


def summary(value: Any) -> str:
    """A short, machine-independent description of a value for a mismatch message."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}" if value.numel() > 6 else str(value.tolist())
    return repr(value)


def gradients_of(fn: Callable, inputs: tuple) -> tuple[tuple, dict[int, torch.Tensor]]:
    """``(outputs, {input position: gradient})``: the gradient of ``sum_j <output_j, c_j>`` w.r.t. each floating-point input.

    The weights ``c_j`` are fixed pseudo-random tensors (not ones: the gradient of ``sum(softmax(z))``
    is 0 whatever the code, so a plain sum would hide errors).
    """
    leaves = copies(inputs, requires_grad=True)
    outputs = outputs_of(fn(*leaves))
    generator = torch.Generator().manual_seed(0)
    total = sum(
        (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()
        for out in outputs
        if isinstance(out, torch.Tensor) and out.requires_grad
    )
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if not isinstance(total, torch.Tensor):  # no output depends on any input
        return outputs, {i: torch.zeros_like(leaves[i]) for i in positions}
    grads = torch.autograd.grad(total, [leaves[i] for i in positions], allow_unused=True)
    return outputs, {i: torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(positions, grads)}


def compare(learner_fn: Callable, reference_fn: Callable, *example_inputs, rtol: float = 1e-4, atol: float = 1e-6,
            gradients: bool = False) -> str:
    """The verdict :func:`check` prints after the name: ``"not written yet"``, ``"correct"`` or what differs."""
    try:
        if gradients:
            mine, my_grads = gradients_of(learner_fn, example_inputs)
        else:
            with torch.no_grad():
                mine, my_grads = outputs_of(learner_fn(*copies(example_inputs, False))), {}
    except NotImplementedError:
        return NOT_WRITTEN
    except Exception as error:  # the learner's bug, reported instead of stopping the notebook
        return f"raised {type(error).__name__}: {error}"
    if all(value is None for value in mine):
        return NOT_WRITTEN
    if gradients:
        expected, expected_grads = gradients_of(reference_fn, example_inputs)
    else:
        with torch.no_grad():
            expected, expected_grads = outputs_of(reference_fn(*copies(example_inputs, False))), {}
    if len(mine) != len(expected):
        return f"returned {len(mine)} output(s), expected {len(expected)}"
    several = len(expected) > 1
    for j, (actual, wanted) in enumerate(zip(mine, expected)):
        problem = difference(f"output {j}" if several else "the output", actual, wanted, rtol, atol)
        if problem:
            return problem
    for i, wanted in expected_grads.items():
        problem = difference(f"the gradient of input {i}", my_grads[i], wanted, rtol, atol)
        if problem:
            return problem
    return CORRECT


def check(name: str, learner_fn: Callable, reference_fn: Callable, *example_inputs, rtol: float = 1e-4, atol: float = 1e-6,
          gradients: bool = False) -> None:
    """Print ``"<name>: <verdict>"`` for the learner's function against the reference on ``example_inputs``.

    See the module docstring for the verdicts. ``gradients=True`` also compares the gradients that
    autograd gives every floating-point input. Never raises on the learner's mistakes.
    """
    print(f"{name}: {compare(learner_fn, reference_fn, *example_inputs, rtol=rtol, atol=atol, gradients=gradients)}")
