"""The model, routers, losses and metrics. Each test guards a bug of the original code or a
property the course teaches (the numbers refer to the foundation issue's list)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lib.config import ModelConfig
from moe_lib.moe.experts import Experts, dispatch_grouped, dispatch_loop
from moe_lib.moe.losses import load_balancing_loss, router_z_loss
from moe_lib.metrics import RoutingAccumulator, coefficient_of_variation, layer_routing_stats, pooled_usage_cv, routing_entropy
from moe_lib.moe.model import MoETransformer, count_parameters
from moe_lib.moe.routing import RandomRouter, RoutingResult, TopKRouter

VOCAB = 97


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=32, max_seq_len=16, num_experts=4, top_k=2)
    base.update(changes)
    return ModelConfig(**base)


def batch(seed=0, b=3, t=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (b, t), generator=g)
    return x, torch.roll(x, -1, dims=1)


# 1 -----------------------------------------------------------------------------------
def router_grad_norm(gate: str) -> float:
    cfg = tiny(top_k=1, gate=gate, load_balancing_weight=0.0, z_loss_weight=0.0)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    x, y = batch()
    model(x, y).loss.backward()
    grads = [block.ffn.router.weight.grad for block in model.blocks]
    return sum(0.0 if g is None else g.norm().item() for g in grads)


def test_top1_router_learns_from_lm_loss_alone():
    """Switch gate: g = p_top (softmax over ALL experts), so dL/dlogits != 0."""
    assert router_grad_norm("softmax") > 1e-4
    assert router_grad_norm("auto") == router_grad_norm("softmax")  # auto means softmax at k=1


def test_renormalized_top1_gate_starves_the_router():
    """The naive gate p_top / p_top is 1.0: only float round-off reaches the router."""
    assert router_grad_norm("renormalized") < 1e-6 * router_grad_norm("softmax")


# 2 -----------------------------------------------------------------------------------
def test_load_balancing_weight_is_applied():
    x, y = batch()
    losses = {}
    for w in (0.0, 0.01):
        torch.manual_seed(0)
        out = MoETransformer(tiny(load_balancing_weight=w)).eval()(x, y)
        losses[w] = out
    assert losses[0.0].loss.item() == pytest.approx(losses[0.0].lm_loss.item(), abs=0)
    expected = losses[0.01].lm_loss + 0.01 * losses[0.01].load_balancing_loss
    assert losses[0.01].loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses[0.01].loss.item() != losses[0.0].loss.item()


def test_auxiliary_terms_are_weighted_sums_over_layers():
    """Switch / ST-MoE / the original noise study: w * L for EACH layer, summed (not w * mean)."""
    x, y = batch()
    torch.manual_seed(0)
    out = MoETransformer(tiny(n_layers=3, load_balancing_weight=0.01, z_loss_weight=0.001)).eval()(x, y)
    per_layer_lb = [r.load_balancing_loss.item() for r in out.routing]
    per_layer_z = [r.z_loss.item() for r in out.routing]
    assert len(per_layer_lb) == 3
    assert out.load_balancing_loss.item() == pytest.approx(sum(per_layer_lb), rel=1e-6)
    assert out.z_loss.item() == pytest.approx(sum(per_layer_z), rel=1e-6)
    by_hand = out.lm_loss.item() + sum(0.01 * v for v in per_layer_lb) + sum(0.001 * v for v in per_layer_z)
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_z_loss_weight_is_applied():
    x, y = batch()
    torch.manual_seed(0)
    out = MoETransformer(tiny(load_balancing_weight=0.0, z_loss_weight=0.1)).eval()(x, y)
    assert out.loss.item() == pytest.approx((out.lm_loss + 0.1 * out.z_loss).item(), rel=1e-6)
    assert out.z_loss.item() > 0


# 3 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_random_router_picks_distinct_experts_with_uniform_entropy(k):
    router = RandomRouter(num_experts=8, top_k=k)
    r = router(torch.randn(2000, 16))
    sorted_idx = r.expert_indices.sort(dim=-1).values
    assert (sorted_idx[:, 1:] != sorted_idx[:, :-1]).all()
    assert torch.allclose(r.gate_weights, torch.full_like(r.gate_weights, 1 / k))
    assert routing_entropy(r.probs).item() == pytest.approx(math.log(8), rel=1e-6)
    assert layer_routing_stats(r).normalized_entropy == pytest.approx(1.0, rel=1e-6)
    assert sum(p.numel() for p in router.parameters()) == 0
    # every expert is used: a real uniform sampler, not a fixed pattern
    assert torch.bincount(r.expert_indices.flatten(), minlength=8).min() > 0


def test_router_runs_in_fp32_under_bf16_autocast():
    """ST-MoE: routing in bf16 is unstable. Autocast would cast F.linear's inputs to bf16 (issue 11)."""
    torch.manual_seed(0)
    router = TopKRouter(d_model=16, num_experts=8, top_k=2, noise_std=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(torch.randn(64, 16).bfloat16())
    for name in ("logits", "probs", "gate_weights", "load_balancing_loss", "z_loss"):
        assert getattr(r, name).dtype == torch.float32, name


def test_model_trains_in_bf16_autocast_with_an_fp32_router_and_finite_gradients():
    x, y = batch()
    torch.manual_seed(0)
    model = MoETransformer(tiny(noise_std=0.1, z_loss_weight=0.001))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert out.logits.dtype == torch.bfloat16  # autocast is really on
    for r in out.routing:
        assert {r.logits.dtype, r.probs.dtype, r.gate_weights.dtype, r.load_balancing_loss.dtype, r.z_loss.dtype} == {torch.float32}
    assert out.load_balancing_loss.dtype == out.z_loss.dtype == torch.float32
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# 4 -----------------------------------------------------------------------------------
def test_router_noise_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(d_model=16, num_experts=8, top_k=2, noise_std=1.0)
    x = torch.randn(64, 16)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.expert_indices, b.expert_indices) and torch.equal(a.probs, b.probs)
    router.train()
    c, d = router(x), router(x)
    assert not torch.equal(c.probs, d.probs)
    assert torch.equal(c.logits, a.logits)  # noise is on the routing decision, not the clean logits


