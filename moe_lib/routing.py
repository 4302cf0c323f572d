"""Routers: which k experts each token goes to, and with what weight.

A router maps token vectors ``x`` of shape ``[N, d]`` to a :class:`RoutingResult`.
Two kinds:

* :class:`TopKRouter` - learned: ``logits = x @ W``, optional Gaussian noise on the logits
  (training only), the k largest noisy logits win. It runs in fp32 even under bf16 autocast
  (ST-MoE: bf16 round-off in the softmax and the auxiliary losses destabilises routing).
* :class:`RandomRouter` - a control with no parameters: k distinct experts uniformly at
  random per token, each with weight ``1/k``.

Gate weights of the learned router (see ``ModelConfig.gate``):

* ``softmax`` (Switch): ``g_i = softmax(logits)_i`` for the chosen i. With k = 1 the gate
  is ``p_top < 1``, so the LM loss pushes the router through ``d g / d logits``.
* ``renormalized`` (Mixtral): ``g_i = p_i / sum_{j in topk} p_j``. With k = 1 this is
  identically 1.0 and the router gets NO gradient from the LM loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .losses import load_balancing_loss, router_z_loss


@dataclass
class RoutingResult:
    """What one MoE layer's router decided for ``N`` tokens and ``E`` experts.

    ``logits`` are the clean router logits ``[N, E]`` (``None`` for the random router, which
    has none); ``probs`` ``[N, E]`` is the distribution the experts were chosen from
    (softmax of the noisy logits, or uniform for the random router); ``expert_indices`` and
    ``gate_weights`` are ``[N, k]``. The auxiliary losses are this layer's unweighted scalars; the
    model weights each layer's and sums them over layers (:mod:`moe_lib.losses`).
    """

    logits: torch.Tensor | None
    probs: torch.Tensor
    expert_indices: torch.Tensor
    gate_weights: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_fraction: float = 0.0

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_indices.shape[-1]


class TopKRouter(nn.Module):
    """Learned linear router ``logits = x W`` with top-k selection and optional noise."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, noise_std: float = 0.0, renormalize: bool = True):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.noise_std, self.renormalize = noise_std, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)  # near-uniform routing at the start

    def forward(self, x: torch.Tensor) -> RoutingResult:
        # fp32 routing (ST-MoE): autocast would cast F.linear's inputs back to bf16, so switch it off here.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # [N, E] fp32
            noisy = logits
            if self.training and self.noise_std > 0:
                noisy = logits + self.noise_std * torch.randn_like(logits)
            probs = noisy.softmax(dim=-1)
            top_probs, expert_indices = probs.topk(self.top_k, dim=-1)
            gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.renormalize else top_probs
            return RoutingResult(
                logits=logits,
                probs=probs,
                expert_indices=expert_indices,
                gate_weights=gates,
                load_balancing_loss=load_balancing_loss(probs, expert_indices),
                z_loss=router_z_loss(logits),
            )

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, noise_std={self.noise_std}, renormalize={self.renormalize}"


class RandomRouter(nn.Module):
    """k distinct experts per token, uniformly at random, weight 1/k each. No parameters.

    Its routing distribution is uniform, so its entropy is exactly ``ln E``; its
    load-balancing term is ``E * sum_i f_i / E = 1`` (constant, no gradient) and it has no
    logits, so no z-loss.
    """

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x: torch.Tensor) -> RoutingResult:
        n = x.shape[0]
        # The k largest of E i.i.d. uniforms form a uniformly random k-subset: distinct by construction.
        expert_indices = torch.rand(n, self.num_experts, device=x.device).topk(self.top_k, dim=-1).indices
        probs = torch.full((n, self.num_experts), 1.0 / self.num_experts, device=x.device)
        gates = torch.full((n, self.top_k), 1.0 / self.top_k, device=x.device)
        zero = torch.zeros((), device=x.device)
        return RoutingResult(
            logits=None,
            probs=probs,
            expert_indices=expert_indices,
            gate_weights=gates,
            load_balancing_loss=load_balancing_loss(probs, expert_indices),
            z_loss=zero,
        )

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}"


def build_router(cfg: ModelConfig) -> nn.Module:
    """The router named by ``cfg.router``."""
    if cfg.router == "random":
        return RandomRouter(cfg.num_experts, cfg.top_k)
    return TopKRouter(cfg.d_model, cfg.num_experts, cfg.top_k, cfg.noise_std, cfg.gate_renormalized)


def uniform_entropy(num_experts: int) -> float:
    """Entropy of uniform routing over E experts, ``ln E`` nats: the maximum possible."""
    return math.log(num_experts)
