#!/usr/bin/env python3
"""The two commands of the README's quick start. Needs nothing but Python 3.11+.

    python tasks.py course   # install, then execute every notebook (the whole course) headless
    python tasks.py test     # install, then run the full test suite: pytest --nbval

Each one installs the project (``pip install -e .[dev]``) into the active virtual or conda
environment, or else into ``./.venv``, which it creates. Pip honours ``PIP_CONSTRAINT``
(CI pins the CPU build of torch that way). Extra arguments go to the tool underneath.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TEST_COMMAND = ["-m", "pytest", "--nbval", "--nbval-current-env", "--nbval-cell-timeout=600", "tests", "notebooks"]


def environment_python() -> str:
    """The active environment's Python, else ./.venv's (created on first use)."""
    in_env = sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX")
    if in_env:
        return sys.executable
    venv_dir = ROOT / ".venv"
    python = venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        print(f"[tasks] creating {venv_dir}", flush=True)
        venv.create(venv_dir, with_pip=True)
    return str(python)


def run(*command: str, env: dict[str, str] | None = None) -> None:
    print("[tasks] " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=env)


def install(python: str) -> None:
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", ".[dev]")


def main(argv: list[str]) -> int:
    tasks = {"course", "test"}
    if not argv or argv[0] not in tasks:
        print(__doc__)
        print(f"error: expected one of {sorted(tasks)}, got {argv[:1] or 'nothing'}", file=sys.stderr)
        return 2
    task, extra = argv[0], argv[1:]
    python = environment_python()
    install(python)
    env = dict(os.environ)
    if task == "test":
        env.setdefault("MOE_PROFILE", "smoke")
        run(python, *TEST_COMMAND, *extra, env=env)
    else:
        run(python, "-m", "moe_lib", "course", *extra, env=env)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
