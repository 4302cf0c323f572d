"""The README states facts about the code: each one is checked here, so a change in the code fails until the README follows.

Checked: the profile table's sizes against ``moe_lib.profiles``, the Python and torch floors against pyproject.toml,
the notebook table against ``notebooks/``, the stored results' hardware, torch and date against the results CSVs, the
studies named against the CLI's choices, the Node.js floor against tasks.py, and every relative link and image.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from tools.budget import course_hours
from moe_lib.profiles import PROFILE_NAMES, get_profile

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

spec = importlib.util.spec_from_file_location("tasks", ROOT / "tasks.py")
tasks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tasks)


def table_rows(header: str) -> dict[str, list[str]]:
    """The rows of the README's table whose header row starts with ``header``, keyed by their first cell (no backticks)."""
    tables, current = [], None
    for line in README.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = {"header": " | ".join(cells), "rows": {}}
            tables.append(current)
        elif not line.startswith("|---"):
            current["rows"][cells[0].strip("`")] = cells
    found = [t["rows"] for t in tables if t["header"].startswith(header)]
    assert len(found) == 1, f"README: expected one table with header {header!r}, found {len(found)}"
    return found[0]


# What a profile row may state, each a regex with one number and the value it must equal.
PROFILE_FACTS = {
    r"d_model (\d+)": lambda p: p.base.model.d_model,
    r"(\d+) layers": lambda p: p.base.model.n_layers,
    r"(\d+) heads": lambda p: p.base.model.n_heads,
    r"(\d+) experts top-\d": lambda p: p.base.model.num_experts,
    r"experts top-(\d+)": lambda p: p.base.model.top_k,
    r"d_ff (\d+)": lambda p: p.base.model.d_ff,
    r"BPE (\d+)": lambda p: p.base.data.bpe_vocab_size if p.base.data.tokenizer == "bpe" else None,
    r"(\d+) documents": lambda p: p.base.data.max_documents,
    r"seq (\d+)": lambda p: p.base.train.seq_len,
    r"batch (\d+)": lambda p: p.base.train.batch_size,
    r"(\d+) steps": lambda p: p.base.train.steps,
    r"(\d+) for z-loss": lambda p: p.zloss_steps,
    r"(\d+) seeds": lambda p: len(p.seeds),
}
# Numbers that are names, not sizes.
PROFILE_NAMES_WITH_DIGITS = ("GPT-2", "T4", "V100", "bf16", "fp16", "fp32")


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_every_number_in_a_profile_row_is_the_codes(name):
    row = table_rows("profile | for").get(name)
    assert row is not None, f"README's profile table has no row for {name!r}"
    profile, text = get_profile(name), " | ".join(row[1:])
    for pattern, value in PROFILE_FACTS.items():
        for match in re.finditer(pattern, text):
            assert int(match[1]) == value(profile), f"README says {match[0]!r} for {name}; the code has {value(profile)}"
    unchecked = text
    for pattern in (*PROFILE_FACTS, *map(re.escape, PROFILE_NAMES_WITH_DIGITS)):
        unchecked = re.sub(pattern, "", unchecked)
    assert not re.search(r"\d", unchecked), f"{name}: a number this test does not check: {unchecked!r}"
    if profile.base.data.tokenizer == "gpt2":
        assert "GPT-2 tokens" in text
    optimizer = {"adamw": "AdamW", "muon": "Muon + AdamW"}[profile.base.train.optimizer]
    assert name == "smoke" or optimizer in text, f"{name} trains with {optimizer}"


def test_every_profile_has_a_row():
    assert set(table_rows("profile | for")) == set(PROFILE_NAMES)


def test_python_and_torch_floors_match_pyproject():
    python = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    torch = next(r for r in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", r)).removeprefix("torch>=")
    assert f"Python {python}+" in README and f"torch {torch} or newer" in README
    stated = set(re.findall(r"Python (\d+\.\d+)\+", README)) | set(re.findall(r"torch (\d+\.\d+) or newer", README))
    assert stated == {python, torch}


def test_node_floor_matches_tasks():
    assert set(re.findall(r"Node\.js (\d+)\+", README)) == {str(tasks.NODE_MAJOR_MINIMUM)}


def test_the_notebook_table_lists_every_notebook_in_order():
    notebooks = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb"))
    rows = table_rows(" | notebook")
    linked = [re.search(r"\]\((notebooks/[^)]+\.ipynb)\)", cells[1])[1] for cells in rows.values()]
    assert linked == notebooks
    assert list(rows) == [Path(n).name[:2] for n in notebooks]
    for number in re.findall(r"notebook (\d\d)\b", README):
        assert number in rows, f"README mentions notebook {number}, which does not exist"


def test_stored_results_hardware_torch_and_date_match_the_csvs():
    stated = table_rows("profile | results")
    folders = sorted(p.name for p in (ROOT / "results").iterdir() if p.is_dir())
    assert sorted(stated) == folders
    for name, (_, _, device, torch, finished) in stated.items():
        frames = [pd.read_csv(f) for f in sorted((ROOT / "results" / name).glob("*.csv"))]
        runs = pd.concat(frames)
        assert set(runs["device"]) == {device}, f"results/{name}: devices {sorted(set(runs['device']))}, README says {device!r}"
        assert set(runs["torch_version"]) == {torch}, f"results/{name}: torch {sorted(set(runs['torch_version']))}"
        assert set(runs["finished_at"].str[:10]) == {finished}, f"results/{name}: dates {sorted(set(runs['finished_at'].str[:10]))}"


def test_the_studies_named_are_the_clis():
    line = next(line for line in README.splitlines() if "moe_lib run" in line and "one study's grid" in line)
    named = set(line.split("one study's grid:")[1].replace(",", " ").split())
    usage = subprocess.run([sys.executable, "-m", "moe_lib", "run", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    listed = re.search(r"some of \[([^\]]*)\]", " ".join(usage.split()))
    assert listed, usage
    assert named == set(re.findall(r"'([a-z_]+)'", listed.group(1)))


def test_colab_hour_is_the_budgets_estimate():
    assert "about\nan hour for the whole course" in README or "about an hour for the whole course" in README
    assert 0.75 <= course_hours(get_profile("colab")) <= 1.5


def test_every_relative_link_and_image_exists():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "no relative links found: the pattern is wrong"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == []


def test_the_readme_names_only_files_that_exist():
    """Paths in backticks (``tests/test_architecture.py``, ``.ci/run``...) must exist too; build/ is made by a command."""
    paths = [p for p in re.findall(r"`([\w.\-/]+/[\w.\-]+\.\w+|\.ci/run)`", README) if not p.startswith("build/")]
    assert paths and [p for p in paths if not (ROOT / p).exists()] == []
