"""Colab: the repository URL in one place, and the stamp that makes every notebook open there.

The URL lives in ``pyproject.toml`` as ``[project.urls] Repository``. A maintainer stamps it,
with the tag a release is published under, into every notebook and the README::

    python tasks.py colab --repo https://github.com/OWNER/REPO --ref v1.0

* every notebook gets an "Open in Colab" badge (a first markdown cell) and a setup cell whose
  guarded pip line, in Colab only, pip-installs ``moe_lib`` from the repository at that tag into the
  running kernel, pinning Colab's own torch; the library's ``setup()`` then fetches the stored results
  and checkpoints at the same tag (:mod:`moe_lib.course.colab`);
* the README's table of notebooks gets the same badges.

Stamping is idempotent: running it again with another tag replaces the old stamp.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

from moe_lib.course.colab import STAMP_COMMAND, UNSTAMPED
from moe_lib.profiles import project_root

SETUP_MARKER = "# Setup: works from a clone of the course and in Colab"
# on the import line, so a traceback outside Colab (where the cell installs nothing) shows what to do
NOT_INSTALLED = "not found? Install the course where this kernel runs: `pip install -e .` in the course folder (README)"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_CELL_ID = "colab-badge"
_BADGE = re.compile(r" ?\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
_URLS_TABLE = re.compile(r"^\[project\.urls\]\n(?:[^\[\n][^\n]*\n)*", re.MULTILINE)


# --------------------------------------------------------------------------- the one place: pyproject.toml
def repo_url(pyproject: Path) -> str:
    """``[project.urls] Repository``, or an error that names the command that sets it."""
    table = _URLS_TABLE.search(pyproject.read_text())  # no tomllib: the course supports Python 3.10
    found = re.search(r'^Repository\s*=\s*"([^"]*)"', table[0], re.MULTILINE) if table else None
    url = found[1] if found else None
    if not url:
        raise ValueError(f"no course repository URL in {pyproject} ([project.urls] Repository): run `{STAMP_COMMAND}`")
    return url


def set_repo_url(pyproject: Path, url: str) -> None:
    """Write ``url`` as ``[project.urls] Repository`` (the table is replaced whole, or added after [project])."""
    github_slug(url)  # validate first
    text = pyproject.read_text()
    table = f'[project.urls]\nRepository = "{url}"\n'
    if _URLS_TABLE.search(text):
        text = _URLS_TABLE.sub(table, text, count=1)
    else:
        anchor = text.index("\n[project.optional-dependencies]")
        text = text[:anchor] + "\n" + table + text[anchor:]
    _write_atomic(pyproject, text)


def github_slug(url: str) -> str:
    """``OWNER/REPO`` of a GitHub URL: Colab opens notebooks from GitHub only."""
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", url)
    if not match:
        raise ValueError(f"repository URL {url!r} is not a GitHub URL; Colab badges need https://github.com/OWNER/REPO")
    return f"{match[1]}/{match[2]}"


# --------------------------------------------------------------------------- what gets stamped
def colab_link(slug: str, ref: str, notebook: str) -> str:
    return f"https://colab.research.google.com/github/{slug}/blob/{ref}/{notebook}"


def badge(link: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({link})"


def setup_block(repo: str = "", ref: str = "") -> str:
    """The bootstrap part of every notebook's first cell, up to ``import moe_lib.course.notebook``.

    In Colab only, it pip-installs the course from ``git+repo@ref`` into this kernel, with torch pinned
    to the version Colab ships, so pip keeps it: the installed distribution's metadata version, which is
    what pip matches; ``torch.__version__`` may carry a local label that the metadata lacks (PyPI's CUDA
    wheel: ``2.14.1+cu130`` against ``2.14.1``). Elsewhere it does nothing (no network): a clone runs the
    notebooks in an environment where the course is installed (``python tasks.py``), and the import line
    says so where the traceback shows it. With no ``repo`` it stops in Colab with the stamp command.
    """
    if repo:
        comment = f"{SETUP_MARKER}; only in Colab does it pip-install the course (at {ref}, keeping Colab's torch)."
        imports = "importlib.metadata, subprocess, sys"
        action = (f'subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+{repo}@{ref}", '
                  '"torch==" + importlib.metadata.version("torch")], check=True)')
    else:
        comment = f"{SETUP_MARKER}; Colab needs it stamped first (`python tasks.py colab`)."
        imports = "sys"
        action = f"raise RuntimeError({UNSTAMPED!r})"
    return (f"{comment}\n"
            f"import {imports}\n"
            f'if "google.colab" in sys.modules: {action}\n'
            f"import moe_lib.course.notebook  # {NOT_INSTALLED}\n")


def stamp_setup_cell(source: str, repo: str, ref: str) -> str:
    """Replace the bootstrap of a setup cell (marker line through ``import moe_lib...``), keep the rest."""
    lines = source.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(SETUP_MARKER)), None)
    end = next((i for i, line in enumerate(lines) if line.startswith(("import moe_lib", "from moe_lib"))), None)
    if start is None or end is None or end < start:
        raise ValueError(f"not a setup cell: expected a line starting {SETUP_MARKER!r} followed by `import moe_lib...`")
    return "".join(lines[:start]) + setup_block(repo, ref) + "".join(lines[end + 1:])


def stamp_notebook(path: Path, slug: str, repo: str, ref: str, root: Path) -> None:
    """Badge cell first, setup cell stamped; outputs untouched. With ``repo=""``: no badge, the
    unstamped setup cell (whose Colab branch names the stamp command)."""
    nb = nbformat.read(path, as_version=4)
    setup = next((c for c in nb.cells if c.cell_type == "code" and SETUP_MARKER in c.source), None)
    if setup is None:
        raise ValueError(f"{path}: no setup cell (a code cell containing {SETUP_MARKER!r})")
    setup.source = stamp_setup_cell(setup.source, repo, ref)
    nb.cells = [c for c in nb.cells if c.get("id") != BADGE_CELL_ID]
    if repo:
        cell = nbformat.v4.new_markdown_cell(badge(colab_link(slug, ref, path.relative_to(root).as_posix())))
        cell["id"] = BADGE_CELL_ID
        nb.cells.insert(0, cell)
    _write_atomic(path, nbformat.writes(nb) + "\n")


def stamp_readme(path: Path, slug: str, ref: str) -> int:
    """Put a badge after each ``[title](notebooks/NN_name.ipynb)`` link in the README's table rows."""
    def add(match: re.Match) -> str:
        return f"{match[1]} {badge(colab_link(slug, ref, match[2]))}"

    lines = []
    count = 0
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("|") and "](notebooks/" in line:
            line, n = re.subn(r"(\[[^\]]+\]\((notebooks/[^)]+\.ipynb)\))", add, _BADGE.sub("", line), count=1)
            count += n
        lines.append(line)
    _write_atomic(path, "".join(lines))
    return count


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def unstamp(root: Path) -> list[Path]:
    """Every notebook back to the unstamped setup cell, without badges (before a URL is known)."""
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    for path in notebooks:
        stamp_notebook(path, "", "", "", root)
    return notebooks


