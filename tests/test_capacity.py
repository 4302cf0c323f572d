"""Capacity factor and token dropping (GShard/Switch): ``C = ceil(cf * N * k / E)`` slots per expert.

The hand-computed case is the one notebook 06 walks through: 6 tokens, top-2, 3 experts.
Queue order (GShard / ST-MoE): all first choices in token order, then all second choices.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from moe_lib import plots
from moe_lib.config import ModelConfig
from moe_lib.moe.experts import Experts, capacity_keep_mask, dispatch_grouped, dispatch_loop, expert_capacity, queue_position
from moe_lib.metrics import RoutingAccumulator
from moe_lib.moe.model import MoETransformer
from moe_lib.profiles import get_profile
from moe_lib.stats import holm_adjusted, paired_comparison
from moe_lib.studies import StudyResult, build_grid
from moe_lib.studies import capacity as study_module
from moe_lib.training.loop import load_data, train_run

DISPATCH = [dispatch_grouped, dispatch_loop]
# token n chose experts HAND[n]; slots per expert: e0 = 5, e1 = 4, e2 = 3 (N k = 12)
HAND = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [0, 2]])
# The queues, first choices (n.0) in token order before second choices (n.1):
#   e0: 0.0 1.0 2.0 5.0 | 3.1      e1: 3.0 | 0.1 2.1 4.1      e2: 4.0 | 1.1 5.1
HAND_QUEUE_POSITION = torch.tensor([[0, 1], [1, 1], [2, 2], [0, 4], [0, 3], [3, 2]])


def layer_inputs(seed: int = 0, n: int = 6, d: int = 8, num_experts: int = 3):
    torch.manual_seed(seed)
    return Experts(num_experts, d, 16), torch.randn(n, d), torch.rand(n, 2)


def test_capacity_formula():
    assert expert_capacity(6, 2, 3, None) is None
    assert expert_capacity(6, 2, 3, 1.0) == 4  # ceil(1.0 * 12 / 3)
    assert expert_capacity(6, 2, 3, 0.5) == 2
    assert expert_capacity(6, 2, 3, 1.25) == 5  # ceil(5.0)
    assert expert_capacity(10, 1, 4, 1.0) == 3  # ceil(2.5)


@pytest.mark.parametrize("dispatch", DISPATCH)
def test_dropless_equals_the_uncapped_path_and_drops_nothing(dispatch):
    experts, x, gates = layer_inputs()
    y_none, drop_none = dispatch(x, HAND, gates, experts, None)
    # a capacity the busiest expert (5 slots) fits into behaves exactly like dropless
    y_big, drop_big = dispatch(x, HAND, gates, experts, expert_capacity(6, 2, 3, 2.0))
    assert drop_none.item() == 0.0 and drop_big.item() == 0.0
    assert torch.equal(y_none, y_big)


def test_dropless_model_equals_a_model_whose_capacity_never_binds():
    base = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=32, max_seq_len=16, num_experts=4, top_k=2)
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    outputs = []
    for cf in (None, 4.0):  # cf = E guarantees C >= N k: no expert can overflow
        torch.manual_seed(0)
        model = MoETransformer(ModelConfig(**base, capacity_factor=cf)).train()  # the training capacity
        outputs.append(model(x))
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    assert all(float(r.dropped_fraction) == 0.0 for out in outputs for r in out.routing)


@pytest.mark.parametrize("dispatch", DISPATCH)
def test_nothing_is_dropped_exactly_when_no_expert_overflows(dispatch):
    torch.manual_seed(1)
    n, k, num_experts = 40, 2, 6
    experts, x, _ = layer_inputs(seed=1, n=n, d=8, num_experts=num_experts)
    idx = torch.randn(n, num_experts).topk(k, dim=-1).indices
    gates = torch.rand(n, k)
    busiest = int(torch.bincount(idx.flatten(), minlength=num_experts).max())
    cf_fits = busiest * num_experts / (n * k)  # ceil(cf N k / E) = busiest: the smallest cf with no overflow
    assert expert_capacity(n, k, num_experts, cf_fits) == busiest
    y_ref, _ = dispatch(x, idx, gates, experts, None)
    y, dropped = dispatch(x, idx, gates, experts, busiest)
    assert dropped.item() == 0.0 and torch.equal(y, y_ref)
    _, dropped = dispatch(x, idx, gates, experts, busiest - 1)
    assert dropped.item() > 0.0  # one slot fewer and the busiest expert overflows


def test_queue_positions_put_first_choices_before_second_choices():
    assert torch.equal(queue_position(HAND, 3), HAND_QUEUE_POSITION)


def brute_force_keep(expert_indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """The rule written as a plain loop: walk the choices j = 0, 1, ..., tokens in order within each."""
    keep = torch.zeros_like(expert_indices, dtype=torch.bool)
    filled = [0] * num_experts
    for j in range(expert_indices.shape[1]):
        for n in range(expert_indices.shape[0]):
            e = int(expert_indices[n, j])
            keep[n, j] = filled[e] < capacity
            filled[e] += 1
    return keep


@pytest.mark.parametrize("k", [1, 2, 3])
def test_keep_mask_equals_the_rule_written_as_a_loop(k):
    g = torch.Generator().manual_seed(k)
    idx = (torch.randn(50, 6, generator=g) + torch.linspace(0, 2, 6)).topk(k, dim=-1).indices
    for capacity in (1, 5, 12, 30):
        assert torch.equal(capacity_keep_mask(idx, 6, capacity), brute_force_keep(idx, 6, capacity))


def test_first_choices_are_dropped_far_less_often_than_second_choices():
    """The review's simulation: N=2048, E=8, top-2, cf=1, experts skewed by a logit offset.

    Token order (the old rule) dropped 592 first choices among 1038 drops here; GShard's order drops
    119, and only at experts whose first choices alone overflow them."""
    n, num_experts, k = 2048, 8, 2
    torch.manual_seed(0)
    idx = (torch.randn(n, num_experts) + torch.linspace(0, 1.5, num_experts)).topk(k, dim=-1).indices
    capacity = expert_capacity(n, k, num_experts, 1.0)
    dropped = ~capacity_keep_mask(idx, num_experts, capacity)
    first, second = int(dropped[:, 0].sum()), int(dropped[:, 1].sum())
    assert first + second > n // 4  # the skew really overflows experts: a quarter of the slots or more
    assert first < 0.2 * (first + second)  # token order: over half of the drops were first choices
    # exactly: an expert drops a first choice only if more than C tokens chose it first, then drops
    # all its second choices and just the first choices beyond C
    first_load = torch.bincount(idx[:, 0], minlength=num_experts)
    for e in range(num_experts):
        at_e = idx == e
        assert int((dropped & at_e)[:, 0].sum()) == max(0, int(first_load[e]) - capacity)
        if first_load[e] >= capacity:
            assert not (~dropped & at_e)[:, 1].any()


@pytest.mark.parametrize("dispatch", DISPATCH)
@pytest.mark.parametrize(
    "cf, capacity, dropped_slots",
    [
        (1.0, 4, [(3, 1)]),  # e0 holds 5 slots and keeps 4: token 3's SECOND choice goes, token 5's first stays
        (0.5, 2, [(2, 0), (5, 0), (3, 1), (2, 1), (4, 1), (5, 1)]),  # e0 drops 3, e1 drops 2, e2 drops 1
        (1.25, 5, []),
    ],
)
def test_dropped_slots_match_the_hand_computed_case(dispatch, cf, capacity, dropped_slots):
    assert expert_capacity(6, 2, 3, cf) == capacity
    keep = capacity_keep_mask(HAND, 3, capacity)
    expected = torch.ones(6, 2, dtype=torch.bool)
    for n, j in dropped_slots:
        expected[n, j] = False
    assert torch.equal(keep, expected)

    experts, x, gates = layer_inputs()
    y, dropped = dispatch(x, HAND, gates, experts, capacity)
    assert dropped.item() == pytest.approx(len(dropped_slots) / 12)
    # a dropped slot contributes nothing: the output is the uncapped one with those gates zeroed
    y_masked, _ = dispatch(x, HAND, gates * keep, experts, None)
    torch.testing.assert_close(y, y_masked, rtol=1e-6, atol=1e-6)


def test_dropped_fraction_reaches_the_model_and_the_accumulator():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=32, max_seq_len=16, num_experts=4, top_k=2,
                      capacity_factor=0.5, capacity_factor_eval=0.5)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    acc = RoutingAccumulator()
    per_batch = []
    for seed, rows in ((0, 2), (1, 4)):
        x = torch.randint(0, 50, (rows, 16), generator=torch.Generator().manual_seed(seed))
        routing = model(x).routing
        per_batch.append([float(r.dropped_fraction) for r in routing])
        acc.add(routing)
    # cf = 0.5 keeps at most half of the slots, so at least half are dropped in every layer
    assert all(d >= 0.5 for batch in per_batch for d in batch)
    # pooled by slots: batch 2 routes twice as many tokens as batch 1
    for layer, pooled in enumerate(acc.dropped_per_layer()):
        assert pooled == pytest.approx((2 * per_batch[0][layer] + 4 * per_batch[1][layer]) / 6)



@pytest.mark.parametrize("train_cf, eval_cf", [(0.5, None), (None, 0.5), (0.5, 2.0)])
def test_eval_mode_uses_the_evaluation_capacity_factor(train_cf, eval_cf):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=32, max_seq_len=16, num_experts=4, top_k=2,
                      capacity_factor=train_cf, capacity_factor_eval=eval_cf)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    for mode, cf in (("train", train_cf), ("eval", eval_cf)):
        getattr(model, mode)()
        dropped = [float(r.dropped_fraction) for r in model(x).routing]
        # cf = 0.5 keeps at most half the slots; dropless drops none, nor does cf = 2.0 (here C = N, and
        # an expert gets at most one slot per token)
        assert all(d >= 0.5 for d in dropped) if cf == 0.5 else all(d == 0.0 for d in dropped), (mode, dropped)


def test_evaluation_is_dropless_by_default():
    assert ModelConfig().capacity_factor_eval is None
    assert ModelConfig(capacity_factor=1.0).capacity_factor_eval is None


def test_train_run_records_training_drops_and_both_usage_cvs():
    smoke = get_profile("smoke")
    m = train_run(smoke.base.with_model(capacity_factor=0.5), data=load_data(smoke.base.data), profile="smoke").metrics
    layers = range(smoke.base.model.n_layers)
    assert m["train_dropped_fraction"] >= 0.5 and all(m[f"train_dropped_L{i}"] >= 0.5 for i in layers)
    assert m["val_dropped_fraction"] == 0.0  # evaluation is dropless by default
    # every layer routes the same N k slots, so std(sum of counts) <= sum of stds: pooled CV <= mean per-layer CV
    assert 0.0 <= m["expert_usage_cv_pooled"] <= m["expert_usage_cv"] + 1e-9


# --------------------------------------------------------------------------- the study's tests, reconciliation and findings
SMOKE = get_profile("smoke")
TINY = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=1, d_ff=32, max_seq_len=16, num_experts=4, top_k=2)


def tiny_batches(count: int = 3, rows: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 50, (rows, 16), generator=g), torch.zeros(rows, 16, dtype=torch.long)) for _ in range(count)]


def hand_study(seeds=(42, 43, 44), ppl_gap: float = 2.0) -> StudyResult:
    """lb 0.01 drops far less than lb 0 at every cf; test PPL +ppl_gap off dropless, seeds pull lb 0.01 and 0 apart.

    Each run's logged drops are its late value + 0.2 in the first half of its 100 steps; its results row stores
    late + 0.1 (the mean over every step), as training does."""
    grid = build_grid("capacity", SMOKE, seeds=seeds)
    rows, history = [], []
    for run in grid.runs:
        cf, lb = run.config.model.capacity_factor, run.config.model.load_balancing_weight
        late = 0.0 if cf is None else (0.05 if lb else 0.3) / cf + 0.01 * (run.seed - 43)
        early = 0.0 if cf is None else 0.2
        ppl = 100 + (0 if cf is None else ppl_gap) + 0.5 * (run.seed - 43) * (1 if lb else -1)
        rows.append({"run_id": run.run_id, "condition": run.condition, **run.factors, "seed": run.seed,
                     "train_dropped_fraction": late + early / 2, "test_perplexity": ppl, "val_perplexity": ppl - 3,
                     "ms_per_step": 200.0, "train_dropped_L0": late + early / 2, "train_dropped_L1": late + early / 2})
        for step in range(10, 101, 10):
            drop = late + (early if step <= 50 else 0.0)
            history.append({"run_id": run.run_id, "condition": run.condition, "seed": run.seed, "step": step,
                            "dropped_L0": drop - 0.01, "dropped_L1": drop + 0.01})
    return StudyResult(grid, SMOKE, pd.DataFrame(rows), pd.DataFrame(history), None)


def test_the_dropless_twin_is_this_studys_dropless_lb_001_configuration():
    """The post hoc fraction opens the specialization study's learned top-2 checkpoints as this study's dropless model."""
    for profile in (SMOKE, get_profile("cpu")):
        twin = {r.seed: r.config_hash for r in build_grid("specialization", profile).runs if r.condition == study_module.DROPLESS_TWIN}
        ours = {r.seed: r.config_hash for r in build_grid("capacity", profile).runs if r.condition == "cf=dropless, lb=0.01"}
        assert twin == ours and twin


@pytest.mark.parametrize("cf", [0.5, 0.75, 1.0, 1.25])
def test_posthoc_fraction_equals_the_drops_of_the_same_layer_run_with_that_capacity(cf):
    """One MoE layer: its routing comes before its dispatch, so applying the capacity post hoc must drop exactly what
    the layer itself drops when it evaluates with that capacity factor."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**TINY)).train()
    capped = MoETransformer(ModelConfig(**TINY, capacity_factor_eval=cf)).eval()
    capped.load_state_dict(model.state_dict())
    batches = tiny_batches()
    measured = sum(float(capped(x).routing[0].dropped_fraction) for x, _ in batches) / len(batches)  # equal-size batches
    assert study_module.posthoc_dropped_fraction(model, batches, cf) == pytest.approx(measured, abs=1e-6)
    assert model.training  # the mode it came in
    if cf < 1:
        assert study_module.posthoc_dropped_fraction(model, batches, cf) >= 1 - cf - 1e-9  # the floor
    assert study_module.posthoc_dropped_fraction(model, batches, TINY["num_experts"] / TINY["top_k"]) == 0.0  # C >= N


