"""Colab: the repository URL in one place, and the stamp that makes every notebook open there.

The URL lives in ``pyproject.toml`` as ``[project.urls] Repository``. A maintainer stamps it,
with the tag a release is published under, into every notebook and the README::

    python tasks.py colab --repo https://github.com/OWNER/REPO --ref v1.0

* every notebook gets an "Open in Colab" badge (a first markdown cell) and a setup cell that,
  in Colab, fetches the course at that tag (the code, the stored results and checkpoints) and
  installs ``moe_lib`` from it into the running kernel, pinning Colab's own torch;
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

from moe_lib.profiles import project_root

STAMP_COMMAND = "python tasks.py colab --repo URL --ref TAG"
SETUP_MARKER = "# Setup: works from a clone of the course and in Colab"
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
    """The install part of every notebook's first cell; with no ``repo`` it names the stamp command in Colab.

    In Colab: fetch the course at ``ref`` (a shallow git fetch works for tags, branches and commits),
    pip-install it into this kernel with torch pinned to the version Colab ships (so pip keeps it): the
    installed distribution's metadata version, which is what pip matches; ``torch.__version__`` may carry
    a local label that the metadata lacks (PyPI's CUDA wheel: ``2.14.1+cu130`` against ``2.14.1``),
    then work from the notebooks folder so the stored ``results/`` and ``saved_models/`` are found.
    """
    return f'''{SETUP_MARKER} (Colab lines stamped by `python tasks.py colab`).
import importlib, importlib.metadata, importlib.util, os, subprocess, sys, tempfile
COURSE_REPO, COURSE_REF = {repo!r}, {ref!r}  # the course's git URL and the tag these notebooks belong to
if "google.colab" in sys.modules:
    if not COURSE_REPO:
        raise RuntimeError("This notebook has no course URL yet. A maintainer stamps it with: {STAMP_COMMAND}")
    COURSE_DIR = os.environ.get("COURSE_DIR", "/content/moe-course")
    if not os.path.isdir(os.path.join(COURSE_DIR, ".git")):  # code, stored results and checkpoints at COURSE_REF
        for args in (["init", "-q", COURSE_DIR], ["-C", COURSE_DIR, "fetch", "-q", "--depth", "1", COURSE_REPO, COURSE_REF],
                     ["-C", COURSE_DIR, "checkout", "-q", "FETCH_HEAD"]):
            subprocess.run(["git", *args], check=True)
    if importlib.util.find_spec("moe_lib") is None:  # = %pip install into this kernel, keeping Colab's torch
        pin = os.path.join(tempfile.gettempdir(), "keep-colab-torch.txt")
        with open(pin, "w") as f:  # the installed version as pip sees it (PyPI's CUDA wheel: 2.x, not 2.x+cu130)
            f.write(f"torch=={{importlib.metadata.version('torch')}}\\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", pin, COURSE_DIR], check=True)
        importlib.invalidate_caches()
    os.environ.setdefault("MOE_PROFILE", "cpu")  # the stored results; "colab" trains every run on the GPU (~1 h on a T4, estimated)
    os.chdir(os.path.join(COURSE_DIR, "notebooks"))
elif importlib.util.find_spec("moe_lib") is None:  # a clone: install it
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", ".."], check=True)
    sys.path.insert(0, "..")
'''


def stamp_setup_cell(source: str, repo: str, ref: str) -> str:
    """Replace the install block of a setup cell (marker line up to ``import moe_lib...``), keep the rest."""
    lines = source.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(SETUP_MARKER)), None)
    end = next((i for i, line in enumerate(lines) if line.startswith(("import moe_lib", "from moe_lib"))), None)
    if start is None or end is None or end < start:
        raise ValueError(f"not a setup cell: expected a line starting {SETUP_MARKER!r} followed by `import moe_lib...`")
    block = setup_block(repo, ref)
    return "".join(lines[:start]) + block + ("\n" if not block.endswith("\n\n") else "") + "".join(lines[end:])


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
