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

Modern options (notebook 08), in torchtitan's style:

* Sigmoid scoring (DeepSeek-V3, ``score_func="sigmoid"``): each expert's score
  ``s_i = sigmoid(logit_i)`` is independent of the others; the gates are the chosen scores
  (re-normalised over the chosen k as above). The load-balancing loss needs a distribution
  ``P`` over experts, and sigmoid scores are not one, so ``probs`` are the scores normalised
  per token, ``s_i / sum_j s_j``: the ``s'`` of DeepSeek-V3's sequence-wise balance loss
  (we keep the batch-wise ``f`` and ``P`` of :func:`~moe_lib.moe.losses.load_balancing_loss`).
  Entropy metrics read the same normalised scores.
* Auxiliary-loss-free balancing (Wang et al. 2024; ``bias_update_rate`` u > 0): a per-expert
  buffer ``b`` is added to the scores FOR SELECTION ONLY; gates use the unbiased scores. The
  training forwards count each expert's tokens; after each optimizer step
  :func:`update_expert_biases` applies ``b_i += u sign(mean load - load_i)``, centred so
  ``sum b = 0`` (as torchtitan does), and clears the counts (a step that the fp16 GradScaler
  skipped moves no bias, as it moves no weight). ``b`` is a persistent buffer:
  checkpoints keep it, optimizers never see it.
* :class:`ExpertChoiceRouter` (Zhou et al. 2022): each expert picks its top ``C`` tokens of
  the batch, so the load is balanced by construction. Whether token n is picked depends on
  every other token, later ones included: in a decoder it leaks the future.

DeepSeek-V3's two further options (``tests/test_reference_blocks.py`` holds them against its
Hugging Face block): a routed scaling factor ``rho`` multiplies the final gates,
``g_i -> rho g_i``; group-limited routing (:func:`top_group_mask`) restricts each token's
selection to its best ``M`` of ``G`` expert groups.

Random draws (router noise, the random router) come from the global RNG, ``[N, E]`` per
forward. Under expert parallelism each rank routes only its rows of the global batch; it
passes :class:`BatchRows` and draws for the whole batch (:func:`draw_for_rows`), so that the
ranks together draw exactly what one process draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .experts import expert_capacity
from .losses import expert_counts, load_balancing_loss, router_z_loss


@dataclass
class RoutingResult:
    """What one MoE layer's router decided for ``N`` tokens and ``E`` experts.

    ``logits`` are the clean router logits ``[N, E]`` (``None`` for the random router, which
    has none); ``probs`` ``[N, E]`` is the distribution the experts were chosen from
    (softmax of the noisy logits, or uniform for the random router); ``expert_indices`` and
    ``gate_weights`` are ``[N, k]``. The auxiliary losses are this layer's unweighted scalars; the
    model weights each layer's and sums them over layers (:mod:`moe_lib.moe.losses`).

    Expert choice fills it per expert instead: ``token_indices`` ``[E, C]`` are the tokens
    each expert picked, ``gate_weights`` ``[E, C]`` their scores, and ``expert_indices``
    ``[E, C]`` the expert of each of those slots (row e is all e), so that expert counts,
    utilization and the load-balancing loss read the same field in both layouts.
    """

    logits: torch.Tensor | None
    probs: torch.Tensor
    expert_indices: torch.Tensor
    gate_weights: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_fraction: float = 0.0
    token_indices: torch.Tensor | None = None  # expert choice only

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_indices.shape[-1]

    @classmethod
    def with_losses(cls, logits, probs, expert_indices, gate_weights, token_indices=None) -> "RoutingResult":
        """The result with both auxiliary losses computed from it (the z-loss is 0 without logits)."""
        z_loss = router_z_loss(logits) if logits is not None else torch.zeros((), device=probs.device)
        return cls(logits=logits, probs=probs, expert_indices=expert_indices, gate_weights=gate_weights,
                   load_balancing_loss=load_balancing_loss(probs, expert_indices), z_loss=z_loss, token_indices=token_indices)