def test_posthoc_fraction_pools_every_layer_of_a_deeper_model():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**{**TINY, "n_layers": 3})).eval()
    batches = tiny_batches(2)
    kept = routed = 0
    for x, _ in batches:
        for r in model(x).routing:
            keep = brute_force_keep(r.expert_indices, 4, expert_capacity(r.expert_indices.shape[0], 2, 4, 1.0))
            kept, routed = kept + int(keep.sum()), routed + keep.numel()
    assert study_module.posthoc_dropped_fraction(model, batches, 1.0) == pytest.approx(1 - kept / routed)


def test_posthoc_fraction_rejects_bad_input_by_name():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**TINY))
    for bad in (None, 0, -1.0, True):
        with pytest.raises(ValueError, match=f"capacity_factor={bad!r} is invalid"):
            study_module.posthoc_dropped_fraction(model, tiny_batches(), bad)
    with pytest.raises(ValueError, match="capacity_factor_eval=1.0.*capacity_factor_eval=None"):
        study_module.posthoc_dropped_fraction(MoETransformer(ModelConfig(**TINY, capacity_factor_eval=1.0)), tiny_batches(), 1.0)
    with pytest.raises(ValueError, match="batches is empty"):
        study_module.posthoc_dropped_fraction(model, [], 1.0)


