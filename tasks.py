#!/usr/bin/env python3
"""The two commands of the README's quick start. Needs nothing but Python 3.11+.

    python tasks.py course   # install, then execute every notebook (the whole course) headless
    python tasks.py test     # install, then run the full test suite: pytest --nbval
    python tasks.py browser-test                  # install, then open every notebook in JupyterLab in headless Chromium
    python tasks.py colab --repo URL --ref TAG    # maintainers: stamp Colab badges and first cells
    python tasks.py book                          # install, then build the course website into build/book/ (Node.js 18+)
    python tasks.py book-test                     # open every page of build/book/ in headless Chromium

Each one installs the project (``pip install -e .[dev]``) into the active virtual or conda
environment, or else into ``./.venv``, which it creates. On Linux without an NVIDIA driver,
torch comes from PyTorch's CPU wheel index (no CUDA download: about 1 GB instead of 6),
unless you chose where packages come from yourself (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
PIP_FIND_LINKS, PIP_NO_INDEX, PIP_CONSTRAINT, or the same keys in a pip config file); CI pins
torch through PIP_CONSTRAINT. Extra arguments go to the tool underneath.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Where pip gets packages: if the user set any of these, their choice wins over the CPU index.
PIP_SOURCE_SETTINGS = ("index-url", "extra-index-url", "find-links", "no-index", "constraint")
BROWSER_TEST_COMMAND = ["-m", "pytest", "-p", "no:cacheprovider", "tests/browser_jupyterlab.py"]
BOOK_TEST_COMMAND = ["-m", "pytest", "-p", "no:cacheprovider", "tests/browser_book.py"]
# Jupyter Book 2 (mystmd) runs on Node.js 18 or newer.
NODE_MAJOR_MINIMUM = 18
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


def user_pip_sources(env: dict[str, str], pip_config: str) -> list[str]:
    """The package-source settings the user made: ``PIP_*`` variables and ``pip config list`` keys."""
    names = [f"PIP_{key.upper().replace('-', '_')}" for key in PIP_SOURCE_SETTINGS]
    found = [name for name in names if env.get(name)]
    for line in pip_config.splitlines():  # e.g. "global.extra-index-url='...'" or ":env:.find-links='...'"
        key = line.split("=", 1)[0].rsplit(".", 1)[-1]
        if key in PIP_SOURCE_SETTINGS and not line.startswith(":env:"):
            found.append(line.split("=", 1)[0])
    return found


def torch_index(system: str, nvidia_driver: bool, user_sources: list[str]) -> str | None:
    """PyTorch's CPU wheel index on Linux without an NVIDIA driver, unless the user chose their own sources.

    A plain ``torch`` requirement on Linux pulls the CUDA build and its nvidia-* wheels (a 6.4 GB
    venv), useless without a GPU. On macOS and Windows PyPI's torch is already CPU-only.
    """
    if system != "Linux" or nvidia_driver or user_sources:
        return None
    return CPU_TORCH_INDEX


def has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def install_torch(python: str, index: str) -> None:
    """``pip install torch`` from ``index`` alone, so pip cannot pick PyPI's CUDA build instead."""
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--index-url", index, "torch")


def install(python: str) -> None:
    has_torch = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"]).returncode == 0
    if not has_torch:
        config = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
        index = torch_index(platform.system(), has_nvidia_driver(), user_pip_sources(dict(os.environ), config))
        if index:
            print(f"[tasks] Linux without an NVIDIA driver: torch from the CPU wheel index {index}", flush=True)
            install_torch(python, index)
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", ".[dev]")


def require_node() -> None:
    """Jupyter Book 2 runs on Node.js and installs the site theme's server with npm: stop with what to install if
    either is missing or Node is too old (before any install, so that it fails in seconds, not after pip)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip() if node else ""
    major = int(version.lstrip("v").split(".")[0]) if version else 0
    if major < NODE_MAJOR_MINIMUM or not npm:
        found = (f"Node.js {version}" if version else "no node") + ("" if npm else " and no npm")
        raise SystemExit(f"python tasks.py book needs Node.js {NODE_MAJOR_MINIMUM}+ and npm, found {found}: "
                         "install them (Debian/Ubuntu: apt-get install nodejs npm; elsewhere https://nodejs.org)")


def main(argv: list[str]) -> int:
    tasks = {"course", "test", "browser-test", "colab", "book", "book-test"}
    if not argv or argv[0] not in tasks:
        print(__doc__)
        print(f"error: expected one of {sorted(tasks)}, got {argv[:1] or 'nothing'}", file=sys.stderr)
        return 2
    task, extra = argv[0], argv[1:]
    if task == "book":
        require_node()
    python = environment_python()
    install(python)
    env = dict(os.environ)
    if task == "test":
        env.setdefault("MOE_PROFILE", "smoke")
        # Smoke runs train in well under a second: starting a worker process (torch's import) would cost more
        # than the run. tests/test_workers.py covers parallel workers; MOE_JOBS=N still overrides this.
        env.setdefault("MOE_JOBS", "1")
        run(python, *TEST_COMMAND, *extra, env=env)
    elif task == "browser-test":
        run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "playwright")
        run(python, *BROWSER_TEST_COMMAND, *extra, env=env)
    elif task in ("book", "book-test"):
        run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", ".[book]")
        if task == "book":
            run(python, "-m", "book.build", *extra, env=env)
        else:
            run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "playwright")
            run(python, *BOOK_TEST_COMMAND, *extra, env=env)
    elif task == "colab":
        run(python, "-m", "tools.colab", *extra, env=env)
    else:
        run(python, "-m", "moe_lib", "course", *extra, env=env)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
