"""Experiment grids: resumable, atomic, refusing changed configs; and their statistics.

No model is trained here: ``FakeTrainer`` is a pure function of the config and seed, so the
grid machinery is tested on its own and in well under a second.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_lib.runs import grid as ex
from moe_lib.runs import store
from moe_lib.config import RunConfig
from moe_lib.runs import Grid, Run, load_histories, load_results, run_grid
from moe_lib.stats import format_mean_std, mean_ci, paired_comparison, paired_differences, summarize, summary_table

# Student's t quantiles. For 2 degrees of freedom the quantile has a closed form,
# t_p = (2p - 1) / sqrt(2 p (1 - p)), so t_{0.975, 2} = 0.95 / sqrt(0.04875).
T_975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.302652729749464
T_975_3 = 3.182446305284263  # t_{0.975, 3}, from tables


@dataclass
class FakeResult:
    metrics: dict
    history: pd.DataFrame


class FakeTrainer:
    """Deterministic stand-in for train_run; counts calls and can raise on the k-th one."""

    def __init__(self, interrupt_on: int | None = None, error: type[BaseException] = KeyboardInterrupt):
        self.calls: list[str] = []
        self.configs: list[RunConfig] = []
        self.checkpoint_dirs: list[Path | None] = []
        self.interrupt_on, self.error = interrupt_on, error

    def __call__(self, config: RunConfig, *, run_id: str, checkpoint_dir: Path | None):
        self.calls.append(run_id)
        self.configs.append(config)
        self.checkpoint_dirs.append(checkpoint_dir)
        if self.interrupt_on is not None and len(self.calls) == self.interrupt_on:
            raise self.error("simulated interruption")
        m, seed = config.model, config.train.seed
        val_loss = 3.0 + m.noise_std - 10 * m.load_balancing_weight + 0.01 * (seed - 42)
        metrics = {
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss),
            "best_val_perplexity": math.exp(val_loss - 0.05),
            "val_accuracy": 0.3 + 0.001 * seed,
            "expert_usage_cv": 0.1 * (1 + m.noise_std),
            "training_time_minutes": 0.5,
            "test_perplexity": math.exp(val_loss + 0.1),
            "device": "cpu (fake)",
            "precision_used": "fp32",
        }
        steps = [1, 2, 3]
        history = pd.DataFrame({"step": steps, "lm_loss": [val_loss + 1.0 / s for s in steps], "seed": seed})
        return FakeResult(metrics, history)


BASE = RunConfig()


def noise_grid(seeds=(42, 43, 44), name="noise", base=BASE) -> Grid:
    return Grid.factorial(
        name,
        base,
        {"noise_std": [0.0, 0.1], "load_balancing_weight": [0.01, 0.0]},
        seeds,
        baseline={"noise_std": 0.0, "load_balancing_weight": 0.01},
    )


def without_time(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns="finished_at").reset_index(drop=True)


# --------------------------------------------------------------------------- runs and grids


def test_run_takes_its_seed_and_has_a_safe_id_and_stable_hash():
    run = Run("noise=0.1, lb=0.01", {"noise_std": 0.1, "load_balancing_weight": 0.01}, 43, BASE.with_model(noise_std=0.1))
    assert run.config.train.seed == 43
    assert run.run_id == "noise_std=0.1__load_balancing_weight=0.01__seed=43"
    assert Run("top-2 random", {}, 7, BASE).run_id == "top-2_random__seed=7"
    assert len(run.config_hash) == 12 and int(run.config_hash, 16) >= 0
    assert run.config_hash == ex.config_hash(RunConfig.from_dict(run.config.to_dict()))
    assert run.config_hash != ex.config_hash(run.config.with_model(noise_std=0.2))
    # display-only settings do not count as a changed config
    assert run.config_hash == ex.config_hash(run.config.with_train(progress=False))


def test_grid_validation():
    run = Run("a", {}, 1, BASE)
    with pytest.raises(ValueError, match="no runs"):
        Grid("g", [])
    with pytest.raises(ValueError, match="duplicate run ids"):
        Grid("g", [run, run])
    with pytest.raises(ValueError, match="baseline 'nope'.*valid conditions are \\['a'\\]"):
        Grid("g", [run], baseline="nope")
    with pytest.raises(ValueError, match="factors"):
        Grid("g", [run], factors=("noise_std",))
    with pytest.raises(ValueError, match="name"):
        Grid("a/b", [run])
    with pytest.raises(ValueError, match="clash"):
        Run("a", {"seed": 1}, 1, BASE)


def test_factorial_and_from_conditions():
    grid = noise_grid(seeds=(1, 2))
    assert len(grid.runs) == 8 and grid.factors == ("noise_std", "load_balancing_weight")
    assert grid.conditions[0] == grid.baseline == "noise_std=0.0, load_balancing_weight=0.01"
    assert grid.seeds == [1, 2]
    for run in grid.runs:
        assert run.config.model.noise_std == run.factors["noise_std"]
        assert run.config.model.load_balancing_weight == run.factors["load_balancing_weight"]
        assert run.config.train.seed == run.seed

    conds = {"baseline": {"z_loss_weight": 0.0}, "z=0.001": {"z_loss_weight": 0.001, "lr": 1e-3}}
    grid = Grid.from_conditions("zloss", BASE, conds, seeds=[42], baseline="baseline")
    assert grid.factors == ("z_loss_weight", "lr")
    assert grid.runs[0].factors == {"z_loss_weight": 0.0, "lr": BASE.train.lr}  # base value recorded
    assert grid.runs[1].config.train.lr == 1e-3
    with pytest.raises(ValueError, match="unknown config field 'bogus'"):
        Grid.from_conditions("x", BASE, {"a": {"bogus": 1}}, seeds=[1])


# --------------------------------------------------------------------------- running


def test_run_grid_writes_rows_histories_and_grid_json(tmp_path):
    grid, trainer = noise_grid(), FakeTrainer()
    df = run_grid(grid, tmp_path, train_fn=trainer, progress=False, checkpoint_root=tmp_path / "ckpt")
    assert list(df["run_id"]) == grid.run_ids  # grid order
    assert list(df.columns[:6]) == ["run_id", "condition", "noise_std", "load_balancing_weight", "seed", "config_hash"]
    assert df.columns[-1] == "finished_at"
    for col in ("seed", "noise_std", "load_balancing_weight", *store.STUDY_METRICS):
        assert col in df.columns
    assert df["peak_memory_gb"].isna().all()  # not reported by the fake trainer: present, NaN
    assert list(df["config_hash"]) == [r.config_hash for r in grid.runs]
    assert trainer.checkpoint_dirs[0] == tmp_path / "ckpt" / grid.run_ids[0]
    assert all(c.train.progress is False for c in trainer.configs)  # progress=False silences the bars

    hist = load_histories(grid, tmp_path)
    assert len(hist) == 3 * len(grid.runs)
    assert list(hist.columns[:5]) == ["run_id", "condition", "noise_std", "load_balancing_weight", "seed"]
    assert (tmp_path / "noise" / "history" / f"{grid.run_ids[0]}.csv").exists()
    described = json.loads((tmp_path / "noise" / "grid.json").read_text())
    assert [r["run_id"] for r in described["runs"]] == grid.run_ids
    assert RunConfig.from_dict(described["runs"][0]["config"]) == grid.runs[0].config

    # a second call trains nothing and returns the same table
    again = FakeTrainer()
    pd.testing.assert_frame_equal(run_grid(grid, tmp_path, train_fn=again, progress=False), df)
    assert again.calls == []


def test_a_run_another_grid_already_trained_is_reused_not_retrained(tmp_path):
    """Two studies with one identical configuration (the course trains the classic model in three)."""
    first = Grid.from_conditions("first", BASE, {"a": {"noise_std": 0.1}, "b": {"noise_std": 0.5}}, (42, 43))
    trainer = FakeTrainer()
    run_grid(first, tmp_path, train_fn=trainer, progress=False, checkpoint_root=tmp_path / "ckpt" / "first")
    for run_id in first.run_ids[:2]:  # the fake trainer writes no checkpoint; give the "a" runs one
        (tmp_path / "ckpt" / "first" / run_id).mkdir(parents=True)
        (tmp_path / "ckpt" / "first" / run_id / "model.safetensors").write_text(run_id)
    second = Grid.from_conditions("second", BASE, {"same": {"noise_std": 0.1}, "new": {"noise_std": 0.3}}, (42, 43))
    again = FakeTrainer()
    rows = run_grid(second, tmp_path, train_fn=again, progress=False, checkpoint_root=tmp_path / "ckpt" / "second")
    assert again.calls == [r.run_id for r in second.runs if r.condition == "new"]  # "same" was copied, not trained
    source = load_results(first, tmp_path).query("condition == 'a'").set_index("seed")
    assert source.run_id.tolist() == first.run_ids[:2]
    same = rows[rows.condition == "same"].set_index("seed")
    assert same.reused_from.tolist() == [f"first/{source.loc[s, 'run_id']}" for s in (42, 43)]
    assert rows[rows.condition == "new"].reused_from.isna().all()
    for column in ("val_perplexity", "test_perplexity", "config_hash"):
        assert same[column].tolist() == source.loc[[42, 43], column].tolist()
    # timings were measured then, by the source run: blank here, kept aside as the source's
    assert same.training_time_minutes.isna().all()
    assert same.training_time_minutes_source.tolist() == source.loc[[42, 43], "training_time_minutes"].tolist()
    history = load_histories(second, tmp_path)
    copied = history[history.condition == "same"]
    assert list(history.columns[:4]) == ["run_id", "condition", "noise_std", "seed"] and len(copied) == 6
    assert copied.run_id.isin(second.run_ids).all()
    assert copied.lm_loss.tolist() == load_histories(first, tmp_path).query("condition == 'a'").lm_loss.tolist()
    target = tmp_path / "ckpt" / "second" / same.loc[42, "run_id"] / "model.safetensors"
    assert target.read_text() == source.loc[42, "run_id"]  # the checkpoint came along
    # reuse=False trains everything
    fresh = FakeTrainer()
    run_grid(Grid.from_conditions("third", BASE, {"same": {"noise_std": 0.1}}, (42,)), tmp_path, train_fn=fresh, progress=False, reuse=False)
    assert len(fresh.calls) == 1


class ElsewhereTrainer(FakeTrainer):
    """The fake trainer as if on another machine: a CUDA device in bf16."""

    def __call__(self, config, *, run_id, checkpoint_dir):
        result = super().__call__(config, run_id=run_id, checkpoint_dir=checkpoint_dir)
        result.metrics.update(device="NVIDIA H200", precision_used="bf16")
        return result


def test_a_run_made_on_another_device_or_precision_is_trained_not_reused(tmp_path):
    """config_hash hashes device="auto" and precision="auto": the same hash on a GPU in bf16 is not this CPU fp32 run."""
    conditions = {"a": {"noise_std": 0.1}}
    run_grid(Grid.from_conditions("on_gpu", BASE, conditions, (42,)), tmp_path, train_fn=ElsewhereTrainer(), progress=False)
    here = FakeTrainer()
    rows = run_grid(Grid.from_conditions("on_cpu", BASE, conditions, (42,)), tmp_path, train_fn=here, progress=False)
    assert here.calls == ["noise_std=0.1__seed=42"] and "reused_from" not in rows.columns
    assert store.resolved_hardware(BASE) == ("cpu", "fp32")  # what "auto" resolves to on this (CPU-only) machine
    # a run made here on the CPU in fp32 is reused by a third grid
    again = FakeTrainer()
    rows = run_grid(Grid.from_conditions("third", BASE, conditions, (42,)), tmp_path, train_fn=again, progress=False)
    assert again.calls == [] and rows.reused_from.tolist() == ["on_cpu/noise_std=0.1__seed=42"]


def test_a_grid_whose_verdicts_compare_time_trains_every_run(tmp_path):
    """Notebook 07's grouped-vs-loop timing must not take "grouped" from another study's run made at another time."""
    conditions = {"grouped": {"dispatch": "grouped"}, "loop": {"dispatch": "loop"}}
    run_grid(Grid.from_conditions("earlier", BASE, {"grouped": {"dispatch": "grouped"}}, (42,)), tmp_path, train_fn=FakeTrainer(), progress=False)
    timed = Grid.from_conditions("dispatch", BASE, conditions, (42,), compares_time=True)
    trainer = FakeTrainer()
    rows = run_grid(timed, tmp_path, train_fn=trainer, progress=False)
    assert trainer.calls == timed.run_ids and "reused_from" not in rows.columns
    assert rows.training_time_minutes.notna().all()
    from moe_lib import studies
    from moe_lib.profiles import get_profile

    smoke = get_profile("smoke")
    timed_studies = {name for name in studies.STUDIES if studies.build_grid(name, smoke).compares_time}
    assert timed_studies == {"dispatch", "modern", "capacity"}


def test_interrupted_grid_resumes_to_the_same_csv(tmp_path):
    grid = noise_grid()
    reference = run_grid(grid, tmp_path / "ref", train_fn=FakeTrainer(), progress=False)

    first = FakeTrainer(interrupt_on=5)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "int", train_fn=first, progress=False)
    partial = load_results(grid, tmp_path / "int")
    assert list(partial["run_id"]) == grid.run_ids[:4]  # finished runs kept, nothing partial
    assert not (tmp_path / "int" / "noise" / "history" / f"{grid.run_ids[4]}.csv").exists()

    second = FakeTrainer()
    resumed = run_grid(grid, tmp_path / "int", train_fn=second, progress=False)
    assert second.calls == grid.run_ids[4:]  # the first four were not trained again
    on_disk = pd.read_csv(tmp_path / "int" / "noise.csv")
    assert not on_disk["run_id"].duplicated().any() and len(on_disk) == len(grid.runs)
    pd.testing.assert_frame_equal(without_time(resumed), without_time(reference))
    pd.testing.assert_frame_equal(
        without_time(pd.read_csv(tmp_path / "int" / "noise.csv")), without_time(pd.read_csv(tmp_path / "ref" / "noise.csv"))
    )


def test_crash_while_writing_leaves_old_csv_intact(tmp_path, monkeypatch):
    grid = noise_grid(seeds=(42,))
    run_grid(Grid(grid.name, grid.runs[:2], grid.factors), tmp_path, train_fn=FakeTrainer(), progress=False)
    csv = tmp_path / "noise.csv"
    before = csv.read_bytes()

    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == csv:
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        run_grid(grid, tmp_path, train_fn=FakeTrainer(), progress=False)
    monkeypatch.setattr(store.os, "replace", real_replace)

    assert csv.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was cleaned up
    # a temp file left by a SIGKILLed writer is ignored and cleared
    (tmp_path / ".noise.csv.stale.tmp").write_text("run_id,cond")
    trainer = FakeTrainer()
    df = run_grid(grid, tmp_path, train_fn=trainer, progress=False)
    assert trainer.calls == grid.run_ids[2:]
    assert list(df["run_id"]) == grid.run_ids
    assert not list(tmp_path.glob(".*.tmp"))


def test_changed_config_is_refused_and_fresh_moves_old_results_aside(tmp_path):
    run_grid(noise_grid(seeds=(42,)), tmp_path, train_fn=FakeTrainer(), progress=False)
    changed = noise_grid(seeds=(42,), base=BASE.with_train(lr=1e-3))
    with pytest.raises(ValueError) as info:
        run_grid(changed, tmp_path, train_fn=FakeTrainer(), progress=False)
    message = str(info.value)
    for part in (changed.run_ids[0], "'noise'", str(tmp_path / "noise.csv"), "fresh=True", "results_dir"):
        assert part in message

    trainer = FakeTrainer()
    df = run_grid(changed, tmp_path, train_fn=trainer, progress=False, fresh=True)
    assert trainer.calls == changed.run_ids
    assert list(df["config_hash"]) == [r.config_hash for r in changed.runs]
    backups = list(tmp_path.glob("noise.csv.bak-*"))
    assert len(backups) == 1 and len(pd.read_csv(backups[0])) == 4
    assert len(list(tmp_path.glob("noise.bak-*"))) == 1  # histories moved aside with it


def test_runs_stored_by_an_older_results_version_are_refused(tmp_path, monkeypatch):
    """A fix that changes what the same config computes bumps RESULTS_VERSION: old rows must not mix in."""
    monkeypatch.setattr(ex, "RESULTS_VERSION", ex.RESULTS_VERSION - 1)
    run_grid(noise_grid(seeds=(42,)), tmp_path, train_fn=FakeTrainer(), progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="config hash"):
        run_grid(noise_grid(seeds=(42,)), tmp_path, train_fn=FakeTrainer(), progress=False)


def test_runs_stored_under_results_version_2_are_refused(tmp_path, monkeypatch):
    """Version 3: fp32 Newton-Schulz on CPU, Muon on the experts and the gate, corpus content in the hash."""
    monkeypatch.setattr(ex, "RESULTS_VERSION", 2)
    run_grid(noise_grid(seeds=(42,)), tmp_path, train_fn=FakeTrainer(), progress=False)
    stored = load_results("noise", tmp_path)
    monkeypatch.undo()
    assert set(stored["config_hash"]).isdisjoint(r.config_hash for r in noise_grid(seeds=(42,)).runs)
    with pytest.raises(ValueError, match="config hash"):
        run_grid(noise_grid(seeds=(42,)), tmp_path, train_fn=FakeTrainer(), progress=False)


def test_a_text_corpus_is_hashed_by_its_content_not_only_its_name(tmp_path, monkeypatch):
    config = BASE.with_data(corpus="text:corpus.txt")  # the same name, read in two folders
    hashes = []
    for folder, text in (("a", "To be, or not to be.\n"), ("b", "To be, or not to be?\n"), ("c", "To be, or not to be.\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "corpus.txt").write_text(text)
        monkeypatch.chdir(tmp_path / folder)
        hashes.append(ex.config_hash(config))
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2]  # content decides, not the folder
    (tmp_path / "c" / "corpus.txt").write_text("edited in place\n")
    assert ex.config_hash(config) != hashes[2]


def test_a_hub_corpus_is_hashed_with_its_revision(monkeypatch):
    from dataclasses import replace

    from moe_lib.data import corpora

    config = BASE.with_data(corpus="tinystories")
    before = ex.config_hash(config)
    monkeypatch.setitem(corpora.HUB_CORPORA, "tinystories", replace(corpora.HUB_CORPORA["tinystories"], revision="0123abc"))
    assert ex.config_hash(config) != before
    assert corpora.corpus_identity("tinystories") == "hub:roneneldan/TinyStories:None@0123abc"
    assert corpora.corpus_identity("shakespeare") is None  # part of the package: versioned by RESULTS_VERSION


def test_more_seeds_later_trains_only_the_new_runs(tmp_path):
    run_grid(noise_grid(seeds=(42,)), tmp_path, train_fn=FakeTrainer(), progress=False)
    bigger, trainer = noise_grid(seeds=(42, 43)), FakeTrainer()
    df = run_grid(bigger, tmp_path, train_fn=trainer, progress=False)
    assert trainer.calls == [r.run_id for r in bigger.runs if r.seed == 43]
    assert list(df["run_id"]) == bigger.run_ids
    # a smaller grid returns only its rows; the CSV keeps every run
    assert len(load_results(noise_grid(seeds=(43,)), tmp_path)) == 4
    assert len(load_results("noise", tmp_path)) == 8


# --------------------------------------------------------------------------- statistics


def hand_made() -> pd.DataFrame:
    """A: 10, 12, 14 (seeds 1-3). B: 9, 10, 12 (seeds 1-3) and 8 (seed 4, no partner). C: one run."""
    rows = [("A", 1, 10.0), ("A", 2, 12.0), ("A", 3, 14.0), ("B", 1, 9.0), ("B", 2, 10.0), ("B", 3, 12.0), ("B", 4, 8.0), ("C", 2, 11.0)]
    df = pd.DataFrame(rows, columns=["condition", "seed", "ppl"])
    df.insert(1, "lb", df["condition"].map({"A": 0.01, "B": 0.0, "C": 0.0}))  # a factor column
    df["run_id"] = df["condition"] + df["seed"].astype(str)
    return df[["run_id", "condition", "lb", "seed", "ppl"]]


def test_summarize_matches_hand_computed_t_interval():
    s = summarize(hand_made(), metrics=["ppl"])
    assert list(s["condition"]) == ["A", "B", "C"]  # grid (first appearance) order
    assert list(s["lb"]) == [0.01, 0.0, 0.0]  # constant factor columns are carried along
    a, b, c = (s.iloc[i] for i in range(3))
    assert (a.ppl_mean, a.ppl_std, a.ppl_n) == (12.0, 2.0, 3)
    half = T_975_2 * 2.0 / math.sqrt(3)
    assert a.ppl_ci_low == pytest.approx(12 - half, rel=1e-12) and a.ppl_ci_high == pytest.approx(12 + half, rel=1e-12)
    std_b = math.sqrt(((9 - 9.75) ** 2 + (10 - 9.75) ** 2 + (12 - 9.75) ** 2 + (8 - 9.75) ** 2) / 3)
    assert b.ppl_mean == 9.75 and b.ppl_std == pytest.approx(std_b) and b.ppl_n == 4
    assert b.ppl_ci_high == pytest.approx(9.75 + T_975_3 * std_b / 2)
    assert c.ppl_n == 1 and c.ppl_mean == 11.0 and np.isnan(c.ppl_std) and np.isnan(c.ppl_ci_low)

    table = summary_table(s, digits=2)
    assert list(table.columns) == ["condition", "lb", "ppl", "n"]
    assert list(table["ppl"]) == ["12.00 ± 2.00", f"9.75 ± {std_b:.2f}", "11.00"]
    assert format_mean_std(130.2341, 0.9412, 2) == "130.23 ± 0.94"

    by_factor = summarize(hand_made(), by="lb", metrics=["ppl"])
    assert list(by_factor["lb"]) == [0.01, 0.0] and list(by_factor["ppl_n"]) == [3, 5]
    assert mean_ci([1.0, float("nan"), 3.0])[:3] == (2.0, math.sqrt(2), 2)
    # by default: the known metrics that have values (not the all-NaN placeholder columns)
    results = hand_made().assign(val_loss=1.0, peak_memory_gb=float("nan"))
    assert [c for c in summarize(results).columns if c.endswith("_mean")] == ["val_loss_mean"]


def test_paired_comparison_matches_hand_computed_values():
    df = hand_made()
    pairs = paired_differences(df, "A", "ppl")
    b_pairs = pairs[pairs["condition"] == "B"]
    assert list(b_pairs["seed"]) == [1, 2, 3]  # seed 4 has no baseline partner
    assert list(b_pairs["difference"]) == [-1.0, -2.0, -2.0]
    gains = [100 * 1 / 10, 100 * 2 / 12, 100 * 2 / 14]
    assert list(b_pairs["improvement_pct"]) == pytest.approx(gains)

    cmp = paired_comparison(df, baseline="A", metric="ppl").set_index("condition")
    assert list(cmp.index) == ["B", "C"]
    b = cmp.loc["B"]
    assert b.n_pairs == 3 and b.n_unpaired == 1
    assert b.baseline_mean == 12.0 and b.treatment_mean == pytest.approx(31 / 3)
    assert b.mean_difference == pytest.approx(-5 / 3)
    # differences -1, -2, -2: std = sqrt(1/3), so the half-width is t * sqrt(1/3) / sqrt(3) = t / 3
    assert b.difference_ci_low == pytest.approx(-5 / 3 - T_975_2 / 3)
    assert b.difference_ci_high == pytest.approx(-5 / 3 + T_975_2 / 3)
    mean_gain = sum(gains) / 3
    sd_gain = math.sqrt(sum((g - mean_gain) ** 2 for g in gains) / 2)
    assert b.improvement_pct == pytest.approx(mean_gain)
    assert b.improvement_pct_ci_low == pytest.approx(mean_gain - T_975_2 * sd_gain / math.sqrt(3))
    # paired t = mean / (sd / sqrt n) = -5; for 2 degrees of freedom P(|T| > 5) = 1 - 5 / sqrt(27)
    assert b.p_value == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-9)

    c = cmp.loc["C"]  # one pair (seed 2): no interval, no test; A's seeds 1 and 3 unpaired
    assert c.n_pairs == 1 and c.n_unpaired == 2 and c.mean_difference == -1.0
    assert np.isnan(c.p_value) and np.isnan(c.difference_ci_low)

    higher = paired_comparison(df, "A", "ppl", lower_is_better=False).set_index("condition")
    assert higher.loc["B", "improvement_pct"] == pytest.approx(-mean_gain)


def test_bad_names_raise_clearly():
    df = hand_made()
    with pytest.raises(ValueError, match=r"unknown baseline 'Z'.*\['A', 'B', 'C'\]"):
        paired_comparison(df, "Z", "ppl")
    with pytest.raises(ValueError, match=r"unknown metric 'loss'.*'ppl'"):
        paired_comparison(df, "A", "loss")
    with pytest.raises(ValueError, match=r"unknown metric 'loss'"):
        summarize(df, metrics=["loss"])
    with pytest.raises(ValueError, match=r"unknown grouping column 'arm'"):
        summarize(df, by="arm", metrics=["ppl"])
    with pytest.raises(ValueError, match="ambiguous"):
        paired_comparison(pd.concat([df, df.iloc[:1]]), "A", "ppl")


def test_verdict_phrases_claim_a_winner_only_when_the_ci_excludes_zero():
    from moe_lib.studies.verdicts import lower_is_better_phrase

    assert lower_is_better_phrase("top-2", -0.1, -0.2, -0.05) == "top-2 is better (the CI excludes 0)"
    assert lower_is_better_phrase("top-2", 0.1, 0.05, 0.2) == "top-2 is worse (the CI excludes 0)"
    noisy = lower_is_better_phrase("top-2", -0.1, -0.3, 0.1, [-0.05, -0.1, -0.15])
    assert "lower mean" in noisy and "inconclusive at n = 3 (3/3 seeds" in noisy and "better" not in noisy
    assert "seed noise" not in noisy
    assert "too few seeds" in lower_is_better_phrase("top-2", 0.1, float("nan"), float("nan"))


def test_routing_grid_adds_learned_and_random_top2_with_a_shared_expert():
    from moe_lib import studies
    from moe_lib.profiles import get_profile

    smoke = get_profile("smoke")
    grid = studies.build_grid("routing", smoke)
    assert grid.conditions == ["top-1", "top-2", "top-1 random", "top-2 random", "top-2 + shared", "top-2 random + shared"]
    shared = {r.condition: r.config.model for r in grid.runs if r.config.model.num_shared_experts}
    assert set(shared) == {"top-2 + shared", "top-2 random + shared"}
    assert {m.router for m in shared.values()} == {"topk", "random"} and all(m.top_k == 2 for m in shared.values())
    assert len(grid.runs) == 6 * len(smoke.seeds)


def test_capacity_grid_runs_on_the_profiles_seeds_so_lb_on_off_pair():
    from moe_lib import studies
    from moe_lib.profiles import get_profile

    for name in ("smoke", "cpu"):
        profile = get_profile(name)
        grid = studies.build_grid("capacity", profile)
        assert grid.seeds == list(profile.seeds)
        assert len(grid.runs) <= 18  # about 14 minutes at ~45 s per cpu run
        cfs = {r.config.model.capacity_factor for r in grid.runs}
        assert {1.0, None} <= cfs
        assert {r.config.model.load_balancing_weight for r in grid.runs} == {0.0, 0.01}
