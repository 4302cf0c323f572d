"""Modern MoE options (issue 14): shared and fine-grained experts, sigmoid scoring,
auxiliary-loss-free balancing, expert-choice routing, MaxVio and router saturation."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_lib.training.checkpoint import load_checkpoint, save_checkpoint
from moe_lib.config import ModelConfig, RunConfig, fine_grained
from moe_lib.studies.modern import earlier_output_change
from moe_lib.runs import HASH_IGNORED, HASH_OMITTED_DEFAULTS, RESULTS_VERSION, config_hash
from moe_lib.moe.experts import Experts, swiglu
from moe_lib.moe.losses import load_balancing_loss
from moe_lib.metrics import RoutingAccumulator, max_violation, router_saturation, topk_overlap
from moe_lib.moe.model import MoEFeedForward, MoETransformer, count_parameters, flops_per_token
from moe_lib.moe.routing import ExpertChoiceRouter, TopKRouter, update_expert_biases
from moe_lib.training.optim import build_optimizer

VOCAB = 97
ROOT = Path(__file__).resolve().parents[1]


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=32, max_seq_len=16, num_experts=4, top_k=2)
    base.update(changes)
    return ModelConfig(**base)


def tokens(seed=0, b=2, t=16):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(num_shared_experts=1.5), "num_shared_experts"),
        (dict(score_func="tanh"), "score_func"),
        (dict(bias_update_rate=-1e-3), "bias_update_rate"),
        (dict(bias_update_rate=1e-3, router="random"), "bias_update_rate"),
        (dict(bias_update_rate=1e-3, router="expert_choice"), "bias_update_rate"),
        (dict(router="expert_choice", top_k=2, capacity_factor=3.0), "top_k"),
        (dict(router="expert_choice", gate="renormalized"), "gate"),
        (dict(ffn="dense", num_shared_experts=1), "num_shared_experts"),
        (dict(ffn="dense", bias_update_rate=1e-3), "bias_update_rate"),
    ],
)
def test_invalid_modern_options_name_field_value_and_choices(changes, field):
    with pytest.raises(ValueError) as err:
        tiny(**changes)
    message = str(err.value)
    assert f"ModelConfig.{field}={changes[field]!r}" in message and "expected" in message


def test_score_func_error_lists_valid_choices():
    with pytest.raises(ValueError, match=r"\['softmax', 'sigmoid'\]"):
        tiny(score_func="tanh")


def test_new_options_at_their_defaults_leave_the_hash_alone():
    """Options added later, at their defaults, hash like a config that never had them."""
    base = RunConfig()
    data = base.to_dict()
    for name in HASH_OMITTED_DEFAULTS["model"]:
        data["model"].pop(name)
    data["results_version"] = RESULTS_VERSION
    for section, names in HASH_IGNORED.items():
        for name in names:
            data[section].pop(name, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    assert config_hash(base) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    for changes in (dict(num_shared_experts=1), dict(score_func="sigmoid"), dict(bias_update_rate=1e-3)):
        assert config_hash(base.with_model(**changes)) != config_hash(base)


# --------------------------------------------------------------------------- shared experts
def test_shared_expert_parameter_counts_by_hand():
    d, d_ff, E, k, L, V, s = 32, 32, 4, 2, 2, VOCAB, 2
    counts = count_parameters(MoETransformer(tiny(num_shared_experts=s)))
    per_layer = 2 * d + 4 * d * d + E * d + E * 3 * d * d_ff + 3 * d * s * d_ff  # norms, attn, router, experts, shared
    total = V * d + L * per_layer + d  # tied embedding, blocks, final norm
    assert counts.total == total
    assert counts.shared_experts == L * 3 * d * s * d_ff
    assert counts.active == total - L * (E - k) * 3 * d * d_ff  # shared experts are all active
    plain = count_parameters(MoETransformer(tiny()))
    assert counts.active - plain.active == counts.total - plain.total == counts.shared_experts


def test_shared_experts_add_s_dense_swiglus_to_the_routed_output():
    torch.manual_seed(0)
    cfg = tiny(num_shared_experts=2)
    ffn = MoEFeedForward(cfg)
    x = torch.randn(10, cfg.d_model)
    y, _ = ffn(x)
    shared = ffn.shared_experts
    ffn.shared_experts = None
    routed, _ = ffn(x)
    # One SwiGLU of width s*d_ff is s experts of width d_ff side by side: split the weights and sum.
    gate_w, up_w = shared.w_in.weight.chunk(2, dim=0)  # [s d_ff, d] each
    by_hand = sum(
        swiglu(x @ torch.cat([gate_w[i * 32 : (i + 1) * 32], up_w[i * 32 : (i + 1) * 32]]).T) @ shared.w_out.weight[:, i * 32 : (i + 1) * 32].T
        for i in range(2)
    )
    torch.testing.assert_close(y - routed, by_hand, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- fine-grained experts
def test_fine_grained_keeps_active_expert_params_and_flops_by_hand():
    d, d_ff, E, k, L, V, T, m = 32, 32, 4, 2, 2, VOCAB, 16, 4
    coarse = tiny(num_shared_experts=1)
    fine = fine_grained(coarse, m)
    assert (fine.num_experts, fine.d_ff, fine.top_k, fine.num_shared_experts) == (E * m, d_ff // m, k * m, m)
    a, b = count_parameters(MoETransformer(coarse)), count_parameters(MoETransformer(fine))
    assert a.experts == b.experts == L * E * 3 * d * d_ff
    assert a.active_experts == b.active_experts == L * k * 3 * d * d_ff
    assert a.shared_experts == b.shared_experts == L * 3 * d * d_ff
    assert b.router - a.router == L * d * E * (m - 1)  # the only growth: a wider router
    assert b.active - a.active == b.router - a.router
    # flops_per_token = 3 * (2 N_active_matmul + 2 L T d), by hand
    matmul = L * (4 * d * d + d * E + 3 * d * d_ff * (k + 1)) + d * V
    assert flops_per_token(coarse, T) == 3 * (2 * matmul + 2 * L * T * d)
    assert flops_per_token(fine, T) - flops_per_token(coarse, T) == 6 * L * d * E * (m - 1)
    dense = tiny(ffn="dense")  # width k d_ff: the MoE's routed FLOPs without router and shared expert
    assert flops_per_token(coarse, T) - flops_per_token(dense, T) == 6 * L * (d * E + 3 * d * d_ff)


def test_fine_grained_rejects_a_granularity_that_does_not_divide_d_ff():
    with pytest.raises(ValueError, match=r"fine_grained.granularity=3 .*divisor of d_ff=32"):
        fine_grained(tiny(), 3)


# --------------------------------------------------------------------------- sigmoid scoring
def test_sigmoid_gates_are_chosen_scores_normalised_over_the_chosen():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 3, score_func="sigmoid")
    x = torch.randn(20, 16)
    r = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    top, idx = scores.topk(3, dim=-1)
    assert torch.equal(r.expert_indices, idx)
    torch.testing.assert_close(r.gate_weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probs, scores / scores.sum(-1, keepdim=True))  # P: per-token normalised (DeepSeek-V3's s')
    torch.testing.assert_close(r.load_balancing_loss, load_balancing_loss(r.probs, idx))


def test_sigmoid_top1_gate_is_the_raw_score_so_the_router_learns():
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 1, renormalize=False, score_func="sigmoid")
    x = torch.randn(20, 16)
    r = router(x)
    torch.testing.assert_close(r.gate_weights, torch.sigmoid(x @ router.weight.T).max(-1, keepdim=True).values)
    r.gate_weights.sum().backward()
    assert router.weight.grad.norm() > 0


# --------------------------------------------------------------------------- auxiliary-loss-free balancing
def test_expert_bias_is_a_buffer_that_never_gets_a_gradient():
    torch.manual_seed(0)
    model = MoETransformer(tiny(bias_update_rate=1e-3, score_func="sigmoid"))
    model.blocks[0].ffn.router.expert_bias.copy_(torch.tensor([0.3, -0.1, -0.1, -0.1]))
    x = tokens()
    model(x, x).loss.backward()
    names = {n for n, _ in model.named_parameters()}
    optimized = {id(p) for opt in build_optimizer(model, RunConfig().train) for g in opt.param_groups for p in g["params"]}
    for block in model.blocks:
        bias = block.ffn.router.expert_bias
        assert not bias.requires_grad and bias.grad is None and id(bias) not in optimized
    assert not any("expert_bias" in n for n in names)
    assert "blocks.0.ffn.router.expert_bias" in model.state_dict()
    assert "blocks.0.ffn.router.tokens_per_expert" not in model.state_dict()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_bias_changes_selection_but_not_gate_values(score_func):
    torch.manual_seed(0)
    plain = TopKRouter(16, 8, 2, score_func=score_func)
    biased = TopKRouter(16, 8, 2, score_func=score_func, bias_update_rate=1e-3)
    biased.weight.data.copy_(plain.weight.data)
    biased.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))  # forces expert 7 in
    x = torch.randn(50, 16)
    a, b = plain(x), biased(x)
    assert (b.expert_indices == 7).any(-1).all() and not (a.expert_indices == 7).any(-1).all()
    torch.testing.assert_close(b.probs, a.probs)
    chosen = a.probs.gather(-1, b.expert_indices)  # the UNBIASED scores of the experts the bias chose
    if score_func == "sigmoid":
        chosen = torch.sigmoid(x @ plain.weight.T).gather(-1, b.expert_indices)
    torch.testing.assert_close(b.gate_weights, chosen / chosen.sum(-1, keepdim=True))
    same = (a.expert_indices.sort(-1).values == b.expert_indices.sort(-1).values).all(-1)
    assert same.any()
    torch.testing.assert_close(b.gate_weights[same].sort(-1).values, a.gate_weights[same].sort(-1).values)


def test_loads_accumulate_over_training_forwards_and_the_update_consumes_them():
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2, bias_update_rate=0.01)
    x1, x2 = torch.randn(30, 16), torch.randn(20, 16)
    counts = sum(torch.bincount(router(x).expert_indices.flatten(), minlength=4) for x in (x1, x2))
    assert torch.equal(router.tokens_per_expert, counts.float())  # both micro-batches of the step
    router.eval()
    router(torch.randn(40, 16))
    assert torch.equal(router.tokens_per_expert, counts.float())  # evaluation is not counted
    update_expert_biases(router)
    delta = 0.01 * torch.sign(counts.float().mean() - counts.float())
    torch.testing.assert_close(router.expert_bias, delta - delta.mean())
    assert router.expert_bias.sum().abs() < 1e-7 and torch.equal(router.tokens_per_expert, torch.zeros(4))
    before = router.expert_bias.clone()
    update_expert_biases(router)  # no forward since: nothing to update
    assert torch.equal(router.expert_bias, before)


@pytest.mark.parametrize("num_experts", [2, 8, 64])
def test_a_centred_bias_moves_at_most_2_minus_2_over_E_times_u_per_step(num_experts):
    """Notebook 08's bound: |delta b_i| = u |s_i - mean(s)| <= (2 - 2/E) u, reached by the only under-loaded expert
    among overloaded ones (not u, as an uncentred update would give)."""
    u = 1e-3
    router = TopKRouter(8, num_experts, 1, bias_update_rate=u)
    router.tokens_per_expert.copy_(torch.tensor([0.0] + [1.0] * (num_experts - 1)))
    router.update_expert_bias()
    assert router.expert_bias[0].item() == pytest.approx((2 - 2 / num_experts) * u)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # random loads, many ties: never beyond the bound
        router.expert_bias.zero_()
        router.tokens_per_expert.copy_(torch.randint(0, 4, (num_experts,), generator=generator).float() + 1)
        router.update_expert_bias()
        assert router.expert_bias.abs().max().item() <= (2 - 2 / num_experts) * u * (1 + 1e-6)  # float32 round-off


def test_data_parallel_ranks_update_the_bias_from_the_summed_load(monkeypatch):
    """Each rank counts its own tokens; the update must all-reduce them first (a fake 2-rank all_reduce here)."""
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2, bias_update_rate=0.01)
    router(torch.randn(30, 16))
    mine = router.tokens_per_expert.clone()
    other_rank = torch.tensor([0.0, 0.0, 60.0, 0.0])  # the other rank sent every slot to expert 2
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: tensor.add_(other_rank))
    update_expert_biases(router)
    total = mine + other_rank
    delta = 0.01 * torch.sign(total.mean() - total)
    torch.testing.assert_close(router.expert_bias, delta - delta.mean())
    alone = 0.01 * torch.sign(mine.mean() - mine)
    assert not torch.allclose(alone - alone.mean(), router.expert_bias)  # the summed load decides


def test_bias_updates_drive_a_skewed_router_to_balance():
    torch.manual_seed(0)
    num_experts, rate = 8, 1e-3  # DeepSeek-V3's u
    router = TopKRouter(16, num_experts, 2, score_func="sigmoid", bias_update_rate=rate)
    router.weight.data[0] += 0.5  # expert 0 wins for every token
    x = torch.randn(512, 16) + 1.0
    maxvio = []
    for _ in range(400):
        counts = torch.bincount(router(x).expert_indices.flatten(), minlength=num_experts)
        maxvio.append(max_violation(counts).item())
        update_expert_biases(router)
    assert maxvio[0] == 3.0  # expert 0 holds 512 of the 1024 slots: 4x its share
    assert max(maxvio[-50:]) < 0.2  # balanced within 350 updates, and it stays there
    assert router.expert_bias.sum().abs() < 1e-5  # kept zero-mean: no drift


def test_checkpoint_round_trips_the_expert_bias(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(bias_update_rate=1e-3)
    model = MoETransformer(cfg)
    for block in model.blocks:
        block.ffn.router.expert_bias.copy_(torch.randn(4))
    save_checkpoint(model, RunConfig(model=cfg, train=RunConfig().train.replace(seq_len=16)), {}, tmp_path)
    loaded, config, _ = load_checkpoint(tmp_path)
    assert config.model.bias_update_rate == 1e-3
    for a, b in zip(model.blocks, loaded.blocks):
        assert torch.equal(a.ffn.router.expert_bias, b.ffn.router.expert_bias)
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)


def test_training_loop_updates_the_bias_once_per_optimizer_step():
    from moe_lib.profiles import get_profile
    from moe_lib.training.loop import load_data, train_run

    smoke = get_profile("smoke")
    rate, steps = 1e-3, 3
    config = smoke.base.with_model(bias_update_rate=rate, score_func="sigmoid").with_train(steps=steps, grad_accum_steps=2)
    model = train_run(config, data=load_data(smoke.base.data)).model
    for block in model.blocks:
        bias = block.ffn.router.expert_bias
        assert bias.abs().max() > 0  # the hook ran
        assert bias.abs().max() <= 2 * rate * steps + 1e-9  # each step moves a bias by at most 2u
        assert bias.sum().abs() < 1e-6
        assert torch.equal(block.ffn.router.tokens_per_expert, torch.zeros(4))  # consumed by the last update


# --------------------------------------------------------------------------- expert choice
def test_expert_choice_gives_every_expert_exactly_c_tokens_and_matches_a_loop():
    torch.manual_seed(0)
    cfg = tiny(router="expert_choice", capacity_factor=1.5)
    ffn = MoEFeedForward(cfg)
    x = torch.randn(20, cfg.d_model)
    y, r = ffn(x)
    capacity = 15  # ceil(1.5 * 20 * 2 / 4)
    assert r.token_indices.shape == (4, capacity)
    assert torch.equal(torch.bincount(r.expert_indices.flatten(), minlength=4), torch.full((4,), capacity))
    scores = (x @ ffn.router.weight.T).softmax(-1)
    expected = torch.zeros_like(x)
    for e in range(4):
        gates, picked = scores[:, e].topk(capacity)
        assert torch.equal(r.token_indices[e], picked)
        expected[picked] += gates.unsqueeze(-1) * (swiglu(x[picked] @ ffn.experts.w_in[e]) @ ffn.experts.w_out[e])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    unpicked = 20 - torch.unique(r.token_indices).numel()
    assert r.dropped_fraction.item() == pytest.approx(unpicked / 20)
    acc = RoutingAccumulator()
    acc.add([r])
    assert acc.max_violation_per_layer() == [0.0] and acc.cv_per_layer() == [0.0]  # balanced by construction


def test_expert_choice_uses_the_evaluation_capacity_in_eval_mode():
    torch.manual_seed(0)
    ffn = MoEFeedForward(tiny(router="expert_choice", capacity_factor=1.0, capacity_factor_eval=1.5))
    x = torch.randn(20, 32)
    assert ffn.train()(x)[1].token_indices.shape == (4, 10)  # ceil(1.0 * 20 * 2 / 4)
    assert ffn.eval()(x)[1].token_indices.shape == (4, 15)  # ceil(1.5 * 20 * 2 / 4)
    with pytest.raises(ValueError, match="capacity_factor_eval"):
        tiny(router="expert_choice", capacity_factor_eval=3.0)  # 2 * 3 slots per token > 4 experts


def test_expert_choice_in_evaluation_never_picks_padding():
    """Padding (target -100) takes no expert slot, and C counts only real tokens: the real positions'
    loss does not depend on what the padding holds."""
    torch.manual_seed(0)
    model = MoETransformer(tiny(router="expert_choice", capacity_factor_eval=0.5)).eval()
    x = tokens()
    y = x.roll(-1, dims=1)
    y[-1, 4:] = -100  # the last window is mostly padding, as eval_batches pads the end of a split
    valid = (y != -100).reshape(-1)
    out = model(x, y)
    for r in out.routing:
        assert r.token_indices.shape[1] == 5  # ceil(0.5 * 20 real tokens * 2 / 4)
        assert valid[r.token_indices].all()
    other = x.clone()
    other[-1, 4:] = (other[-1, 4:] + 7) % VOCAB  # different padding ids
    torch.testing.assert_close(model(other, y).lm_loss, out.lm_loss, rtol=1e-6, atol=0)


def earlier_outputs_change(router: str) -> float:
    """Largest change of positions 0..T-2's logits when only the LAST token of sequence 0 changes."""
    torch.manual_seed(0)
    return earlier_output_change(MoETransformer(tiny(router=router)), tokens())


