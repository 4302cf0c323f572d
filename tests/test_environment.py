"""environment.yml must describe the same packages as pyproject.toml (no conda client here to try it)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PYPI = {"pytorch": "torch"}  # conda-forge names that differ from PyPI's
NOT_PACKAGES = {"python", "pip"}


def _split(requirement: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    return match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    return dict(_split(r) for r in requirements)


def environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    found: dict[str, str] = {}
    for entry in env["dependencies"]:
        entries = entry["pip"] if isinstance(entry, dict) else [entry]
        for item in entries:
            if item.startswith("-e"):
                continue  # the project itself
            name, spec = _split(item)
            name = CONDA_TO_PYPI.get(name, name)
            if name not in NOT_PACKAGES:
                assert name not in found, f"{name} listed twice in environment.yml"
                found[name] = spec
    return found


def test_environment_yml_matches_pyproject():
    assert environment_requirements() == pyproject_requirements()


def test_python_floor_is_the_same_everywhere():
    """3.11: tomllib (these tests) and the only Python CI has a local torch wheel for; Colab runs 3.12."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    assert requires == ">=3.11" and "python>=3.11" in env
    assert "Python 3.11+" in (ROOT / "README.md").read_text() and "Python 3.11+" in (ROOT / "tasks.py").read_text()


def test_torch_floor_has_muon_and_a_cpu_grouped_mm():
    """torch.optim.Muon arrived in 2.9, as did torch._grouped_mm's CPU kernel (2.8 raises NotImplementedError)."""
    assert pyproject_requirements()["torch"] == ">=2.9"


def test_torch_is_never_pinned_for_users():
    spec = pyproject_requirements()["torch"]
    assert spec.startswith(">=") and "<" not in spec and "==" not in spec


def test_drift_is_detected(tmp_path, monkeypatch):
    """The comparison really fails when environment.yml loses or changes a package."""
    text = (ROOT / "environment.yml").read_text()
    broken = tmp_path / "environment.yml"
    broken.write_text(text.replace("  - seaborn>=0.13\n", ""))
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert "seaborn" not in environment_requirements()
    assert environment_requirements() != pyproject_requirements()
