"""The MoE layers the benchmarks compare: shapes, their FLOPs, and Hugging Face's Mixtral block
holding moe_lib's weights. Shared by the CPU tables (``bench_moe.py``) and the CUDA mode (``cuda_layer.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_lib.config import ModelConfig
from moe_lib.moe.model import MoEFeedForward

@dataclass(frozen=True)
class LayerShape:
    label: str
    d: int  # d_model
    h: int  # hidden width of one expert
    E: int  # experts
    k: int  # experts per token

    @property
    def name(self) -> str:
        return f"d{self.d} h{self.h} E{self.E} k{self.k}"


LAYER_SHAPES = (
    LayerShape("coarse (Mixtral-like)", 384, 1536, 8, 2),
    LayerShape("fine-grained (OLMoE/DeepSeek-like)", 384, 256, 64, 8),
    LayerShape("fine-grained, narrow", 128, 128, 32, 4),
)
QUICK_SHAPES = (LayerShape("tiny coarse", 64, 128, 8, 2), LayerShape("tiny fine", 64, 32, 32, 4))


def layer_flops(shape: LayerShape, tokens: int) -> float:
    """Forward + backward of the MoE layer: 3 x (2 N k 3 d h + 2 N d E)."""
    return 3.0 * (2 * tokens * shape.k * 3 * shape.d * shape.h + 2 * tokens * shape.d * shape.E)


def dense_flops(shape: LayerShape, tokens: int) -> float:
    """Forward + backward of a dense SwiGLU of width k*h (the same active expert FLOPs, no router)."""
    return 3.0 * 2 * tokens * 3 * shape.d * shape.k * shape.h


def moe_config(shape: LayerShape, dispatch: str) -> ModelConfig:
    """A config whose MoE block routes exactly like Mixtral: softmax, top-k, renormalised gates."""
    return ModelConfig(
        d_model=shape.d, n_heads=1, d_ff=shape.h, num_experts=shape.E, top_k=shape.k,
        gate="renormalized", noise_std=0.0, capacity_factor=None, dispatch=dispatch,
    )


def hf_mixtral_block(moe: MoEFeedForward, shape: LayerShape, experts_implementation: str) -> nn.Module | None:
    """transformers' ``MixtralSparseMoeBlock`` holding ``moe``'s router and expert weights.

    Handles both expert layouts transformers has used: stacked ``gate_up_proj [E, 2h, d]`` /
    ``down_proj [E, d, h]`` (v5) and a ModuleList of ``w1``/``w3`` (gate/up) and ``w2`` (down).
    Returns ``None`` if this transformers has no such experts implementation.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=shape.d, intermediate_size=shape.h, num_local_experts=shape.E, num_experts_per_tok=shape.k,
        router_jitter_noise=0.0, num_attention_heads=1, num_key_value_heads=1,
    )
    if experts_implementation != "eager":
        try:
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

            if experts_implementation not in ALL_EXPERTS_FUNCTIONS:
                return None
        except ImportError:
            return None
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(cfg)
    w_in, w_out = moe.experts.w_in.detach(), moe.experts.w_out.detach()  # [E, d, 2h], [E, h, d]
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):
            experts.gate_up_proj.copy_(w_in.transpose(1, 2))  # [E, 2h, d]: gate rows, then up rows
            experts.down_proj.copy_(w_out.transpose(1, 2))  # [E, d, h]
        else:
            for e, expert in enumerate(experts):
                expert.w1.weight.copy_(w_in[e, :, : shape.h].T)
                expert.w3.weight.copy_(w_in[e, :, shape.h :].T)
                expert.w2.weight.copy_(w_out[e].T)
    return block


def hf_expert_grads(block: nn.Module, shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF block's expert gradients in moe_lib's layout ``[E, d, 2h]``, ``[E, h, d]``."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):
        return experts.gate_up_proj.grad.transpose(1, 2), experts.down_proj.grad.transpose(1, 2)
    w_in = torch.stack([torch.cat([ex.w1.weight.grad.T, ex.w3.weight.grad.T], dim=1) for ex in experts])
    w_out = torch.stack([ex.w2.weight.grad.T for ex in experts])
    return w_in, w_out