def test_model_in_eval_mode_routes_without_noise():
    """Eval: exactly the logits of the same weights with noise_std=0. Train: noisy routing changes them."""
    torch.manual_seed(0)
    noisy = MoETransformer(tiny(noise_std=0.5))
    clean = MoETransformer(tiny(noise_std=0.0))
    clean.load_state_dict(noisy.state_dict())
    x, _ = batch()
    assert torch.equal(noisy.eval()(x).logits, clean.eval()(x).logits)
    assert not torch.equal(noisy.train()(x).logits, clean.train()(x).logits)


# 5 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("capacity", [None, 3])
def test_grouped_dispatch_matches_reference_loop(k, capacity):
    torch.manual_seed(k)
    num_experts, n, d = 6, 40, 16
    experts = Experts(num_experts, d, 24)
    x = torch.randn(n, d, requires_grad=True)
    # experts 4 and 5 get no tokens at all
    scores = torch.randn(n, num_experts)
    scores[:, 4:] = -1e9
    idx = scores.topk(k, dim=-1).indices
    gates = torch.rand(n, k, requires_grad=True)
    upstream = torch.randn(n, d)

    results = []
    for fn in (dispatch_loop, dispatch_grouped):
        y, dropped = fn(x, idx, gates, experts, capacity)
        grads = torch.autograd.grad((y * upstream).sum(), [x, gates, experts.w_in, experts.w_out])
        results.append((y, dropped, grads))
    (y_ref, drop_ref, g_ref), (y_fast, drop_fast, g_fast) = results
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    assert drop_fast.item() == pytest.approx(drop_ref.item())
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert g_fast[2][4:].abs().sum() == 0  # empty experts get zero gradient, and no crash


def test_dispatch_paths_agree_inside_the_model():
    x, y = batch()
    outs = []
    for dispatch in ("loop", "grouped"):
        torch.manual_seed(0)
        outs.append(MoETransformer(tiny(dispatch=dispatch)).eval()(x, y).loss.item())
    assert outs[0] == pytest.approx(outs[1], rel=1e-5)


