"""Trainer, schedule, checkpoints, studies and CLI, end to end on the smoke profile's real data."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from moe_lib.course import cli
from moe_lib.training.checkpoint import load_checkpoint, save_checkpoint
from moe_lib.config import TrainConfig
from moe_lib.moe.model import MoETransformer
from moe_lib.training.muon import Muon
from moe_lib.profiles import get_profile
from moe_lib.metrics import OVERFIT_MARGIN_NATS, overfitting
from moe_lib.data import eval_batches, sample_batch
from moe_lib.training.evaluate import evaluate
from moe_lib.training.loop import TrainState, forward_backward, init_train_state, load_data, optimizer_step, train_run, train_step
from moe_lib.training.optim import build_optimizer, lr_factor, optimizer_split


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


def tiny_state(smoke, **train_changes) -> TrainState:
    config = smoke.base.with_model(load_balancing_weight=0.0).with_train(**train_changes)
    return init_train_state(config, torch.device("cpu"))


def gradients(state: TrainState) -> list[torch.Tensor]:
    return [p.grad.clone() for p in state.model.parameters()]


def test_lambda_lr_gives_every_param_group_its_base_lr_times_lr_factor_at_each_step(smoke, data):
    """torch's LambdaLR, one per optimizer: AdamW's groups run at lr x lr_factor(s), Muon's at muon_lr x lr_factor(s),
    exactly the hand-written schedule's numbers (the history's lr too)."""
    state = tiny_state(smoke, optimizer="muon", steps=5, warmup_steps=2, lr=2e-3, muon_lr=0.02)
    tcfg = state.config.train
    adamw, muon = state.optimizers
    for step in range(tcfg.steps):
        used = ([g["lr"] for g in adamw.param_groups], [g["lr"] for g in muon.param_groups])
        assert used == ([tcfg.lr * lr_factor(step, tcfg)] * 2, [tcfg.muon_lr * lr_factor(step, tcfg)])
        out = train_step(state, data.train.tokens, step)
        assert out.lr == tcfg.lr * lr_factor(step, tcfg)


def test_train_step_refuses_a_step_out_of_order(smoke, data):
    state = tiny_state(smoke)
    with pytest.raises(ValueError, match="step=3 is invalid: this state's LR schedulers are at optimizer step 0"):
        train_step(state, data.train.tokens, step=3)


def test_two_half_batches_accumulate_the_gradient_of_one_full_batch(smoke, data):
    """M micro-batches of B/M: the same gradient as one batch of B (no load-balancing term,
    which each micro-batch computes from its own expert fractions)."""
    x, y = sample_batch(data.train.tokens, 8, 32, torch.Generator().manual_seed(0))
    whole = tiny_state(smoke, batch_size=8, grad_accum_steps=1)
    halves = tiny_state(smoke, batch_size=4, grad_accum_steps=2)
    whole_losses, _ = forward_backward(whole, [(x, y)], step=0)
    half_losses, _ = forward_backward(halves, [(x[:4], y[:4]), (x[4:], y[4:])], step=0)
    keep = [0, 1, 3]  # total, lm, z: token means; the unweighted lb term is per micro-batch
    torch.testing.assert_close(half_losses[keep], whole_losses[keep])
    for g_half, g_whole in zip(gradients(halves), gradients(whole)):
        torch.testing.assert_close(g_half, g_whole, rtol=1e-4, atol=1e-6)


def test_train_step_takes_grad_accum_steps_micro_batches(smoke, data, monkeypatch):
    state = tiny_state(smoke, batch_size=2, grad_accum_steps=3)
    seen = []
    original = state.model.forward
    monkeypatch.setattr(state.model, "forward", lambda x, y=None: seen.append(x.shape) or original(x, y))
    train_step(state, data.train.tokens, step=0)
    assert seen == [torch.Size([2, 32])] * 3


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_gradient_clipping_bounds_the_global_norm_the_optimizer_sees(smoke, data, grad_clip):
    state = tiny_state(smoke, grad_clip=grad_clip)
    x, y = sample_batch(data.train.tokens, 4, 32, torch.Generator().manual_seed(0))
    forward_backward(state, [(x, y)], step=0)
    raw = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients(state)])).item()
    assert raw > 1e-2  # so that a clip at 1e-3 really cuts
    norms = []
    state.optimizers[0].register_step_pre_hook(
        lambda *_: norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in state.model.parameters()])).item()))
    grad_norm = optimizer_step(state)
    assert norms == [pytest.approx(grad_clip if grad_clip else raw, rel=1e-4)]
    assert grad_norm.item() == pytest.approx(raw, rel=1e-5)  # the history's grad_norm: before clipping
    assert all(p.grad is None for p in state.model.parameters())  # cleared for the next step


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_optimizer_split_puts_every_block_matrix_on_muon_as_the_original(smoke, ffn):
    """Muon, as the original's llm.py: attention, routed experts (stacked 3-D), shared experts and the router's
    gate. AdamW with decay: the embedding (tied to the head). AdamW without decay: RMSNorm gains."""
    modern = dict(num_shared_experts=1, bias_update_rate=1e-3) if ffn == "moe" else {}
    model = MoETransformer(smoke.base.model.replace(ffn=ffn, tie_weights=True, **modern))
    adamw, muon = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in adamw.param_groups)
    moe = ("ffn.router.weight", "ffn.experts.w_in", "ffn.experts.w_out", "ffn.shared_experts.w_in.weight", "ffn.shared_experts.w_out.weight")
    hidden = ("attn.qkv.weight", "attn.proj.weight") + (moe if ffn == "moe" else ("ffn.w_in.weight", "ffn.w_out.weight"))
    assert muon_names == sorted(f"blocks.{i}.{h}" for i in range(model.cfg.n_layers) for h in hidden)
    if ffn == "moe":
        assert model.blocks[0].ffn.experts.w_in.ndim == 3 and model.blocks[0].ffn.router.expert_bias is not None  # a buffer, no optimizer's
    assert adamw.param_groups[0]["weight_decay"] == TrainConfig().weight_decay and adamw.param_groups[1]["weight_decay"] == 0.0
    assert decay == ["embed.weight"] and "lm_head.weight" not in names.values()  # tied: one tensor, AdamW
    assert sorted(no_decay) == sorted(n for n, p in model.named_parameters() if p.ndim == 1)
    assert len(muon_names) + len(decay) + len(no_decay) == len(names)  # every parameter exactly once
    assert optimizer_split(model, TrainConfig(optimizer="muon")) == {"muon": [n for n in names.values() if n in muon_names],
                                                                     "adamw, decay": decay, "adamw, no decay": no_decay}

    untied = MoETransformer(smoke.base.model.replace(ffn=ffn, tie_weights=False))
    assert optimizer_split(untied, TrainConfig(optimizer="muon"))["adamw, decay"] == ["embed.weight", "lm_head.weight"]
    plain = build_optimizer(model, TrainConfig(optimizer="adamw"))
    assert len(plain) == 1 and len(plain[0].param_groups[0]["params"]) == len(muon_names) + len(decay)


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
    assert 0 <= m["test_accuracy"] <= m["test_top3_accuracy"] <= 1
    assert m["profile"] == "smoke" and m["corpus"] == "shakespeare"
    assert m["precision"] == config.train.precision == "auto" and m["precision_used"] == "fp32"  # auto stays fp32 on a CPU


def test_checkpoint_steps_keep_the_weights_after_those_steps(smoke, data):
    """Snapshots after steps 2 and 6 (the last): the last equals the final model, the earlier one differs,
    and router saturation of the final model against itself is 1."""
    from moe_lib.runs import config_hash
    from moe_lib.metrics import router_saturation

    config = smoke.base.with_train(checkpoint_steps=(2, smoke.base.train.steps), final_eval_batches=1)
    result = train_run(config, data=data)
    assert sorted(result.snapshots) == [2, smoke.base.train.steps]
    final = result.model.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in result.snapshots[smoke.base.train.steps].items())
    assert not all(torch.equal(v, final[k]) for k, v in result.snapshots[2].items())
    early = MoETransformer(result.config.model)
    early.load_state_dict(result.snapshots[2])
    batches = list(eval_batches(data.val.tokens, config.train.seq_len, 2, max_batches=1))
    assert router_saturation(result.model, result.model, batches) == [1.0] * config.model.n_layers
    assert all(0 <= s <= 1 for s in router_saturation(early, result.model, batches))
    assert config_hash(config) == config_hash(config.with_train(checkpoint_steps=()))  # snapshots change no result
    for bad in ((0,), (smoke.base.train.steps + 1,), [2], (2.0,)):
        with pytest.raises(ValueError, match="checkpoint_steps"):
            TrainConfig(steps=smoke.base.train.steps, checkpoint_steps=bad)


def test_eval_every_leaves_a_random_router_run_alone(smoke, data):
    """The random router draws from the global RNG, in evaluation too: evaluation runs on a fork."""
    config = smoke.base.with_model(router="random").with_train(final_eval_batches=1)
    histories = [train_run(config.with_train(eval_every=e), data=data).history for e in (2, 3)]
    train_columns = [c for c in histories[0].columns if not c.startswith("val_") and c != "tokens_per_s"]
    pd.testing.assert_frame_equal(histories[0][train_columns], histories[1][train_columns])
    assert histories[0].val_loss.notna().sum() != histories[1].val_loss.notna().sum()


def test_best_val_is_the_best_periodic_validation_on_the_same_batches(smoke, data):
    """best_val_* compares like with like: every periodic validation uses the same first
    eval_batches batches; the final val_* evaluate the whole split and are not mixed in."""
    config = smoke.base.with_train(eval_every=2, eval_batches=3, final_eval_batches=1)  # final val lower here
    result = train_run(config, data=data)
    h, m = result.history, result.metrics
    assert h.val_loss.notna().sum() == 3  # steps 2, 4 and 6
    assert m["best_val_loss"] == h.val_loss.min()
    assert m["best_val_perplexity"] == pytest.approx(math.exp(h.val_loss.min()))
    assert m["val_loss"] < h.val_loss.min()  # other data: mixing it in would have "improved" the best
    assert m["val_loss_rise_from_best"] == h.val_loss.dropna().iloc[-1] - h.val_loss.min()
    assert m["overfit"] == (m["val_loss_rise_from_best"] > OVERFIT_MARGIN_NATS)


@pytest.mark.parametrize("val_losses, rise, overfit", [
    ([4.8, 4.2, 3.95, 3.94], 0.0, False),              # still improving at the end
    ([4.8, 3.95, 3.953], 0.003, False),                # a rise within the margin
    ([4.78, 4.23, 4.05, 3.95, 3.95, 4.00, 4.57], 0.62, True),  # the gpu z-loss baseline (seed 42), 1000 steps
    ([5.0], 0.0, False),
])
def test_overfitting_is_the_rise_of_the_last_validation_above_the_best(val_losses, rise, overfit):
    flagged = overfitting(val_losses)
    assert flagged["val_loss_rise_from_best"] == pytest.approx(rise)
    assert flagged["overfit"] is overfit


def test_overfitting_needs_a_validation():
    with pytest.raises(ValueError, match="at least one validation loss"):
        overfitting([])


def test_evaluation_routing_statistics_leave_out_padding(smoke, data):
    """The split's last window is padded (target -100): padding is routed, but not counted."""
    model = MoETransformer(smoke.base.model).eval()
    tokens = data.val.tokens[:100]  # 99 targets: 3 windows of 32, the last with 3 real positions
    result = evaluate(model, eval_batches(tokens, 32, 4), torch.device("cpu"))
    assert result.tokens == 99
    top_k = smoke.base.model.top_k
    assert [int(c.sum()) for c in result.routing.counts] == [99 * top_k] * smoke.base.model.n_layers
    real = evaluate(model, [(tokens[:96].view(3, 32), tokens[1:97].view(3, 32))], torch.device("cpu"))
    assert real.routing.counts[0].sum() == 96 * top_k  # no padding: every position counts


