"""moe_lib's MoE layer computes what the released MoE families compute (issue 21 §6).

Each test builds a tiny random configuration of Hugging Face transformers' OWN sparse-MoE
block of a family, copies its weights into :class:`moe_lib.moe.model.MoEFeedForward` configured
as that family, and compares the output and the gradients of the input and of every weight
(fp32, ``rtol`` 1e-5), at three shapes, at k = 1 and k >= 2, with both dispatchers.

What had to be mapped (HF -> moe_lib):

* Experts: HF stacks ``gate_up_proj [E, 2h, d]`` (gate rows, then up rows) and
  ``down_proj [E, d, h]`` and applies them with ``F.linear`` (``x W^T``); moe_lib stacks
  ``w_in [E, d, 2h]`` (gate columns, then up columns) and ``w_out [E, h, d]`` and multiplies
  ``x W``. So ``w_in = gate_up_proj^T`` and ``w_out = down_proj^T`` per expert.
* Shared experts: HF's ``gate_proj``, ``up_proj``, ``down_proj`` Linears become one
  ``w_in.weight = [gate_proj; up_proj]`` (rows stacked) and ``w_out.weight = down_proj``.
* Router weights ``[E, d]`` are the same layout in both. HF's blocks return only the hidden
  states (the router logits are recorded by the full model's hooks), moe_lib's a
  ``(y, RoutingResult)`` pair. HF's OLMoE/Qwen/Mixtral routers run ``F.linear`` in the input
  dtype and the softmax in fp32; DeepSeek-V3's, like moe_lib's, cast to fp32 first. In fp32
  these agree bit for bit, so both pick the same experts.
* DeepSeek-V3's ``e_score_correction_bias`` buffer is moe_lib's ``expert_bias``, which exists
  when ``bias_update_rate > 0``; HF adds ``1e-20`` to the gate normaliser, moe_lib does not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from moe_lib.runs import grid
from moe_lib.config import ModelConfig, RunConfig
from moe_lib.moe.model import DenseFeedForward, MoEFeedForward
from moe_lib.moe.routing import top_group_mask

RTOL = 1e-5
# Absolute floor for entries that are sums cancelling to near 0: 1e-6 of the tensor's scale (its largest
# entry, at least 1: weights drawn with std 1/sqrt(fan_in) keep activations and gradients O(1)).
ATOL_OF_SCALE = 1e-6
# (batch, seq, d_model, expert width h, experts E)
SHAPES = ((2, 5, 16, 8, 4), (1, 13, 32, 24, 8), (3, 7, 24, 16, 16))
CASES = [(shape, k) for shape in SHAPES for k in ((1, 2) if shape[4] < 8 else (1, 2, 4))]
ROUTED_SCALING = 2.5


def deepseek_groups(num_experts: int) -> tuple[int, int]:
    """(n_group, topk_group): 2 experts per group; the token keeps half the groups (at least 4 experts)."""
    groups = num_experts // 2
    return groups, max(2, groups // 2)


def hf_block(family: str, d: int, h: int, num_experts: int, k: int) -> torch.nn.Module:
    """HF's sparse-MoE block of ``family``, tiny, every weight drawn at random."""
    common = dict(hidden_size=d, num_experts_per_tok=k, hidden_act="silu")
    if family == "olmoe":
        block = OlmoeSparseMoeBlock(OlmoeConfig(intermediate_size=h, num_experts=num_experts, norm_topk_prob=False, **common))
    elif family == "mixtral":
        block = MixtralSparseMoeBlock(MixtralConfig(intermediate_size=h, num_local_experts=num_experts, router_jitter_noise=0.0, **common))
    elif family == "qwen3_moe":
        block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(moe_intermediate_size=h, num_experts=num_experts, norm_topk_prob=True, **common))
    elif family == "qwen2_moe":
        block = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            moe_intermediate_size=h, shared_expert_intermediate_size=2 * h, num_experts=num_experts, norm_topk_prob=True, **common))
    elif family == "deepseek_v3":
        groups, per_token = deepseek_groups(num_experts)
        block = DeepseekV3MoE(DeepseekV3Config(
            moe_intermediate_size=h, n_routed_experts=num_experts, n_shared_experts=1, n_group=groups, topk_group=per_token,
            norm_topk_prob=True, routed_scaling_factor=ROUTED_SCALING, **common))
    else:
        raise KeyError(family)
    g = torch.Generator().manual_seed(1000 * d + 10 * num_experts + k)
    with torch.no_grad():
        for p in block.parameters():  # HF leaves the experts uninitialised (torch.empty) outside from_pretrained
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)  # std 1/sqrt(fan_in): O(1) activations
        if family == "deepseek_v3":  # a selection bias large enough to change choices
            block.gate.e_score_correction_bias.copy_(0.2 * torch.randn(num_experts, generator=g))
    return block