def stamp(root: Path, ref: str, repo: str | None = None) -> list[Path]:
    """Record ``repo`` (if given) in pyproject.toml, then stamp every notebook and the README from it."""
    pyproject = root / "pyproject.toml"
    if repo:
        set_repo_url(pyproject, repo)
    repo = repo_url(pyproject)
    slug = github_slug(repo)
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    for path in notebooks:
        stamp_notebook(path, slug, repo, ref, root)
    stamp_readme(root / "README.md", slug, ref)
    return notebooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tasks.py colab", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", help="the course's GitHub URL; stored in pyproject.toml (default: the URL stored there)")
    parser.add_argument("--ref", help="the git tag (or branch/commit) the notebooks install in Colab")
    parser.add_argument("--unstamped", action="store_true", help="write the unstamped first cell (no URL yet) into every notebook")
    parser.add_argument("--root", type=Path, default=project_root(), help="the repository (default: the checkout around the working directory)")
    args = parser.parse_args(argv)
    if args.unstamped:
        print(f"wrote the unstamped first cell into {len(unstamp(args.root))} notebooks")
        return 0
    if not args.ref:
        parser.error(f"--ref is required: {STAMP_COMMAND}")
    try:
        stamped = stamp(args.root, args.ref, args.repo)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"stamped {len(stamped)} notebooks and README.md with {repo_url(args.root / 'pyproject.toml')} @ {args.ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
