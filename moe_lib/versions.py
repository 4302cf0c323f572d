"""Installed package versions, for run records, cache keys and the notebooks' first cell."""

from __future__ import annotations

import importlib.metadata
import platform

import torch


def package_version(package: str, missing: str = "not installed") -> str:
    """The installed version of ``package`` (a distribution name), or ``missing``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return missing


def library_versions() -> dict[str, str]:
    """Python, torch and the packages that shape a run's data and tokens."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("moe_lib", "datasets", "tokenizers", "transformers"):
        versions[pkg] = package_version(pkg)
    return versions