# 6 -----------------------------------------------------------------------------------
def test_load_balancing_loss_is_one_when_uniform_and_grows_with_collapse():
    num_experts, n = 4, 400
    uniform_probs = torch.full((n, num_experts), 1 / num_experts)
    round_robin = torch.arange(n).remainder(num_experts).unsqueeze(-1)
    assert load_balancing_loss(uniform_probs, round_robin).item() == pytest.approx(1.0)

    values = []
    for skew in (0.0, 1.0, 3.0, 10.0):
        logits = torch.zeros(n, num_experts)
        logits[:, 0] = skew
        probs = logits.softmax(-1)
        values.append(load_balancing_loss(probs, probs.topk(1, -1).indices).item())
    assert values == sorted(values) and values[-1] == pytest.approx(num_experts, rel=1e-3)


# 7 -----------------------------------------------------------------------------------
def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 5.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2), math.log(math.exp(-3) + math.exp(5))]
    expected = sum(v * v for v in lse) / 3
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # penalises large logits even when their spread (and hence the softmax) is unchanged
    assert router_z_loss(logits + 10).item() > router_z_loss(logits).item()


# 8 -----------------------------------------------------------------------------------
def test_same_seed_same_outputs_different_seed_different():
    x, y = batch()

    def run(seed):
        torch.manual_seed(seed)
        model = MoETransformer(tiny(noise_std=0.1)).train()
        return model(x, y).logits

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# 9 -----------------------------------------------------------------------------------
def test_parameter_counts_match_hand_arithmetic():
    d, h, v, layers, experts, k = 32, 32, VOCAB, 2, 4, 2
    model = MoETransformer(tiny())
    attention = 3 * d * d + d * d
    norms = 2 * d
    router = experts * d
    per_expert = 3 * d * h  # gate, up, down
    per_layer_total = attention + norms + router + experts * per_expert
    total = v * d + layers * per_layer_total + d  # tied embedding/head + final norm
    counts = count_parameters(model)
    assert counts.total == total
    assert counts.active == total - layers * (experts - k) * per_expert
    assert counts.router == layers * router

    dense = count_parameters(MoETransformer(tiny(ffn="dense")))
    assert dense.total == dense.active == v * d + layers * (attention + norms + 3 * d * k * h) + d
    # same active compute: the dense baseline equals the MoE's active count minus its routers
    assert dense.active == counts.active - counts.router

    untied = count_parameters(MoETransformer(tiny(tie_weights=False)))
    assert untied.total == total + v * d


# 10 ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, field",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5, "num_experts": 4}, "top_k"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"load_balancing_weight": -1.0}, "load_balancing_weight"),
        ({"z_loss_weight": -0.001}, "z_loss_weight"),
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"d_model": 0}, "d_model"),
        ({"n_layers": -2}, "n_layers"),
        ({"num_experts": 0}, "num_experts"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"router": "hash"}, "router"),
        ({"gate": "sigmoid"}, "gate"),
        ({"ffn": "sparse"}, "ffn"),
        ({"dispatch": "magic"}, "dispatch"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor_eval": -1.0}, "capacity_factor_eval"),
        ({"capacity_factor_eval": True}, "capacity_factor_eval"),
    ],
)
def test_invalid_model_config_names_field_value_and_choices(changes, field):
    with pytest.raises(ValueError) as err:
        tiny(**changes)
    message = str(err.value)
    assert f"ModelConfig.{field}=" in message
    assert repr(changes[field]) in message
    assert "expected" in message


def test_invalid_router_error_lists_valid_choices():
    with pytest.raises(ValueError, match=r"\['topk', 'random', 'expert_choice'\]"):
        tiny(router="hash")


def test_padded_grouped_matmul_equals_per_segment_matmuls_in_bf16():
    from moe_lib.moe.experts import grouped_matmul

    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 130, 1, 64])  # an empty segment and one longer than a pad block
    a = torch.randn(int(counts.sum()), 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 16, 24, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(a.shape[0], 24, dtype=torch.bfloat16)
    out = grouped_matmul(a, w, counts, torch.cumsum(counts, 0).to(torch.int32))
    grads = torch.autograd.grad((out * upstream).float().sum(), [a, w])
    pieces = torch.split(a, counts.tolist())
    ref = torch.cat([p @ w[e] for e, p in enumerate(pieces)])
    ref_grads = torch.autograd.grad((ref * upstream).float().sum(), [a, w])
    torch.testing.assert_close(out, ref)  # bf16 tolerances
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert grads[1][1].abs().sum() == 0  # the empty segment's expert gets no gradient


@pytest.fixture
def grouped_mm_spy(monkeypatch):
    """Counts ``torch._grouped_mm`` calls; the cached availability probe starts afresh and is reset after."""
    from moe_lib.moe import experts

    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *args, **kwargs: calls.append(args[0].shape) or real(*args, **kwargs))
    experts._grouped_mm_runs.cache_clear()
    yield calls
    experts._grouped_mm_runs.cache_clear()