def moe_lib_config(family: str, d: int, h: int, num_experts: int, k: int, dispatch: str) -> ModelConfig:
    """moe_lib's options for the family."""
    base = dict(d_model=d, n_heads=1, d_ff=h, num_experts=num_experts, top_k=k, dispatch=dispatch, noise_std=0.0)
    if family == "olmoe":  # softmax, top-k, no renormalisation
        return ModelConfig(gate="softmax", **base)
    if family in ("mixtral", "qwen3_moe"):  # softmax, top-k, renormalised over the k
        return ModelConfig(gate="renormalized", **base)
    if family == "qwen2_moe":  # ... plus a shared expert of width 2h behind a sigmoid gate
        return ModelConfig(gate="renormalized", num_shared_experts=2, shared_expert_gate=True, **base)
    groups, per_token = deepseek_groups(num_experts)
    return ModelConfig(  # sigmoid scores, selection bias, normalised gates, scaling, shared expert, groups
        gate="renormalized", score_func="sigmoid", bias_update_rate=1e-3, routed_scaling_factor=ROUTED_SCALING,
        num_shared_experts=1, expert_groups=groups, expert_groups_per_token=per_token, **base)


def hf_in_moe_lib_layout(block: torch.nn.Module, field: str) -> dict[str, torch.Tensor]:
    """The HF block's parameters (``field="data"``) or gradients (``"grad"``) under moe_lib's names and layouts."""
    get = lambda p: getattr(p, field)  # noqa: E731
    out = {
        "router.weight": get(block.gate.weight),
        "experts.w_in": get(block.experts.gate_up_proj).transpose(1, 2),
        "experts.w_out": get(block.experts.down_proj).transpose(1, 2),
    }
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None:
        prefix = "shared_experts.ffn." if hasattr(block, "shared_expert_gate") else "shared_experts."
        out[prefix + "w_in.weight"] = torch.cat([get(shared.gate_proj.weight), get(shared.up_proj.weight)])
        out[prefix + "w_out.weight"] = get(shared.down_proj.weight)
    if hasattr(block, "shared_expert_gate"):
        out["shared_experts.gate.weight"] = get(block.shared_expert_gate.weight)
    return out


def matched_pair(family: str, shape: tuple, k: int, dispatch: str) -> tuple[torch.nn.Module, MoEFeedForward]:
    _, _, d, h, num_experts = shape
    block = hf_block(family, d, h, num_experts, k)
    ours = MoEFeedForward(moe_lib_config(family, d, h, num_experts, k, dispatch))
    weights = hf_in_moe_lib_layout(block, "data")
    assert set(weights) == {name for name, _ in ours.named_parameters()}, "every moe_lib parameter has its HF counterpart"
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(weights[name])
        if family == "deepseek_v3":
            ours.router.expert_bias.copy_(block.gate.e_score_correction_bias)
    return block, ours


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    atol = ATOL_OF_SCALE * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine idle threads' spinning made each case 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "mixtral")


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
@pytest.mark.parametrize("shape,k", CASES, ids=[f"{s[2]}d-{s[4]}E-k{k}" for s, k in CASES])
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_layer_equals_the_families_reference_block(family, shape, k, dispatch):
    batch, seq, d, _, _ = shape
    block, ours = matched_pair(family, shape, k, dispatch)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(batch, seq, d, generator=g)
    grad_y = torch.randn(batch, seq, d, generator=g)

    x_hf = x0.clone().requires_grad_(True)
    y_hf = block(x_hf)
    y_hf.backward(grad_y)
    x_ours = x0.clone().requires_grad_(True)
    y_ours, routing = ours(x_ours)
    y_ours.backward(grad_y)

    assert_matches(y_ours, y_hf, "output")
    assert_matches(x_ours.grad, x_hf.grad, "d input")
    hf_grads = hf_in_moe_lib_layout(block, "grad")
    for name, p in ours.named_parameters():
        assert_matches(p.grad, hf_grads[name], f"d {name}")
    _, hf_gates, hf_experts = block.gate(x0.view(-1, d))  # same choices, same gates (order within the k aside)
    torch.testing.assert_close(routing.expert_indices.sort(-1).values, hf_experts.sort(-1).values, rtol=0, atol=0)
    assert_matches(routing.gate_weights.sort(-1).values, hf_gates.sort(-1).values, "gates")


