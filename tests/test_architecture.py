"""The package's shape: every module imports, the import graph has no cycle, and no module
imports another's private (``_name``) names. Read from the source with ``ast``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moe_lib"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every ``moe_lib`` import in the module, at any depth."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if not node.module and node.level:  # "from . import x": x is a module
                found += [(f"{target}.{n}", []) for n in names if f"{target}.{n}" in MODULES]
                continue
            found.append((target, names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(t, n) for t, n in found if t == "moe_lib" or t.startswith("moe_lib.")]


def graph() -> dict[str, set[str]]:
    return {name: {t for t, _ in imports_of(name) if t in MODULES and t != name} for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None: depth-first search with colours."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"moe_lib.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name):
    importlib.import_module(name)


def test_the_import_graph_has_no_cycle():
    # A package imports its own submodules (its re-exports); those edges point down, not back.
    edges = {m: {t for t in ts if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))} for m, ts in graph().items()}
    assert find_cycle(edges) is None


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{name} imports {target}.{n}"
        for name in MODULES
        for target, names in imports_of(name)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    assert private == []


def test_plots_depend_only_on_stats_and_profiles():
    assert graph()["moe_lib.plots"] <= {"moe_lib.stats", "moe_lib.profiles"}



# --------------------------------------------------------------------------- size
# One concept per module, read top to bottom: about 400 lines at most, 450 enforced. A module over it
# is listed here with the reason, and leaves the list when it is split.
MAX_LINES = 450
OVERSIZED: dict[str, str] = {}


def oversized_modules() -> dict[str, int]:
    """Every module over :data:`MAX_LINES` lines, with its line count."""
    counts = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    return {name: n for name, n in counts.items() if n > MAX_LINES}


def test_no_module_is_over_the_line_limit_except_the_listed_ones():
    assert set(oversized_modules()) == set(OVERSIZED)  # a listed module that shrank must leave the list too


# --------------------------------------------------------------------------- layers
# The package in layers, lowest first: a module may import only from its own layer or a lower one.
# Keys are module names under moe_lib (a package's name covers its submodules); when modules move
# into packages, update the keys here. Pure helpers (files, numbers, figures, the profiles' sizes)
# sit in core so every layer can use them.
LAYER_ORDER = ("core", "training", "runs", "studies", "course")
LAYERS = {
    "config": "core", "moe": "core", "metrics": "core", "data": "core",
    "files": "core", "versions": "core", "stats": "core", "information": "core", "profiles": "core", "plots": "core",
    "benchmark_results": "core",
    "training": "training", "parallel": "training", "parallel_analysis": "training",
    "runs": "runs",
    "studies": "studies",
    "course": "course", "exercises": "course", "__main__": "course",
    "": "course",  # moe_lib/__init__.py: the public API may gather from every layer
}


def layer_of(module: str) -> str:
    """The layer of ``moe_lib.<module>``: its own entry, else its package's (``data.cache`` -> ``data``)."""
    name = module.removeprefix("moe_lib").removeprefix(".")
    parts = name.split(".") if name else [""]
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise KeyError(f"{module} has no layer: add it to LAYERS in tests/test_architecture.py (layers: {LAYER_ORDER})")


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer than the importer's."""
    rank = {layer: i for i, layer in enumerate(LAYER_ORDER)}
    return sorted(
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, targets in edges.items() for t in targets if rank[layer_of(t)] > rank[layer_of(m)]
    )


def test_layer_checker_finds_a_planted_upward_import():
    edges = {"moe_lib.moe.model": {"moe_lib.training.loop"}, "moe_lib.training.loop": {"moe_lib.moe.model"}, "moe_lib.studies.noise": {"moe_lib.course.cli"}}
    assert upward_imports(edges) == [
        "moe_lib.moe.model (core) imports moe_lib.training.loop (training)", "moe_lib.studies.noise (studies) imports moe_lib.course.cli (course)",
    ]
    assert layer_of("moe_lib.data.cache") == "core" and layer_of("moe_lib.studies.run") == "studies" and layer_of("moe_lib") == "course"


def test_every_module_has_a_layer():
    assert all(layer_of(m) in LAYER_ORDER for m in MODULES)


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(graph()) == []


# --------------------------------------------------------------------------- the public API
def test_the_public_api_names_the_objects_of_their_home_modules():
    import moe_lib

    assert moe_lib.__all__ and set(moe_lib.__all__) <= set(dir(moe_lib))
    for name in moe_lib.__all__:
        value = getattr(moe_lib, name)
        assert getattr(importlib.import_module(value.__module__), name) is value, name
    with pytest.raises(AttributeError, match="'nope'.*public names are"):
        moe_lib.nope  # noqa: B018


def test_import_moe_lib_is_cheap_and_submodules_still_import():
    """``import moe_lib`` loads no torch or pandas (its names load on first use); ``from moe_lib import plots``
    still finds the submodule."""
    import subprocess
    import sys

    code = ("import sys, moe_lib; heavy = sorted({'torch', 'pandas'} & set(sys.modules)); "
            "from moe_lib import plots, runs; print(heavy, plots.__name__, runs.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent, env={**__import__("os").environ, "PYTHONPATH": str(PACKAGE.parent)}).stdout
    assert out.split() == ["[]", "moe_lib.plots", "moe_lib.runs"]
