"""tasks.py's install decision: PyTorch's CPU wheels on Linux without an NVIDIA driver, unless the user chose."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("tasks", Path(__file__).resolve().parents[1] / "tasks.py")
tasks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tasks)


@pytest.mark.parametrize(
    "system, driver, expected",
    [("Linux", False, tasks.CPU_TORCH_INDEX), ("Linux", True, None), ("Darwin", False, None), ("Windows", False, None)],
)
def test_cpu_index_only_on_linux_without_a_driver(system, driver, expected):
    assert tasks.torch_index(system, driver, user_sources=[]) == expected


@pytest.mark.parametrize("variable", ["PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONSTRAINT"])
def test_the_users_own_pip_sources_win(variable):
    sources = tasks.user_pip_sources({variable: "x", "PIP_CERT": "/etc/ssl"}, pip_config="")
    assert sources == [variable]
    assert tasks.torch_index("Linux", False, sources) is None


def test_pip_config_files_count_as_the_users_choice():
    config = "global.extra-index-url='file:///opt/pypi/simple'\nglobal.cert='/etc/ssl/certs/ca.crt'\n:env:.default-timeout='180'\n"
    assert tasks.user_pip_sources({}, config) == ["global.extra-index-url"]
    assert tasks.user_pip_sources({}, "global.cert='/etc/ssl/certs/ca.crt'\nuser.timeout='60'\n") == []


def test_ci_constraint_path_keeps_pip_in_charge():
    """.ci/run sets PIP_CONSTRAINT: tasks.py then leaves torch to pip and the constraint, as before."""
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert 'export PIP_CONSTRAINT="$PWD/.ci/constraints.txt"' in ci
    assert tasks.torch_index("Linux", False, tasks.user_pip_sources({"PIP_CONSTRAINT": ".ci/constraints.txt"}, "")) is None


@pytest.mark.parametrize("node_version, has_npm, found", [
    (None, True, "found no node:"), ("v16.20.2", True, "found Node.js v16.20.2:"), ("v20.19.2", False, "found Node.js v20.19.2 and no npm:")])
def test_book_stops_before_installing_anything_without_node_18_and_npm(monkeypatch, node_version, has_npm, found):
    tools = {"node": "/usr/bin/node" if node_version else None, "npm": "/usr/bin/npm" if has_npm else None}
    monkeypatch.setattr(tasks.shutil, "which", lambda name, *args, **kwargs: tools.get(name))
    monkeypatch.setattr(tasks.subprocess, "run", lambda *args, **kwargs: type("Done", (), {"stdout": f"{node_version}\n"})())
    monkeypatch.setattr(tasks, "environment_python", lambda: pytest.fail("looked for a Python environment before checking Node.js"))
    with pytest.raises(SystemExit, match=f"needs Node.js {tasks.NODE_MAJOR_MINIMUM}\\+ and npm, {found}"):
        tasks.main(["book"])


def test_book_accepts_node_18_with_npm(monkeypatch):
    monkeypatch.setattr(tasks.shutil, "which", lambda name, *args, **kwargs: f"/usr/bin/{name}")
    monkeypatch.setattr(tasks.subprocess, "run", lambda *args, **kwargs: type("Done", (), {"stdout": "v18.0.0\n"})())
    tasks.require_node()
