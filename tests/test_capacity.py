"""Capacity factor and token dropping (GShard/Switch): ``C = ceil(cf * N * k / E)`` slots per expert.

The hand-computed case is the one notebook 06 walks through: 6 tokens, top-2, 3 experts.
Queue order (GShard / ST-MoE): all first choices in token order, then all second choices.
"""

from __future__ import annotations

import pytest
import torch

from moe_lib.config import ModelConfig
from moe_lib.moe.experts import Experts, capacity_keep_mask, dispatch_grouped, dispatch_loop, expert_capacity, queue_position
from moe_lib.metrics import RoutingAccumulator
from moe_lib.moe.model import MoETransformer
from moe_lib.profiles import get_profile
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
