"""Colab from a badge: the URL in one place, the stamp, and the stamped first cell run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import nbformat
import pytest

from moe_lib.course import colab as course_colab
from tools import colab

ROOT = Path(__file__).resolve().parents[1]
SLUG = "example-org/moe-course"
REPO = f"https://github.com/{SLUG}"


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of what stamping touches: pyproject.toml, README.md and the notebooks."""
    for name in ("pyproject.toml", "README.md", "notebooks"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def test_no_url_yet_names_the_command(checkout, monkeypatch):
    with pytest.raises(ValueError, match="python tasks.py colab --repo URL --ref TAG"):
        colab.repo_url(checkout / "pyproject.toml")
    assert colab.main(["--ref", "v1", "--root", str(checkout)]) == 2
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))  # in Colab, unstamped
    with pytest.raises(RuntimeError, match="python tasks.py colab --repo URL --ref TAG"):
        exec(colab.setup_block(), {})
    with pytest.raises(RuntimeError, match="installed from a package index or by hand.*python tasks.py colab --repo URL --ref TAG"):
        course_colab.course_source(None)  # the library, not installed by a stamped cell, cannot know which course


def test_unstamped_cells_name_the_command_and_carry_no_badge(checkout):
    colab.stamp(checkout, "v1.0", REPO)
    assert colab.main(["--unstamped", "--root", str(checkout)]) == 0
    for path in (checkout / "notebooks").glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        setup = next(c for c in nb.cells if colab.SETUP_MARKER in c.source)
        assert "git+" not in setup.source and colab.STAMP_COMMAND in setup.source
        assert all(c.get("id") != colab.BADGE_CELL_ID for c in nb.cells)


def test_only_github_urls_make_badges():
    assert colab.github_slug(REPO + ".git") == SLUG
    with pytest.raises(ValueError, match="'https://gitlab.com/a/b' is not a GitHub URL"):
        colab.github_slug("https://gitlab.com/a/b")


def test_stamp_sets_the_url_once_and_is_idempotent(checkout):
    before = {p.name: nbformat.read(p, as_version=4) for p in (checkout / "notebooks").glob("*.ipynb")}
    colab.stamp(checkout, "v0.9", REPO)
    colab.stamp(checkout, "v1.0")  # a later release: the URL now comes from pyproject.toml
    assert colab.repo_url(checkout / "pyproject.toml") == REPO
    assert (checkout / "pyproject.toml").read_text().count("[project.urls]\n") == 1
    for path in sorted((checkout / "notebooks").glob("*.ipynb")):
        nb, old = nbformat.read(path, as_version=4), before[path.name]
        badges = [c for c in nb.cells if c.get("id") == colab.BADGE_CELL_ID]
        assert len(badges) == 1 and nb.cells[0] is badges[0]
        assert f"colab.research.google.com/github/{SLUG}/blob/v1.0/notebooks/{path.name}" in badges[0].source
        assert len(nb.cells) == len(old.cells) + 1
        setup = next(c for c in nb.cells if colab.SETUP_MARKER in c.source)
        old_setup = next(c for c in old.cells if colab.SETUP_MARKER in c.source)
        assert f'"git+{REPO}@v1.0"' in setup.source and "v0.9" not in setup.source
        assert setup.source.count(colab.SETUP_MARKER) == 1 and setup.source.count("import moe_lib") == 1
        tail = old_setup.source[old_setup.source.index("\n", old_setup.source.index("import moe_lib")):]
        assert setup.source.endswith(tail) and setup.outputs == old_setup.outputs  # the rest untouched
    readme = (checkout / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("|") and "](notebooks/" in line]
    assert rows and all(row.count("Open In Colab") == 1 and "/blob/v1.0/notebooks/" in row for row in rows)


def test_short_first_cell_outside_colab_runs_nothing(monkeypatch):
    """A clone, CI, nbval, offline: the bootstrap line is skipped, so no pip and no network."""
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: commands.append(args))
    cell = colab.setup_block(REPO, "v1")
    exec(cell, {})
    assert commands == [] and len(cell.splitlines()) == 4