def test_expert_choice_evaluation_counts_only_slots_of_real_tokens(smoke, data):
    model = MoETransformer(smoke.base.model.replace(router="expert_choice")).eval()
    tokens = data.val.tokens[:100]
    x, y = next(eval_batches(tokens, 32, 4))
    real = (y.reshape(-1) != -100)
    assert not real.all()  # the split's end is padded
    padded = evaluate(model, [(x, y)], torch.device("cpu"))
    for r, counts in zip(model(x, y).routing, padded.routing.counts):
        assert real[r.token_indices].all()  # expert choice never picks padding in evaluation ...
        assert int(counts.sum()) == r.token_indices.numel()  # ... so every slot counts


def test_peak_memory_is_per_run(smoke, data):
    """A big run then a small one in the same process: the small one reports the smaller peak
    (the process-lifetime ru_maxrss would report the big one's again)."""
    big = smoke.base.with_model(d_model=128, d_ff=128).with_train(
        batch_size=256, steps=1, warmup_steps=0, eval_every=1, eval_batches=1, final_eval_batches=1
    )
    big_peak = train_run(big, data=data).metrics["peak_memory_gb"]
    small = train_run(smoke.base.with_train(final_eval_batches=1), data=data).metrics
    assert small["peak_memory_gb"] < big_peak - 0.1
    assert small["peak_memory_measure"] == "process peak RSS"


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