def segment_inputs(d: int, m: int, dtype=torch.float32):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    a = torch.randn(int(counts.sum()), d, dtype=dtype, requires_grad=True)
    w = torch.randn(4, d, m, dtype=dtype, requires_grad=True)
    return a, w, counts, torch.cumsum(counts, 0).to(torch.int32)


def assert_matches_per_segment_matmuls(out, a, w, counts):
    upstream = torch.randn(out.shape)
    ref = torch.cat([p @ w[e] for e, p in enumerate(torch.split(a, counts.tolist()))])
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad((out * upstream).sum(), [a, w]), torch.autograd.grad((ref * upstream).sum(), [a, w])):
        torch.testing.assert_close(g, r)


def test_grouped_matmul_uses_the_kernel_only_for_16_byte_aligned_rows(grouped_mm_spy):
    from moe_lib.moe.experts import grouped_matmul

    a, w, counts, offsets = segment_inputs(d=16, m=8)  # fp32 rows of 64 and 32 bytes: aligned
    assert_matches_per_segment_matmuls(grouped_matmul(a, w, counts, offsets), a, w, counts)
    assert grouped_mm_spy == [(4, 16), a.shape]  # the one-off probe, then the real call
    grouped_mm_spy.clear()
    a, w, counts, offsets = segment_inputs(d=6, m=5)  # rows of 24 and 20 bytes: the kernel would raise
    assert_matches_per_segment_matmuls(grouped_matmul(a, w, counts, offsets), a, w, counts)
    assert grouped_mm_spy == []  # the per-segment loop did it


def test_grouped_matmul_falls_back_where_the_kernel_is_missing(monkeypatch, grouped_mm_spy):
    """torch 2.8 has ``torch._grouped_mm`` but no CPU kernel: the attribute must not be trusted."""
    from moe_lib.moe.experts import grouped_matmul

    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'CPU' backend")

    monkeypatch.setattr(torch, "_grouped_mm", missing)
    a, w, counts, offsets = segment_inputs(d=16, m=8)
    assert_matches_per_segment_matmuls(grouped_matmul(a, w, counts, offsets), a, w, counts)


def test_pooled_usage_cv_is_the_originals_definition_by_hand():
    """Original noise study: expert i's counts summed over layers into one vector, then CV.
    Opposite imbalances in two layers cancel there; our per-layer CV sees both."""
    layer0, layer1 = torch.tensor([3, 1]), torch.tensor([1, 3])  # [E = 2] counts per layer
    # per layer: mean 2, population std 1 -> CV 0.5; pooled: [4, 4] -> CV 0
    assert coefficient_of_variation(layer0).item() == pytest.approx(0.5)
    assert pooled_usage_cv([layer0, layer1]).item() == 0.0
    # [6, 2] + [0, 4] = [6, 6] -> 0; [5, 1] + [1, 1] = [6, 2]: mean 4, std 2 -> 0.5
    assert pooled_usage_cv([torch.tensor([5, 1]), torch.tensor([1, 1])]).item() == pytest.approx(0.5)

    def top1(experts: list[int]) -> RoutingResult:
        idx, zero = torch.tensor(experts).unsqueeze(-1), torch.zeros(())
        return RoutingResult(None, torch.full((len(experts), 2), 0.5), idx, torch.ones(len(experts), 1), zero, zero)

    acc = RoutingAccumulator()
    acc.add([top1([0, 0, 0, 1]), top1([1, 1, 1, 0])])  # counts [3, 1] and [1, 3]
    assert acc.cv_per_layer() == pytest.approx([0.5, 0.5])
    assert acc.cv_pooled_over_layers() == 0.0
