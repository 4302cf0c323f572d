"""Execute the course notebooks headless, in order, and store their outputs in place.

Each notebook runs in a fresh kernel with its own folder as the working directory and the
current ``MOE_PROFILE``. A notebook is replaced only after it ran to the end (written to a
temporary file and moved into place), so a failure never leaves a half-executed notebook.
Progress bars are stored as their final state (:func:`tidy_outputs`), as a live notebook shows them.
The kernel imports the ``moe_lib`` that runs the course (:func:`kernel_environment`), never
another copy that the environment happens to have installed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..files import atomic_write_bytes
from ..profiles import project_root


def notebook_paths(notebooks_dir: Path | None = None, only: list[str] | None = None) -> list[Path]:
    folder = Path(notebooks_dir) if notebooks_dir else project_root() / "notebooks"
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    if only:
        available = [p.name[:2] for p in paths]
        unknown = [n for n in only if n not in available]
        if unknown:
            raise ValueError(f"--only {unknown}: no such notebooks; valid numbers are {available}")
        paths = [p for p in paths if p.name[:2] in only]
    return paths


def tidy_outputs(nb):
    """Stored outputs as a live notebook shows them: consecutive streams are merged and carriage-return
    overwrites applied (``CoalesceStreamsPreprocessor``), stream outputs left blank (a progress bar that
    cleared itself) are dropped, and the streams that dropping made neighbours are merged again. Merging
    comes first because a kernel can send one ``print``'s text and its newline as two messages; dropping
    the lone newline first would store the line without it."""
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    def shown(line: str) -> str:  # a terminal shows a line's last segment after a carriage return
        segments = [segment for segment in line.split("\r") if segment]
        return segments[-1] if segments else ""

    def blank(text: str) -> bool:
        return not any(shown(line).strip() for line in text.split("\n"))

    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and blank(o.text))]
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    return nb


def kernel_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the checkout that holds this ``moe_lib``
    first on ``PYTHONPATH``. A kernel starts in the notebook's folder, where ``import moe_lib``
    would otherwise find whatever the environment has installed: an editable install can point at
    another clone, and the notebooks would then run that clone's code."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[2])  # the checkout: moe_lib/course/runner.py is two folders down
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]])
    return env


def run_course(notebooks_dir: Path | None = None, only: list[str] | None = None, timeout: int = 3600) -> list[Path]:
    import nbformat
    from nbclient import NotebookClient

    paths = notebook_paths(notebooks_dir, only)
    profile = os.environ.get("MOE_PROFILE", "(auto)")
    for path in paths:
        start = time.perf_counter()
        print(f"[course] {path.name}: executing with MOE_PROFILE={profile} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
        client.execute(env=kernel_environment())
        nb = tidy_outputs(nb)
        atomic_write_bytes(path, nbformat.writes(nb).encode())
        print(f"[course] {path.name}: done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return paths