@pytest.mark.parametrize("dunder_version, metadata_version", [
    ("2.14.1+cu130", "2.14.1"),        # PyPI's CUDA wheel: the local label only in torch.__version__
    ("2.9.0+cpu", "2.9.0+cpu"),        # the PyTorch index's wheels (Colab's): the label in both
])
def test_first_cell_pins_the_torch_version_pip_sees(tmp_path, monkeypatch, dunder_version, metadata_version):
    """The pin is the installed distribution's metadata version: pip matches that, not ``torch.__version__``."""
    import torch
    dist = tmp_path / "site" / f"torch-{metadata_version}.dist-info"  # a fake torch distribution, found first
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {metadata_version}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(torch, "__version__", dunder_version)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: commands.append(args))
    exec(colab.setup_block(REPO, "v1"), {})
    assert commands == [[sys.executable, "-m", "pip", "install", "-q", f"git+{REPO}@v1", f"torch=={metadata_version}"]]


def test_the_course_source_is_where_pip_installed_the_library_from(tmp_path):
    """pip's direct_url.json (PEP 610): a git URL with its tag, else its commit; a local folder as it is."""
    git = {"url": REPO, "vcs_info": {"vcs": "git", "requested_revision": "v1.0", "commit_id": "ab" * 20}}
    assert course_colab.course_source(json.dumps(git)) == (REPO, "v1.0")
    del git["vcs_info"]["requested_revision"]
    assert course_colab.course_source(json.dumps(git)) == (REPO, "ab" * 20)
    folder = {"url": (tmp_path / "my course").as_uri(), "dir_info": {"editable": True}}
    assert course_colab.course_source(json.dumps(folder)) == tmp_path / "my course"
    archive = {"url": "https://example.org/moe_lib-0.1.0.tar.gz", "archive_info": {}}
    with pytest.raises(RuntimeError, match=r"installed from https://example.org/moe_lib-0.1.0.tar.gz, not from the course's git"):
        course_colab.course_source(json.dumps(archive))


def test_colab_setup_fetches_the_course_at_the_installed_tag_once(tmp_path, monkeypatch):
    origin = tmp_path / "origin"
    (origin / "notebooks").mkdir(parents=True)
    (origin / "notebooks" / "at-tag.txt").write_text("v1\n")
    git = ["git", "-C", origin, "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q", origin], check=True)
    for args in (["add", "-A"], ["commit", "-q", "-m", "v1"], ["tag", "v1"]):
        subprocess.run([*git, *args], check=True)
    (origin / "notebooks" / "at-tag.txt").write_text("later\n")
    subprocess.run([*git, "commit", "-q", "-am", "later"], check=True)
    record = json.dumps({"url": origin.as_uri(), "vcs_info": {"vcs": "git", "requested_revision": "v1", "commit_id": "0" * 40}})
    monkeypatch.setattr(course_colab, "installed_record", lambda: record)
    course = tmp_path / "content" / "moe-course"
    monkeypatch.setenv("COURSE_DIR", str(course))
    monkeypatch.delenv("MOE_PROFILE", raising=False)
    monkeypatch.chdir(tmp_path)  # it changes directory; this restores it
    assert course_colab.enter_course() == course
    assert Path.cwd() == course / "notebooks" and (course / "notebooks" / "at-tag.txt").read_text() == "v1\n"
    assert os.environ["MOE_PROFILE"] == "cpu"  # the stored results
    shutil.rmtree(origin)  # run again (with a profile chosen): nothing fetched, the choice kept
    monkeypatch.setenv("MOE_PROFILE", "colab")
    monkeypatch.chdir(tmp_path)
    assert course_colab.enter_course() == course and Path.cwd() == course / "notebooks"
    assert os.environ["MOE_PROFILE"] == "colab"


def _repository_at_tag(tmp_path: Path, tag: str) -> str:
    """A git repository holding this working tree (tracked and untracked, not ignored files), tagged."""
    src = tmp_path / "origin"
    if (ROOT / ".git").exists():
        files = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"],
                               check=True, capture_output=True, text=True).stdout.split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
    else:  # an export without .git: copy all but the usual build and cache folders
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".cache", "__pycache__", "*.egg-info", "build", ".pytest_cache"))
    git = ["git", "-C", src, "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q", src], check=True)
    for args in (["add", "-A"], ["commit", "-q", "-m", "course"], ["tag", tag]):
        subprocess.run([*git, *args], check=True)
    return src.as_uri()


