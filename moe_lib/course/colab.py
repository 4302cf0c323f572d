"""Colab: find the course's files for the library that a notebook's first cell installed.

In Colab, the first code cell of every notebook pip-installs ``moe_lib`` from ``git+REPO@TAG`` (stamped
by ``python tasks.py colab``), keeping Colab's torch. pip records where a package came from in its
``direct_url.json`` (PEP 610), so the library knows the repository and tag, and :func:`enter_course`
fetches the notebooks, stored results and checkpoints at that tag into ``$COURSE_DIR`` (default
``/content/moe-course``), then works from its ``notebooks/`` folder. Outside Colab nothing here runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

STAMP_COMMAND = "python tasks.py colab --repo URL --ref TAG"
UNSTAMPED = f"This notebook has no course URL yet. A maintainer stamps it with: {STAMP_COMMAND}"
DEFAULT_COURSE_DIR = "/content/moe-course"
DISTRIBUTION = "moe_lib"  # the project name in pyproject.toml


def in_colab() -> bool:
    """Colab's kernel imports ``google.colab`` before any cell runs."""
    return "google.colab" in sys.modules


def installed_record() -> str | None:
    """pip's ``direct_url.json`` for the installed library, or None (installed from an index, or not at all)."""
    try:
        return importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:  # importable without being installed: on sys.path by hand
        return None


def course_source(direct_url: str | None) -> tuple[str, str] | Path:
    """Where the course came from, read from pip's ``direct_url.json`` text (PEP 610).

    ``(repository, revision)`` for ``pip install git+REPO@TAG`` (the tag, else the commit pip checked out);
    the folder for ``pip install [-e] FOLDER`` (a checkout, used as it is); otherwise an error, since
    only a stamped first cell says which course to fetch.
    """
    info = json.loads(direct_url) if direct_url else {}
    vcs = info.get("vcs_info", {})
    if vcs.get("vcs") == "git":
        return info["url"], vcs.get("requested_revision") or vcs["commit_id"]
    if "dir_info" in info and urlparse(info["url"]).scheme == "file":
        return Path(unquote(urlparse(info["url"]).path))
    source = f"from {info['url']}" if info.get("url") else "from a package index or by hand"
    raise RuntimeError(f"{DISTRIBUTION} was installed {source}, not from the course's git repository, "
                       f"so there is no course to fetch. {UNSTAMPED}")


def fetch_course(course_dir: Path, repo: str, ref: str) -> None:
    """A shallow fetch of ``repo`` at ``ref`` into ``course_dir`` (tags, branches and commits all work),
    unless ``course_dir`` is a git checkout already (the cell ran before)."""
    if (course_dir / ".git").is_dir():
        return
    for args in (["init", "-q", str(course_dir)], ["-C", str(course_dir), "fetch", "-q", "--depth", "1", repo, ref],
                 ["-C", str(course_dir), "checkout", "-q", "FETCH_HEAD"]):
        subprocess.run(["git", *args], check=True)


def enter_course() -> Path:
    """Fetch the course the library was installed from, default ``MOE_PROFILE`` to ``cpu`` and work from
    its ``notebooks/`` folder, where the stored ``results/`` and ``saved_models/`` are found.

    ``cpu`` re-renders the notebooks from the stored runs; ``colab``, set before the cell, trains every run
    on Colab's GPU (about an hour on a T4, estimated).
    """
    source = course_source(installed_record())
    if isinstance(source, Path):
        course_dir = source
    else:
        course_dir = Path(os.environ.get("COURSE_DIR", DEFAULT_COURSE_DIR))
        fetch_course(course_dir, *source)
    os.environ.setdefault("MOE_PROFILE", "cpu")
    os.chdir(course_dir / "notebooks")
    return course_dir