def test_untied_checkpoint_round_trip_gives_identical_logits(smoke, data, tmp_path):
    config = smoke.base.with_model(tie_weights=False)
    result = train_run(config, data=data, checkpoint_dir=tmp_path)
    model, loaded_config, _ = load_checkpoint(tmp_path)
    assert loaded_config.model.tie_weights is False
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.embed.weight)  # two trained matrices, both restored
    assert torch.equal(model.lm_head.weight, result.model.lm_head.weight)
    x = data.val.tokens[: 2 * 32].view(2, 32)
    assert torch.equal(model(x).logits, result.model.eval()(x).logits)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_checkpoint_save_load_is_exact_and_keeps_the_tied_head(smoke, tmp_path, tie_weights):
    """safetensors' save_model/load_model: every tensor and buffer back bit for bit; a tied head is one tensor
    again (stored once, as embed.weight), an untied head its own."""
    config = smoke.base.with_model(tie_weights=tie_weights, bias_update_rate=1e-3, score_func="sigmoid")
    torch.manual_seed(3)
    model = MoETransformer(config.model)
    for block in model.blocks:  # a buffer, not a parameter: saved and restored too
        block.ffn.router.expert_bias.copy_(torch.randn(config.model.num_experts))
    save_checkpoint(model, config, {}, tmp_path)
    stored = set(load_file(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in stored) is not tie_weights and "embed.weight" in stored
    loaded, _, _ = load_checkpoint(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()) is tie_weights


def test_committed_checkpoint_still_loads(smoke):
    """saved_models/01_basics was written by the hand-written tied-head code (lm_head.weight popped): it loads, tied."""
    directory = Path(__file__).resolve().parents[1] / "saved_models" / "01_basics"
    model, config, metrics = load_checkpoint(directory)
    stored = load_file(directory / "model.safetensors")
    assert config.model.tie_weights and "lm_head.weight" not in stored
    assert model.state_dict().keys() - stored.keys() == {"lm_head.weight"}
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in stored.items())
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert metrics["test_loss"] > 0