def test_deepseek_cases_exercise_the_bias_the_groups_and_the_scaling():
    """Each DeepSeek-V3 option changes the routing or the gates in these cases, so matching HF tests it."""
    shape = SHAPES[1]
    _, ours = matched_pair("deepseek_v3", shape, 2, "grouped")
    x = torch.randn(shape[0] * shape[1], shape[2], generator=torch.Generator().manual_seed(7))
    routing = ours.eval().router(x)
    scores = torch.sigmoid(x @ ours.router.weight.detach().T)
    unbiased_grouped = top_group_mask(scores, *deepseek_groups(shape[4])).topk(2, dim=-1).indices
    biased_ungrouped = (scores + ours.router.expert_bias).topk(2, dim=-1).indices
    chosen = routing.expert_indices.sort(-1).values
    assert not torch.equal(chosen, unbiased_grouped.sort(-1).values), "the selection bias changes no choice"
    assert not torch.equal(chosen, biased_ungrouped.sort(-1).values), "the group limit changes no choice"
    torch.testing.assert_close(routing.gate_weights.sum(-1), torch.full((x.shape[0],), ROUTED_SCALING))


def test_top_group_mask_keeps_the_best_groups_by_their_two_best_experts():
    # groups {0,1,2}, {3,4,5}: group 0 sums 0.9 + 0.1 = 1.0, group 1 sums 0.6 + 0.5 = 1.1 -> group 1 wins despite 0.9
    choice = torch.tensor([[0.9, 0.1, 0.0, 0.6, 0.5, 0.0]])
    masked = top_group_mask(choice, groups=2, groups_per_token=1)
    assert torch.equal(masked.isfinite(), torch.tensor([[False, False, False, True, True, True]]))
    assert masked.topk(2).indices.tolist() == [[3, 4]]


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_one_expert_top1_equals_the_dense_swiglu_exactly(dispatch):
    """megablocks' sanity check: E = 1, k = 1 routes every token to the one expert with gate
    ``softmax`` over one logit = 1.0, so the layer IS that expert's SwiGLU."""
    torch.manual_seed(3)
    ours = MoEFeedForward(ModelConfig(d_model=24, n_heads=1, d_ff=40, num_experts=1, top_k=1, dispatch=dispatch))
    dense = DenseFeedForward(24, 40)
    with torch.no_grad():
        dense.w_in.weight.copy_(ours.experts.w_in[0].T)
        dense.w_out.weight.copy_(ours.experts.w_out[0].T)
    x0 = torch.randn(3, 11, 24)
    grad_y = torch.randn(3, 11, 24)
    x_moe, x_dense = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    y_moe, y_dense = ours(x_moe)[0], dense(x_dense)[0]
    (y_moe * grad_y).sum().backward()
    (y_dense * grad_y).sum().backward()
    torch.testing.assert_close(y_moe, y_dense, rtol=0, atol=0)
    torch.testing.assert_close(x_moe.grad, x_dense.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.experts.w_in.grad[0], dense.w_in.weight.grad.T, rtol=0, atol=0)
    torch.testing.assert_close(ours.experts.w_out.grad[0], dense.w_out.weight.grad.T, rtol=0, atol=0)


@pytest.mark.parametrize("changes,field", [
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(routed_scaling_factor=2.0, router="random"), "routed_scaling_factor"),
    (dict(expert_groups=3), "expert_groups"),  # 8 experts do not split into 3 groups
    (dict(expert_groups=8), "expert_groups"),  # 1 expert per group: no "two best"
    (dict(expert_groups=2, expert_groups_per_token=3), "expert_groups_per_token"),
    (dict(expert_groups=4, expert_groups_per_token=1, top_k=3), "expert_groups_per_token"),  # 2 reachable experts < k
    (dict(shared_expert_gate=True), "shared_expert_gate"),  # no shared expert
])
def test_reference_options_reject_bad_values_by_name(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=.*expected"):
        ModelConfig(**{**dict(d_model=16, n_heads=1, num_experts=8, top_k=2), **changes})


def test_new_options_off_keep_the_stored_config_hashes(monkeypatch):
    """Hashes computed before these options existed (at results version 2) still come out."""
    monkeypatch.setattr(grid, "RESULTS_VERSION", 2)
    assert grid.config_hash(RunConfig()) == "51ff78f01318"
    modern = RunConfig().with_model(num_shared_experts=1, score_func="sigmoid", bias_update_rate=1e-3)
    assert grid.config_hash(modern) == "d95ea1333cdf"
