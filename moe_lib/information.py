"""Information measures of discrete labels, in bits: plug-in entropy, mutual information and
conditional mutual information, and the Miller-Madow bias of the plug-in MI. Pure numbers
(numpy, pandas), used to read what routing traces say about experts.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def label_codes(values) -> tuple[np.ndarray, int]:
    """Integer codes 0..K-1 for any labels (None counts as a label of its own), and K."""
    codes, uniques = pd.factorize(np.asarray(values).ravel(), use_na_sentinel=False)
    return codes, len(uniques)


def entropy_bits(values) -> float:
    """Plug-in entropy ``H(X) = -sum_x p(x) log2 p(x)`` of a sequence of labels, in bits."""
    codes, _ = label_codes(values)
    if codes.size == 0:
        return 0.0
    p = np.bincount(codes) / codes.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(x, y) -> float:
    """Plug-in ``I(X; Y) = sum p(x,y) log2 [p(x,y) / (p(x) p(y))] = H(X) + H(Y) - H(X,Y)`` in bits.

    ``x`` and ``y`` are equally long sequences of labels (any hashable, sortable values). The
    estimate is >= 0 and biased upwards for finite samples (see :func:`miller_madow_bias`).
    """
    cx, nx = label_codes(x)
    cy, ny = label_codes(y)
    if cx.size != cy.size:
        raise ValueError(f"x and y must be equally long, got {cx.size} and {cy.size}")
    return mi_from_counts(np.bincount(cx * ny + cy, minlength=nx * ny).reshape(nx, ny))


def mi_from_counts(joint_counts: np.ndarray) -> float:
    """Plug-in mutual information (bits) of a contingency table ``joint_counts[x, y]``."""
    total = joint_counts.sum()
    if total == 0:
        return 0.0
    joint = joint_counts / total
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(max(0.0, (joint[nz] * np.log2(joint[nz] / (px @ py)[nz])).sum()))


def miller_madow_bias(num_samples: int, num_x: int, num_y: int) -> float:
    """Expected plug-in MI of two *independent* variables, to first order: ``(|X|-1)(|Y|-1) / (2 M ln 2)`` bits."""
    return (num_x - 1) * (num_y - 1) / (2 * num_samples * math.log(2)) if num_samples else float("nan")


def conditional_mutual_information(x, y, z) -> float:
    """``I(X; Y | Z) = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)`` in bits (plug-in).

    With ``Z`` the token id, ``I(expert; genre | token)`` asks whether the expert choice says anything
    about the genre *beyond* what the token itself says: genres use different words, so a router that
    only looks at the token already carries genre information without knowing anything about genre.
    """
    (cx, nx), (cy, ny), (cz, nz) = label_codes(x), label_codes(y), label_codes(z)
    if not cx.size == cy.size == cz.size:
        raise ValueError(f"x, y and z must be equally long, got {cx.size}, {cy.size} and {cz.size}")

    xz = np.ravel_multi_index((cx, cz), (nx, nz))
    yz = np.ravel_multi_index((cy, cz), (ny, nz))
    xyz = np.ravel_multi_index((cx, cy, cz), (nx, ny, nz))
    return float(max(0.0, entropy_bits(xz) + entropy_bits(yz) - entropy_bits(xyz) - entropy_bits(cz)))