@pytest.mark.parametrize("saved_tied, expected", [(True, r"missing tensors \['lm_head.weight'\], unexpected tensors \[\]"),
                                                  (False, r"missing tensors \[\], unexpected tensors \['lm_head.weight'\]")])
def test_checkpoint_with_missing_or_unexpected_tensors_fails_clearly(smoke, tmp_path, saved_tied, expected):
    config = smoke.base.with_model(tie_weights=saved_tied)
    save_checkpoint(MoETransformer(config.model), config, {}, tmp_path)
    flipped = json.loads((tmp_path / "config.json").read_text())
    flipped["model"]["tie_weights"] = not saved_tied
    (tmp_path / "config.json").write_text(json.dumps(flipped))
    with pytest.raises(ValueError, match=r"does not match its config.json: " + expected):
        load_checkpoint(tmp_path)


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
    assert "unknown study ['no-such-study']: valid are 'all' or" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "noise", "--profile", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'huge'.*\['smoke', 'cpu', 'gpu', 'colab'\]"):
        get_profile("huge")


def test_moe_corpus_moves_a_profile_to_another_corpus_and_results_folder(tmp_path, monkeypatch):
    """The opt-in larger corpus: offline here with local records in the Hub's (TinyStories') schema.
    The default profile, and so the stored runs' hashes and folder, do not change."""
    from moe_lib import studies
    from moe_lib.data import load_documents
    from moe_lib.profiles import CORPUS_VARIABLE, output_paths

    monkeypatch.setenv("MOE_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(CORPUS_VARIABLE, raising=False)
    default = get_profile("gpu")
    hashes = [r.config_hash for r in studies.build_grid("zloss", default).runs]
    monkeypatch.setenv(CORPUS_VARIABLE, "shakespeare")  # naming the default changes nothing
    assert [r.config_hash for r in studies.build_grid("zloss", get_profile("gpu")).runs] == hashes
    assert output_paths(get_profile("gpu")).results == tmp_path / "results" / "gpu"

    stories = tmp_path / "stories.jsonl"
    stories.write_text("".join(json.dumps({"text": f"Once upon a time there was story {i}."}) + "\n" for i in range(12)))
    monkeypatch.setenv(CORPUS_VARIABLE, f"text:{stories}")
    profile = get_profile("gpu")
    assert profile.base.data.corpus == f"text:{stories}" and profile.base.model == default.base.model
    assert output_paths(profile).results.name.startswith("gpu-text-") and output_paths(profile).results.name.endswith("-gpt2")
    assert set(r.config_hash for r in studies.build_grid("zloss", profile).runs).isdisjoint(hashes)
    assert [d.text for d in load_documents(profile.base.data)][:2] == ["Once upon a time there was story 0.", "Once upon a time there was story 1."]
    assert get_profile("gpu").with_corpus("shakespeare").results_name == ""  # a notebook's setup("shakespeare")


def test_moe_corpus_on_the_hub_fails_fast_offline_and_bad_names_list_the_valid_ones(monkeypatch):
    from moe_lib.data import HubUnavailableError
    from moe_lib.profiles import CORPUS_VARIABLE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(CORPUS_VARIABLE, "tinystories")
    with pytest.raises(HubUnavailableError, match="MOE_CORPUS=tinystories needs the Hugging Face Hub.*'shakespeare'"):
        get_profile("gpu")
    with pytest.raises(ValueError, match=r"'wiki' is invalid: expected one of \['shakespeare', 'tinystories'"):
        get_profile("gpu", corpus="wiki")


TIMING_COLUMNS = ["finished_at", "training_time_minutes", "ms_per_step", "tokens_per_second", "peak_memory_gb"]


def test_real_grid_interrupted_and_resumed_equals_uninterrupted(smoke, tmp_path):
    import functools

    from moe_lib.runs import run_grid
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
    # 2 finished + 1 interrupted + the rest, each once: finished runs were not retrained
    assert calls["n"] == len(grid.runs) + 1
    on_disk = pd.read_csv(tmp_path / "resumed" / f"{grid.name}.csv")
    assert len(on_disk) == len(grid.runs) and on_disk.run_id.is_unique
    pd.testing.assert_frame_equal(
        resumed.drop(columns=TIMING_COLUMNS).reset_index(drop=True),
        whole.drop(columns=TIMING_COLUMNS).reset_index(drop=True),
    )


def test_missing_checkpoint_is_retrained_and_its_row_replaced(smoke, tmp_path, monkeypatch):
    from moe_lib import studies
    from moe_lib.studies import result

    monkeypatch.setattr(result, "output_paths", lambda profile: type("P", (), {"saved_models": tmp_path / "models", "results": tmp_path / "results"})())
    grid = studies.build_grid("routing", smoke, seeds=[42])
    train = functools.partial(train_run, profile="smoke")
    from moe_lib.runs import load_histories, run_grid

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