def test_reconciliation_puts_all_steps_second_half_and_post_hoc_side_by_side(tmp_path, monkeypatch):
    study = hand_study()
    late = study_module.second_half_dropped(study.histories)
    one = study.results[study.results.condition == "cf=1.0, lb=0.01"]
    assert late[one.run_id].tolist() == pytest.approx([0.04, 0.05, 0.06])  # the early +0.2 is gone, layers averaged
    posthoc = pd.DataFrame({"seed": [42, 43, 42], "capacity_factor": [1.0, 1.0, 1.25], "posthoc_dropped_fraction": [0.02, 0.04, 0.01]})
    table = study_module.drop_reconciliation(study, posthoc).set_index("capacity_factor")
    assert table.loc[1.0, "train_all_steps"] == pytest.approx(0.15)  # the results row: every step
    assert table.loc[1.0, "train_second_half"] == pytest.approx(0.05)
    assert table.loc[1.0, "posthoc_dropless"] == pytest.approx(0.03) and table.loc[1.0, "n_posthoc"] == 2
    assert table.loc[1.25, "train_second_half"] == pytest.approx(0.04) and table.loc[1.25, "n_seeds"] == 3
    assert study_module.drop_reconciliation(study).posthoc_dropless.isna().all()
    monkeypatch.setattr(study_module, "reconciliation_path", lambda profile: tmp_path / "capacity" / study_module.RECONCILIATION_FILE)
    assert study_module.stored_reconciliation(SMOKE) is None
    study_module.save_reconciliation(table.reset_index(), SMOKE)
    pd.testing.assert_frame_equal(study_module.stored_reconciliation(SMOKE), table.reset_index(), check_dtype=False)
    assert [p.name for p in (tmp_path / "capacity").iterdir()] == [study_module.RECONCILIATION_FILE]  # no temp file left