def _clean_python(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A new venv without moe_lib, and every other package of this environment in a folder on its path
    (as Colab has its own packages). Links in a folder outside the venv, not in its site-packages: pip
    counts them as installed, but were it to replace one (a torch pin that matches nothing it sees), it
    would install into the venv and never write through a link into this environment."""
    env_dir, linked = tmp_path / "venv", tmp_path / "packages"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    linked.mkdir()
    for lib in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(lib).iterdir():
            if "moe_lib" in entry.name or entry.suffix == ".pth" or entry.name == "__pycache__" or (linked / entry.name).exists():
                continue
            if entry.name.startswith("torch-") and entry.name.endswith(".dist-info"):
                _copy_as_public_version(entry, linked)
            else:
                (linked / entry.name).symlink_to(entry)
    (site / "colab_packages.pth").write_text(f"{linked}\n")
    return python, site, linked


def _copy_as_public_version(dist_info: Path, folder: Path) -> None:
    """torch's distribution with its version's local label dropped (``2.13.0+cpu`` -> ``2.13.0``), while
    ``torch.__version__`` keeps it: what PyPI's CUDA wheel installs, whatever wheel this machine has."""
    metadata = (dist_info / "METADATA").read_text()
    version = re.search(r"^Version: (.+)$", metadata, re.MULTILINE)[1]
    public = version.split("+")[0]
    copy = folder / f"torch-{public}.dist-info"
    shutil.copytree(dist_info, copy)
    (copy / "METADATA").write_text(metadata.replace(f"Version: {version}\n", f"Version: {public}\n", 1))


CHECK = """
import importlib.metadata, json, sys, types
sys.modules["google.colab"] = types.ModuleType("google.colab")  # what Colab's kernel has imported
exec(compile(open(sys.argv[1]).read(), "first cell", "exec"))   # the stamped first cell, as the kernel runs it
import moe_lib, os, torch
from moe_lib import runs, studies
from moe_lib.training.checkpoint import load_checkpoint
from moe_lib.profiles import get_profile, output_paths
paths = output_paths(profile)
grid = studies.build_grid("noise", profile)  # a grid whose stored cpu results match it (routing gained runs in issue 12)
print(json.dumps({
    "moe_lib": moe_lib.__file__, "torch": torch.__file__, "profile": profile.name, "cwd": os.getcwd(),
    "torch_version": torch.__version__, "torch_metadata_version": importlib.metadata.version("torch"),
    "stored_runs": len(runs.load_results(grid, paths.results)), "grid_runs": len(grid.runs),
    "checkpoint_params": sum(p.numel() for p in load_checkpoint(paths.saved_models / "01_basics")[0].parameters()),
}))
"""


def test_stamped_first_cell_installs_and_finds_the_data_in_simulated_colab(tmp_path):
    url = _repository_at_tag(tmp_path, "v-test")
    python, site, linked = _clean_python(tmp_path)
    nb = nbformat.read(ROOT / "notebooks" / "02_routing_types.ipynb", as_version=4)
    setup = next(c for c in nb.cells if colab.SETUP_MARKER in c.source)
    cell = tmp_path / "first_cell.py"
    cell.write_text(colab.stamp_setup_cell(setup.source, url, "v-test"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOE_PROFILE", "MOE_PROJECT_ROOT")}
    course = tmp_path / "content" / "moe-course"
    env["COURSE_DIR"] = str(course)
    run = subprocess.run([python, "-c", CHECK, cell], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(seen["moe_lib"]).is_relative_to(site) and not (site / "moe_lib").is_symlink()  # installed, not linked
    assert Path(seen["torch"]).is_relative_to(linked) and not (site / "torch").exists()  # Colab's torch kept, not reinstalled
    assert seen["torch_metadata_version"] == seen["torch_version"].split("+")[0]  # as PyPI's CUDA wheel has it
    assert seen["profile"] == "cpu" and seen["stored_runs"] == seen["grid_runs"] > 0  # the stored results, found
    assert seen["checkpoint_params"] > 0
    assert Path(seen["cwd"]) == course / "notebooks" and (course / ".git").is_dir()  # fetched at the tag, worked from