@dataclass(frozen=True)
class BatchRows:
    """Where a process's ``N`` tokens sit in the global batch: rows ``[start, start + N)`` of ``total``."""

    start: int
    total: int


def draw_for_rows(sample, num_rows: int, num_cols: int, device: torch.device, rows: BatchRows | None = None) -> torch.Tensor:
    """``sample(num_rows, num_cols)`` (``torch.rand`` or ``torch.randn``, fp32), or with ``rows``, rows
    ``[start, start + num_rows)`` of ``sample(total, num_cols)``.

    Every rank has the same seed, so each draws the global ``[total, E]`` tensor that single-process
    training draws and keeps its own rows: the same numbers for the same tokens. The price is
    ``W`` times the random numbers per rank (``total = W N``), ``E`` per token: small beside a layer's matmuls.
    """
    if rows is None:
        return sample(num_rows, num_cols, device=device)
    if not 0 <= rows.start <= rows.total - num_rows:
        raise ValueError(f"rows={rows} is invalid for {num_rows} tokens: expected 0 <= start <= total - {num_rows}")
    return sample(rows.total, num_cols, device=device)[rows.start : rows.start + num_rows]


class TopKRouter(nn.Module):
    """Learned linear router ``logits = x W`` with top-k selection and optional noise."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        noise_std: float = 0.0,
        renormalize: bool = True,
        score_func: str = "softmax",
        bias_update_rate: float = 0.0,
        routed_scaling_factor: float = 1.0,
        expert_groups: int = 1,
        expert_groups_per_token: int = 1,
    ):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.expert_groups, self.expert_groups_per_token = expert_groups, expert_groups_per_token
        self.noise_std, self.renormalize = noise_std, renormalize
        self.score_func, self.bias_update_rate = score_func, bias_update_rate
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)  # near-uniform routing at the start
        # Aux-loss-free balancing: buffers only when used (None is left out of the state dict), so older checkpoints load.
        balanced = bias_update_rate > 0
        self.register_buffer("expert_bias", torch.zeros(num_experts) if balanced else None, persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts) if balanced else None, persistent=False)

    def forward(self, x: torch.Tensor, rows: BatchRows | None = None) -> RoutingResult:
        """Route ``x [N, d]``; ``rows``: where these tokens sit in the global batch (expert parallelism, for the noise)."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 routing, see router_scores
            logits, scores, probs = router_scores(x, self.weight, self.noise_std if self.training else 0.0, self.score_func, rows)
            top_probs, expert_indices = self.select(scores)
            gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.renormalize else top_probs
            if self.routed_scaling_factor != 1.0:
                gates = gates * self.routed_scaling_factor
            return RoutingResult.with_losses(logits, probs, expert_indices, gates)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best experts by ``scores + expert_bias`` (bias for SELECTION only; among the token's best
        groups where ``expert_groups > 1``) and their unbiased scores."""
        if self.expert_bias is None and self.expert_groups == 1:
            return scores.topk(self.top_k, dim=-1)
        choice = scores.detach() if self.expert_bias is None else scores.detach() + self.expert_bias
        if self.expert_groups > 1:
            choice = top_group_mask(choice, self.expert_groups, self.expert_groups_per_token)
        expert_indices = choice.topk(self.top_k, dim=-1).indices
        if self.expert_bias is None:
            return scores.gather(-1, expert_indices), expert_indices
        if self.training:  # the step's load, summed over its micro-batches; evaluation does not count
            self.tokens_per_expert += expert_counts(expert_indices, self.num_experts)
        return scores.gather(-1, expert_indices), expert_indices

    @torch.no_grad()
    def update_expert_bias(self, step_taken: bool = True) -> None:
        """``b_i += u sign(mean load - load_i)``, centred to keep ``sum b = 0``; then clear the counts.

        Under data parallelism the loads are summed over ranks first, so every rank keeps the same bias.
        ``step_taken=False`` (the fp16 GradScaler skipped the optimizer step) only clears the counts:
        the bias skips the step as the weights do.
        """
        load = self.tokens_per_expert
        if not step_taken:
            load.zero_()
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if load.sum() == 0:  # no training forward since the last update
            return
        delta = self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias += delta - delta.mean()
        load.zero_()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, noise_std={self.noise_std}, renormalize={self.renormalize}, "
            f"score_func={self.score_func}, bias_update_rate={self.bias_update_rate}"
            + (f", routed_scaling_factor={self.routed_scaling_factor}" if self.routed_scaling_factor != 1.0 else "")
            + (f", expert_groups={self.expert_groups}/{self.expert_groups_per_token}" if self.expert_groups > 1 else "")
        )


def top_group_mask(choice: torch.Tensor, groups: int, groups_per_token: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited routing: ``choice [N, E]`` with every expert outside the token's
    ``M = groups_per_token`` best groups set to ``-inf``, so that a top-k over it picks only inside them.

    Experts ``[g E/G, (g+1) E/G)`` form group g. A group's score is the sum of its two highest
    selection scores, ``s_g = top1 + top2`` over its experts (DeepSeek-V2 used the maximum),
    and the token keeps the M groups with the highest ``s_g``. On a cluster, a group is a node:
    each token's experts then sit on at most M nodes, which bounds its all-to-all traffic.
    """
    num_tokens, num_experts = choice.shape
    grouped = choice.view(num_tokens, groups, num_experts // groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
    best_groups = group_scores.topk(groups_per_token, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


def expert_scores(logits: torch.Tensor, score_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, probs)`` for ``[N, E]`` logits.

    softmax: ``scores = probs = softmax(logits)``. sigmoid: ``scores = sigmoid(logits)`` and
    ``probs = scores / sum_j scores_j`` per token (DeepSeek-V3's ``s'``, the ``P`` of the balance loss).
    """
    if score_func == "softmax":
        probs = logits.softmax(dim=-1)
        return probs, probs
    if score_func == "sigmoid":
        scores = logits.sigmoid()
        return scores, scores / scores.sum(dim=-1, keepdim=True)
    raise ValueError(f"score_func={score_func!r} is invalid: expected one of ['softmax', 'sigmoid']")


def router_scores(
    x: torch.Tensor, weight: torch.Tensor, noise_std: float, score_func: str, rows: BatchRows | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, scores, probs)`` for tokens ``x [N, d]``: clean ``logits = x W^T [N, E]`` in fp32, and
    :func:`expert_scores` of the logits plus ``N(0, noise_std^2)`` noise (pass 0 outside training),
    drawn by :func:`draw_for_rows`.

    Call it with autocast disabled: ST-MoE keeps the router in fp32, and autocast would cast
    ``F.linear``'s inputs back to bf16 whatever ``x.float()`` asked for.
    """
    logits = F.linear(x.float(), weight.float())  # [N, E] fp32
    noisy = logits + noise_std * draw_for_rows(torch.randn, *logits.shape, logits.device, rows) if noise_std > 0 else logits
    scores, probs = expert_scores(noisy, score_func)
    return logits, scores, probs


def update_expert_biases(model: nn.Module, step_taken: bool = True) -> None:
    """After an optimizer step: update every auxiliary-loss-free router's selection bias (only clear its
    loads when the step was skipped, see :meth:`TopKRouter.update_expert_bias`)."""
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            module.update_expert_bias(step_taken)


class ExpertChoiceRouter(nn.Module):
    """Each expert picks its ``C = ceil(cf N k / E)`` highest-scoring tokens (Zhou et al. 2022).

    The scores are the usual per-token ``softmax`` (or ``sigmoid``) over experts; the top-C is
    taken over the batch's ``N`` tokens, per expert (``scores.T.topk(C)``). Every expert gets
    exactly C tokens; a token gets between 0 and E experts, with its raw scores as gates.
    Because the top-C compares a token with all others in the batch, including later
    positions, an earlier token's output depends on the future: unusable for a causal LM.

    ``cf`` is ``capacity_factor`` in training and ``capacity_factor_eval`` in eval mode (``None``: 1).
    Evaluation padding (``valid`` False) is never picked, and ``N`` counts only the real tokens,
    so padding takes no slot from a real token.
    """

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None, noise_std: float = 0.0,
        score_func: str = "softmax", capacity_factor_eval: float | None = None,
    ):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.capacity_factor_eval = capacity_factor, capacity_factor_eval
        self.noise_std, self.score_func = noise_std, score_func
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def capacity(self, num_tokens: int) -> int:
        cf = self.capacity_factor if self.training else self.capacity_factor_eval
        return min(num_tokens, expert_capacity(num_tokens, self.top_k, self.num_experts, 1.0 if cf is None else cf))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> RoutingResult:
        """Route ``x [N, d]``; ``valid [N]`` (``None``: all real) marks real tokens, False for padding."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 routing, see router_scores
            logits, scores, probs = router_scores(x, self.weight, self.noise_std if self.training else 0.0, self.score_func)
            num_real = x.shape[0] if valid is None else int(valid.sum())  # a host sync: only evaluation passes valid
            candidates = scores if valid is None else scores.masked_fill(~valid.unsqueeze(-1), -math.inf)
            gate_weights, token_indices = candidates.t().topk(self.capacity(num_real), dim=-1)  # [E, C], real tokens only
        expert_indices = torch.arange(self.num_experts, device=x.device).unsqueeze(1).expand_as(token_indices)
        return RoutingResult.with_losses(logits, probs, expert_indices, gate_weights, token_indices)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"capacity_factor_eval={self.capacity_factor_eval}, score_func={self.score_func}")


class RandomRouter(nn.Module):
    """k distinct experts per token, uniformly at random, weight 1/k each. No parameters.

    Its routing distribution is uniform, so its entropy is exactly ``ln E``; its
    load-balancing term is ``E * sum_i f_i / E = 1`` (constant, no gradient) and it has no
    logits, so no z-loss.
    """

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x: torch.Tensor, rows: BatchRows | None = None) -> RoutingResult:
        """Route ``x [N, d]``; ``rows``: where these tokens sit in the global batch (expert parallelism)."""
        n = x.shape[0]
        # The k largest of E i.i.d. uniforms form a uniformly random k-subset: distinct by construction.
        uniforms = draw_for_rows(torch.rand, n, self.num_experts, x.device, rows)
        expert_indices = uniforms.topk(self.top_k, dim=-1).indices
        probs = torch.full((n, self.num_experts), 1.0 / self.num_experts, device=x.device)
        gates = torch.full((n, self.top_k), 1.0 / self.top_k, device=x.device)
        return RoutingResult.with_losses(None, probs, expert_indices, gates)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}"


def draws_random_numbers(router: nn.Module) -> bool:
    """Whether ``router``'s next forward draws from the global RNG: the random router always, noise in training."""
    return isinstance(router, RandomRouter) or (router.training and getattr(router, "noise_std", 0.0) > 0)


def build_router(cfg: ModelConfig) -> nn.Module:
    """The router named by ``cfg.router``."""
    if cfg.router == "random":
        return RandomRouter(cfg.num_experts, cfg.top_k)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(
            cfg.d_model, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.noise_std, cfg.score_func, cfg.capacity_factor_eval
        )
    return TopKRouter(
        cfg.d_model, cfg.num_experts, cfg.top_k, cfg.noise_std, cfg.gate_renormalized, cfg.score_func, cfg.bias_update_rate,
        cfg.routed_scaling_factor, cfg.expert_groups, cfg.expert_groups_per_token,
    )


def uniform_entropy(num_experts: int) -> float:
    """Entropy of uniform routing over E experts, ``ln E`` nats: the maximum possible."""
    return math.log(num_experts)
