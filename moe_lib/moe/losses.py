"""Auxiliary router losses.

* Load balancing (Switch Transformer / GShard): ``L_lb = E * sum_i f_i * P_i`` where ``f_i``
  is the fraction of routed token slots sent to expert i (counts / (N k)) and ``P_i`` the
  mean router probability of expert i. Uniform routing gives exactly 1; collapse onto one
  expert gives E. ``f`` is a count, so the gradient flows through ``P`` only.
* Router z-loss (ST-MoE): ``L_z = mean_tokens(logsumexp(logits) ** 2)``. It penalises
  LARGE logits, whatever their spread, which keeps the router's softmax numerically stable
  (especially in bf16). It is not a "confidence booster".

Weighting convention: each MoE layer contributes its own weighted terms, and the model adds
them up, ``L = L_lm + w_lb * sum_layers L_lb + w_z * sum_layers L_z`` (:class:`moe_lib.moe.model.MoETransformer`).
That is Switch Transformer's and ST-MoE's convention (the auxiliary loss is added per MoE layer)
and the original noise study's (``0.01 * L_lb`` per layer, summed: ``aux=0.0602`` for 6 layers
near uniform routing), so ``w_lb = 0.01`` means the same thing here as there. Hugging Face's
Mixtral uses the mean style instead: ``router_aux_loss_coef`` multiplies ONE balance loss whose
``f`` and ``P`` are pooled over the router outputs of all layers concatenated, so, like a mean
over layers, it does not grow with depth, and the same coefficient weighs about ``n_layers``
times less than under the per-layer sum.
"""

from __future__ import annotations

import torch


def expert_counts(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many routed slots each expert received: ``[E]`` counts from ``[N, k]`` indices."""
    return torch.bincount(expert_indices.reshape(-1), minlength=num_experts)


def load_balancing_loss(probs: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` for router probabilities ``[N, E]`` and chosen experts ``[N, k]``."""
    num_experts = probs.shape[-1]
    fraction_routed = expert_counts(expert_indices, num_experts).to(probs.dtype) / expert_indices.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction_routed * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean(logsumexp(logits, -1) ** 2)`` over tokens."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def mean_logsumexp(logits: torch.Tensor) -> float:
    """``mean(logsumexp(logits, -1))`` over tokens: the logit magnitude z-loss squares (a metric, no gradient)."""
    return torch.logsumexp(logits.detach().float(), dim=-1).mean().item()