def test_expert_choice_leaks_the_future_in_a_decoder():
    """Expert e's top-C compares each token with all others, later ones too."""
    assert earlier_outputs_change("expert_choice") > 1e-4


def test_token_choice_does_not_leak_the_future():
    assert earlier_outputs_change("topk") < 1e-6  # the causal mask holds: 0.0 here


# --------------------------------------------------------------------------- MaxVio and router saturation
def test_max_violation_by_hand():
    assert max_violation(torch.tensor([4, 2, 1, 1])).item() == pytest.approx(1.0)  # max 4, mean 2
    assert max_violation(torch.tensor([3, 3, 3])).item() == 0.0


def test_topk_overlap_by_hand_ignores_order():
    a = torch.tensor([[0, 1], [2, 3], [0, 3]])
    b = torch.tensor([[1, 0], [2, 5], [1, 2]])
    assert topk_overlap(a, b).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        topk_overlap(a, b[:, :1])


def test_router_saturation_by_hand():
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    final = copy.deepcopy(model)
    final.blocks[0].ffn.router.weight.data[[0, 1]] = model.blocks[0].ffn.router.weight.data[[1, 0]]  # swap experts 0 and 1
    batches = [(tokens(0), None), (tokens(1), None)]
    saturation = router_saturation(model, final, batches)
    assert router_saturation(model, model, batches) == [1.0, 1.0]
    hits = total = 0
    for x, _ in batches:
        for mine in model.eval()(x).routing[0].expert_indices.tolist():
            theirs = {1 - e if e < 2 else e for e in mine}  # what the swapped router picks, by construction
            hits += len(set(mine) & theirs)
            total += len(mine)
    assert saturation[0] == pytest.approx(hits / total)
    assert saturation[0] < 1.0