def test_verdict_family_holds_every_test_the_verdicts_make():
    study = hand_study()
    family = dict(study_module.verdict_family(study))
    assert len(family) == 12
    assert set(family) >= {
        "lb 0.01 vs 0 at cf 1.0, dropped fraction", "lb 0.01 vs 0 at cf 1.25, dropped fraction",
        "lb 0.01 vs 0 at cf dropless, test PPL", "cf 1.25 vs dropless at lb 0, test PPL",
        "ANOVA on log test PPL: capacity factor x load_balancing_weight",
    }
    r = study.results[study.results.capacity_factor == 1.0].assign(condition=lambda d: d.load_balancing_weight.astype(str))
    p = paired_comparison(r, baseline="0.0", metric="test_perplexity").p_value.iloc[0]
    assert family["lb 0.01 vs 0 at cf 1.0, test PPL"] == pytest.approx(p)
    # one seed: no t-test and no ANOVA, so every p is NaN and Holm counts none of them
    one = study_module.verdict_family(hand_study((42,)))
    assert len(one) == 9 and all(math.isnan(p) for _, p in one)


def test_findings_say_what_load_balancing_and_capacity_did_in_at_most_six_sentences():
    cpu = hand_study()
    lines = study_module.findings(cpu)
    assert len(lines) == 6
    assert "by -25.0 points (95% CI [" in lines[0] and "the CI excludes 0) at cf 1.0" in lines[0]
    assert lines[1].startswith("It changed test perplexity by") and lines[1].count("inconclusive at n = 3") == 3
    assert "cf 1.0 at lb 0.01 by +2.0%" in lines[2]
    family = study_module.verdict_family(cpu)
    kept = sum(q < 0.05 for q in holm_adjusted([p for _, p in family]))
    assert lines[3].startswith(f"Of the 12 tests in this notebook's verdicts, {kept} ")
    assert "15.0% of slots averaged over all steps and 5.0% over the second half" in lines[4] and "not stored" in lines[4]
    assert lines[5].startswith("The gpu runs of this study are missing")
    table = study_module.drop_reconciliation(cpu, pd.DataFrame({"seed": [42], "capacity_factor": [1.0], "posthoc_dropped_fraction": [0.03]}))
    assert "would drop 3.0%" in study_module.findings(cpu, reconciliation=table)[4]
    with_gpu = study_module.findings(cpu, hand_study(ppl_gap=20.0))
    assert len(with_gpu) == 6 and with_gpu[5].startswith("At the smoke profile (18 runs)") and "survive Holm's correction" in with_gpu[5]
    assert not any("gpu runs of this study are missing" in line for line in with_gpu)
    one_seed = study_module.findings(hand_study((42,)))
    assert "too few seeds for an interval" in one_seed[0] and one_seed[3].startswith("With one seed none of the 9 tests")


def test_table_and_figure_use_the_verdict_metric():
    study = hand_study()
    table = study_module.capacity_table(study)
    assert {"val PPL", "test PPL", "vs dropless"} <= set(table.columns)
    assert table.loc[("1.0", 0.01), "vs dropless"] == "+2.0%"  # on test PPL
    fig = plots.plot_capacity_sweep(study.results, "test_perplexity")
    assert fig.axes[1].get_ylabel() == "test perplexity"
    plots.plt.close(fig)
