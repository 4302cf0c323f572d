"""Trainer, schedule, checkpoints, studies and CLI, end to end on the smoke profile's real data."""

from __future__ import annotations

import functools
import json
import math

import pandas as pd
import pytest
import torch

from moe_lib import cli
from moe_lib.checkpoint import load_checkpoint, save_checkpoint
from moe_lib.config import TrainConfig
from moe_lib.model import MoETransformer
from moe_lib.profiles import get_profile
from moe_lib.train import lr_factor, load_data, train_run


@pytest.fixture(scope="module")
def smoke():
    return get_profile("smoke")


@pytest.fixture(scope="module")
def data(smoke):
    return load_data(smoke.base.data)


@pytest.mark.parametrize("steps, warmup", [(10, 0), (10, 3), (300, 30), (2, 1)])
def test_schedule_reaches_its_floor_at_the_last_optimizer_step(steps, warmup):
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(steps)]
    assert factors[-1] == pytest.approx(0.1)
    assert max(factors) == pytest.approx(1.0)
    assert all(f >= 0.1 - 1e-12 for f in factors[warmup:])  # never below the floor once warm
    if warmup:
        assert factors[:warmup] == sorted(factors[:warmup])  # linear warmup rises
    decay = factors[max(warmup, 1) - 1 :]
    assert decay == sorted(decay, reverse=True)  # then never rises again


def test_schedule_counts_optimizer_steps_not_micro_steps():
    a = TrainConfig(steps=50, warmup_steps=5, grad_accum_steps=1)
    b = TrainConfig(steps=50, warmup_steps=5, grad_accum_steps=4)
    assert [lr_factor(s, a) for s in range(50)] == [lr_factor(s, b) for s in range(50)]


def test_train_run_history_metrics_and_determinism(smoke, data):
    config = smoke.base.with_model(noise_std=0.1)
    first = train_run(config, data=data, profile="smoke")
    second = train_run(config, data=data, profile="smoke")
    pd.testing.assert_frame_equal(first.history.drop(columns="tokens_per_s"), second.history.drop(columns="tokens_per_s"))
    other = train_run(config.with_train(seed=7), data=data, profile="smoke")
    assert not first.history.lm_loss.equals(other.history.lm_loss)

    h, m = first.history, first.metrics
    for column in ["step", "lr", "lm_loss", "lb_loss", "z_loss", "tokens_per_s", "entropy_L0", "cv_L1", "logsumexp_L0", "util_L0_E3", "val_loss"]:
        assert column in h.columns, column
    assert h.step.iloc[-1] == config.train.steps
    assert h.lr.iloc[-1] == pytest.approx(config.train.lr * config.train.min_lr_ratio)
    for key in ["best_val_perplexity", "test_perplexity", "test_top3_accuracy", "ms_per_step", "peak_memory_gb", "expert_usage_cv", "router_entropy"]:
        assert math.isfinite(m[key]), key
    assert m["test_perplexity"] == pytest.approx(math.exp(m["test_loss"]))
    assert m["best_val_loss"] <= m["val_loss"] + 1e-12
    assert 0 <= m["test_accuracy"] <= m["test_top3_accuracy"] <= 1
    assert m["profile"] == "smoke" and m["corpus"] == "shakespeare"


def test_training_lowers_the_loss(smoke, data):
    config = smoke.base.with_train(steps=40, eval_every=40, lr=1e-2, warmup_steps=4)
    h = train_run(config, data=data).history
    assert h.lm_loss.iloc[-5:].mean() < h.lm_loss.iloc[:3].mean() - 0.5


def test_nan_loss_stops_the_run_naming_the_step(smoke, data, monkeypatch):
    original = MoETransformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        out = original(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third optimizer step (index 2)
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoETransformer, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"optimizer step 2.*lm=.*load_balancing=.*z="):
        train_run(smoke.base, data=data)


def test_checkpoint_round_trip_gives_identical_logits(smoke, data, tmp_path):
    result = train_run(smoke.base, data=data, checkpoint_dir=tmp_path / "run")
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["config.json", "metrics.json", "model.safetensors"]
    model, config, metrics = load_checkpoint(tmp_path / "run")
    assert config == result.config
    assert metrics["test_loss"] == pytest.approx(result.metrics["test_loss"])
    x = data.val.tokens[: 2 * 32].view(2, 32)
    result.model.eval()
    assert torch.equal(model(x).logits, result.model(x).logits)