def test_expert_choice_routes_in_fp32_and_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = MoETransformer(tiny(router="expert_choice", score_func="sigmoid")).eval()
    x = tokens()
    full = model(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        half = model(x)
    assert half.routing[0].logits.dtype == torch.float32
    assert torch.equal(half.routing[0].token_indices, full.routing[0].token_indices)  # layer 0 sees the same input
    torch.testing.assert_close(half.logits.float(), full.logits, rtol=0.05, atol=0.05)


def test_routing_trace_refuses_expert_choice():
    from moe_lib.studies.traces import trace_routing

    with pytest.raises(ValueError, match="token-choice router"):
        trace_routing(MoETransformer(tiny(router="expert_choice")), None, annotation=object())


# --------------------------------------------------------------------------- notebook 08's grid
def test_modern_grid_matches_what_each_comparison_holds_equal():
    from moe_lib.studies.modern import modern_conditions, modern_grid
    from moe_lib.profiles import get_profile

    profile = get_profile("cpu")
    grid = modern_grid(profile)
    assert grid.baseline == "classic" and len(grid.runs) == 8 * len(profile.seeds)
    assert set(grid.conditions) == set(modern_conditions(profile.base))  # every condition, "no balancing" included
    with pytest.raises(ValueError, match="must include 'classic'"):
        modern_grid(profile, conditions=("sigmoid",))
    configs = {r.condition: r.config for r in grid.runs if r.seed == profile.seeds[0]}
    counts = {label: count_parameters(MoETransformer(c.model)) for label, c in configs.items()}
    classic = counts["classic"]
    L, d, E, d_ff, T = 4, 128, 8, 256, 128
    fine = counts["fine-grained + shared"]
    assert (configs["fine-grained + shared"].model.num_experts, configs["fine-grained + shared"].model.top_k) == (31, 7)
    assert fine.active_experts + fine.shared_experts == classic.active_experts == L * 2 * 3 * d * d_ff
    assert fine.experts + fine.shared_experts == classic.experts == L * E * 3 * d * d_ff
    dense_total = counts["dense (same total)"]
    assert dense_total.total == classic.total - classic.router  # the E experts' parameters in one SwiGLU
    flops = {label: flops_per_token(c.model, T) for label, c in configs.items()}
    assert flops["classic"] - flops["dense (same active)"] == 6 * L * d * E  # the router only
    assert configs["aux-loss-free"].model.bias_update_rate == 1e-3 and configs["aux-loss-free"].model.load_balancing_weight == 0
    assert len({r.run_id for r in grid.runs}) == len(grid.runs)
