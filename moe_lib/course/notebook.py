"""The first cell of every notebook: choose the profile and corpus, and say what is in use.

In Colab it first fetches the course's files and works from its notebooks (:mod:`~moe_lib.course.colab`).
"""

from __future__ import annotations

import os
import platform

import torch

from ..profiles import Profile, get_profile
from ..training.precision import resolve_precision
from ..training.system import resolve_device
from ..versions import library_versions
from . import colab


def _inline_figures() -> None:
    """Show figures inline in a Jupyter kernel even when ``MPLBACKEND`` says otherwise (CI sets Agg)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with Jupyter
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        shell.run_line_magic("matplotlib", "inline")


def setup(corpus: str = "shakespeare", tokenizer: str | None = None, profile: str | None = None) -> Profile:
    """Return the active profile on ``corpus`` and print profile, device, corpus and versions.

    ``corpus="shakespeare"`` is embedded and works offline; ``"tinystories"`` and
    ``"smollm"`` need the Hugging Face hub. In Colab, the course's notebooks, stored results and
    checkpoints are fetched first (:func:`~moe_lib.course.colab.enter_course`).
    """
    if colab.in_colab():
        colab.enter_course()
    _inline_figures()
    prof = get_profile(profile)
    if corpus != prof.base.data.corpus or tokenizer:
        prof = prof.with_corpus(corpus, tokenizer)
    device = resolve_device(prof.base.train.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    print(f"profile : {prof.name} ({prof.description}); MOE_PROFILE={os.environ.get('MOE_PROFILE', '(unset)')}")
    print(f"device  : {device.type} ({hardware})")
    print(f"precision: {resolve_precision(prof.base.train.precision, device).reason}")
    print(f"data    : corpus={prof.base.data.corpus}, tokenizer={prof.base.data.tokenizer}")
    print(f"model   : {prof.describe().split(' | ', 2)[2]}")
    print(f"versions: {versions}")
    return prof