def test_checkpoint_with_wrong_shapes_fails_clearly(smoke, tmp_path):
    config = smoke.base
    save_checkpoint(MoETransformer(config.model), config, {}, tmp_path)
    bad = json.loads((tmp_path / "config.json").read_text())
    bad["model"]["d_ff"] = 64
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"does not match its config.json.*w_in"):
        load_checkpoint(tmp_path)


def test_generation_is_seeded(smoke, data):
    result = train_run(smoke.base, data=data)
    a = result.generate("ROMEO:", max_new_tokens=12, seed=3)
    assert a == result.generate("ROMEO:", max_new_tokens=12, seed=3)
    assert a.startswith("ROMEO:") and len(a) > len("ROMEO:")


def test_cli_runs_a_smoke_study_end_to_end(capsys):
    assert cli.main(["run", "zloss", "--profile", "smoke", "--seeds", "42", "43"]) == 0
    out = capsys.readouterr().out
    assert "profile=smoke" in out and "z=0.01" in out and "improvement" in out


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "no-such-study"])
    assert "invalid choice: 'no-such-study'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "noise", "--profile", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'huge'.*\['smoke', 'cpu', 'gpu', 'colab'\]"):
        get_profile("huge")


TIMING_COLUMNS = ["finished_at", "training_time_minutes", "ms_per_step", "tokens_per_second", "peak_memory_gb"]


def test_real_grid_interrupted_and_resumed_equals_uninterrupted(smoke, tmp_path):
    import functools

    from moe_lib.experiments import run_grid
    from moe_lib.studies import build_grid

    grid = build_grid("routing", smoke, seeds=[42])
    train = functools.partial(train_run, profile="smoke")
    whole = run_grid(grid, tmp_path / "whole", train_fn=train, progress=False)

    calls = {"n": 0}

    def interrupted(config, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return train(config, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "resumed", train_fn=interrupted, progress=False)
    partial_rows = pd.read_csv(tmp_path / "resumed" / f"{grid.name}.csv")
    assert len(partial_rows) == 2 and partial_rows.run_id.is_unique

    resumed = run_grid(grid, tmp_path / "resumed", train_fn=interrupted, progress=False)
    assert calls["n"] == 5  # 2 finished + 1 interrupted + the 2 missing ones; finished runs were not retrained
    on_disk = pd.read_csv(tmp_path / "resumed" / f"{grid.name}.csv")
    assert len(on_disk) == len(grid.runs) and on_disk.run_id.is_unique
    pd.testing.assert_frame_equal(
        resumed.drop(columns=TIMING_COLUMNS).reset_index(drop=True),
        whole.drop(columns=TIMING_COLUMNS).reset_index(drop=True),
    )


def test_missing_checkpoint_is_retrained_and_its_row_replaced(smoke, tmp_path, monkeypatch):
    from moe_lib import studies

    monkeypatch.setattr(studies, "output_paths", lambda profile: type("P", (), {"saved_models": tmp_path / "models", "results": tmp_path / "results"})())
    grid = studies.build_grid("routing", smoke, seeds=[42])
    train = functools.partial(train_run, profile="smoke")
    from moe_lib.experiments import load_histories, run_grid

    results = run_grid(grid, tmp_path / "results", train_fn=train, checkpoint_root=tmp_path / "models" / grid.name, progress=False)
    study = studies.StudyResult(grid, smoke, results, load_histories(grid, tmp_path / "results"), tmp_path / "results" / f"{grid.name}.csv")
    target = studies.checkpoint_dir(study, "top-2")  # present: returned as is
    (target / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        studies.checkpoint_dir(study, "top-2", train_if_missing=False)

    assert studies.checkpoint_dir(study, "top-2") == target
    assert (target / "model.safetensors").is_file()
    on_disk = pd.read_csv(study.results_path)
    assert len(on_disk) == len(grid.runs) and on_disk.run_id.is_unique  # replaced, not appended
    pd.testing.assert_frame_equal(  # same config and seed: the same numbers on CPU
        study.results.drop(columns=TIMING_COLUMNS).reset_index(drop=True),
        results.drop(columns=TIMING_COLUMNS).reset_index(drop=True),
    )
    with pytest.raises(ValueError, match="valid"):
        studies.checkpoint_dir(study, "top-3")
