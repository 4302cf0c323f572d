"""What we measure about routing and about the language model.

Routing, per layer, from a :class:`~moe_lib.moe.routing.RoutingResult`:

* entropy ``H = mean_n(-sum_i p_{n,i} ln p_{n,i})`` of the router's distribution, in nats, and
  normalised by its maximum ``ln E`` (1 = uniform, 0 = one-hot). For the random router the
  distribution it samples from is uniform, so H = ln E exactly.
* utilization ``u_i = count_i / (N k)``: the share of routed slots each expert received;
  ``std(u)`` (population) and the coefficient of variation ``CV = std(u) / mean(u) = E std(u)``.
  Over a model we average the per-layer CVs (``expert_usage_cv``). The original noise study
  instead summed expert i's counts over all layers into ONE ``[E]`` vector and took its CV
  (:func:`pooled_usage_cv`, ``expert_usage_cv_pooled``): expert i of one layer and expert i of
  another are unrelated, so imbalances in different layers can cancel there (as every layer
  routes the same ``N k`` slots, it is never above ours). We keep ours and report the
  original's beside it, for comparison with its table.
* logit magnitude: ``mean_n logsumexp(logits_n)`` (what z-loss squares) and ``max |logit|``.
* dropped fraction: the share of the ``N k`` routed slots that a capacity limit turned away
  (``ModelConfig.capacity_factor`` in training, ``capacity_factor_eval`` in evaluation; 0 when
  dropless). A dropped slot adds no expert output, so its token keeps only the residual
  stream for that slot. For expert choice: the share of tokens that no expert picked.
* MaxVio (Wang et al. 2024): ``max_i load_i / mean_i load_i - 1``, 0 when perfectly balanced.
* router saturation (OLMoE): the share of each token's top-k experts at a checkpoint that
  are also among the final model's top-k for that token, on fixed validation tokens.

Language model: cross-entropy, perplexity ``exp(loss)`` and top-k accuracy, ignoring
targets of -100 (padding); and overfitting: how far the last validation loss rose from the
best (:func:`overfitting`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .moe.losses import expert_counts, mean_logsumexp
from .moe.routing import RoutingResult


@dataclass(frozen=True)
class LayerRoutingStats:
    entropy: float
    normalized_entropy: float
    utilization: list[float]
    utilization_std: float
    utilization_cv: float
    mean_logsumexp: float
    max_abs_logit: float
    dropped_fraction: float


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``-sum p ln p`` (with ``0 ln 0 = 0``), in nats."""
    probs = probs.float()
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()


def expert_utilization(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fractions ``count_i / (N k)``; they sum to 1."""
    return expert_counts(expert_indices, num_experts).float() / expert_indices.numel()


def coefficient_of_variation(values: torch.Tensor) -> torch.Tensor:
    """``std / mean`` with the population std (``ddof=0``)."""
    return values.float().std(unbiased=False) / values.float().mean()


def pooled_usage_cv(counts_per_layer: list[torch.Tensor]) -> torch.Tensor:
    """The original's usage CV: ``CV(sum_layers counts)``, the ``[E]`` count vectors of all layers summed."""
    return coefficient_of_variation(torch.stack(counts_per_layer).sum(0))


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio ``max(load) / mean(load) - 1`` of per-expert loads (counts or fractions)."""
    return counts.float().max() / counts.float().mean() - 1


def topk_overlap(indices: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[N]`` shares ``|S_n ∩ R_n| / k`` of each token's chosen experts ``indices [N, k]`` found in ``reference [N, k]``."""
    if indices.shape != reference.shape:
        raise ValueError(f"expert index shapes differ: {tuple(indices.shape)} vs reference {tuple(reference.shape)}")
    return (indices.unsqueeze(-1) == reference.unsqueeze(-2)).any(-1).float().mean(-1)


@torch.no_grad()
def router_saturation(model, final_model, batches) -> list[float]:
    """Per layer: mean over the tokens of ``batches`` of :func:`topk_overlap` (``model`` vs ``final_model``).

    OLMoE's router saturation: 1 means the checkpoint already routes every token to the final
    model's experts. Both models run in eval mode (no router noise) on the same tokens.
    """
    states = (model.training, final_model.training)
    model.eval(), final_model.eval()
    device = next(model.parameters()).device
    sums: list[float] = []
    count = 0
    for x, *_ in batches:
        x = x.to(device)
        pairs = list(zip(model(x).routing, final_model(x).routing))
        if any(r.token_indices is not None for pair in pairs for r in pair):
            raise ValueError("router_saturation needs token-choice routers; expert choice has no per-token top-k")
        overlaps = [topk_overlap(r.expert_indices, f.expert_indices).sum().item() for r, f in pairs]
        sums = overlaps if not sums else [a + b for a, b in zip(sums, overlaps)]
        count += x.numel()
    model.train(states[0]), final_model.train(states[1])
    if count == 0:
        raise ValueError("router_saturation saw no tokens: batches is empty")
    return [s / count for s in sums]


@torch.no_grad()
def layer_routing_stats(routing: RoutingResult) -> LayerRoutingStats:
    entropy = routing_entropy(routing.probs).item()
    utilization = expert_utilization(routing.expert_indices, routing.num_experts)
    if routing.logits is None:  # the random router has no logits
        mean_lse = max_abs = float("nan")
    else:
        mean_lse = mean_logsumexp(routing.logits)
        max_abs = routing.logits.abs().max().item()
    return LayerRoutingStats(
        entropy=entropy,
        normalized_entropy=entropy / math.log(routing.num_experts) if routing.num_experts > 1 else 0.0,
        utilization=utilization.tolist(),
        utilization_std=utilization.std(unbiased=False).item(),
        utilization_cv=coefficient_of_variation(utilization).item(),
        mean_logsumexp=mean_lse,
        max_abs_logit=max_abs,
        dropped_fraction=float(routing.dropped_fraction),
    )


def top_k_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> tuple[int, int]:
    """``(hits, count)``: how many valid targets are among the top-k logits, and how many are valid."""
    valid = targets != -100
    top = logits.topk(k, dim=-1).indices
    hits = (top == targets.unsqueeze(-1)).any(-1) & valid
    return int(hits.sum()), int(valid.sum())


def perplexity(loss: float) -> float:
    """``exp(loss)``, inf past overflow."""
    return math.exp(loss) if loss < 700 else float("inf")


# A run is flagged as overfitting when its last periodic validation loss is more than this
# above its best. 0.01 nats is 1% perplexity: the size of the smallest effects the course's
# verdicts report (gpu: noise 0.1 -1.8%, z-loss 0.001 +1.1%), so a larger rise could bias a
# final-model comparison as much as the effect itself. The periodic validations all use the same
# batches, so the rise is the model's change, not sampling noise.
OVERFIT_MARGIN_NATS = 0.01


def overfitting(val_losses: Sequence[float], margin: float = OVERFIT_MARGIN_NATS) -> dict[str, float | bool]:
    """``val_loss_rise_from_best = last - min`` of the periodic validation losses (0 while the
    run still improves), and ``overfit``: whether that rise exceeds ``margin`` nats."""
    losses = [float(v) for v in val_losses]
    if not losses:
        raise ValueError("overfitting needs at least one validation loss; got none")
    rise = losses[-1] - min(losses)
    return {"val_loss_rise_from_best": rise, "overfit": bool(rise > margin)}


def _real_slots(r: RoutingResult, valid: torch.Tensor | None):
    """Mask of ``r.expert_indices``' slots that belong to real tokens: ``valid[n]`` for token
    choice's ``[N, k]``, ``valid[token_indices]`` for expert choice's ``[E, C]``."""
    if valid is None:
        return slice(None)
    valid = valid.to(r.expert_indices.device)
    if r.token_indices is not None:
        return valid[r.token_indices]
    return valid.unsqueeze(-1).expand_as(r.expert_indices)


class RoutingAccumulator:
    """Accumulates expert counts, entropy and logit magnitude per layer over many batches.

    Used for validation-set statistics: each layer's CV of its counts pooled over the whole
    set, as the original noise study counted at the end, is less noisy than a per-batch CV.
    Dropped fractions are pooled by slots: ``sum_b dropped_b N_b k / sum_b N_b k``.
    """

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []
        self.entropy_sum: list[float] = []
        self.lse_sum: list[float] = []
        self.dropped_sum: list[float] = []
        self.slots: list[int] = []  # tokens routed, padding included (the dropped fraction's weights)
        self.tokens: list[int] = []  # real tokens counted

    @torch.no_grad()
    def add(self, routing: list[RoutingResult], valid: torch.Tensor | None = None) -> None:
        """Add one batch. ``valid`` ``[N]`` (``None``: all) marks real tokens; padding is left out
        of the counts, entropy and logit size. The dropped fraction cannot be split that way
        (the dispatcher reports one number per batch), so it stays pooled over all routed slots."""
        if not self.counts:
            self.counts = [torch.zeros(r.num_experts, dtype=torch.long) for r in routing]
            self.entropy_sum = [0.0] * len(routing)
            self.lse_sum = [0.0] * len(routing)
            self.dropped_sum = [0.0] * len(routing)
            self.slots = [0] * len(routing)
            self.tokens = [0] * len(routing)
        for layer, r in enumerate(routing):
            n_routed = r.probs.shape[0]
            self.dropped_sum[layer] += float(r.dropped_fraction) * n_routed  # every batch routes N*k slots, k fixed
            self.slots[layer] += n_routed
            keep = slice(None) if valid is None else valid.to(r.probs.device)
            probs, logits = r.probs[keep], None if r.logits is None else r.logits[keep]
            n = probs.shape[0]
            if n == 0:
                continue
            self.counts[layer] += expert_counts(r.expert_indices[_real_slots(r, valid)], r.num_experts).cpu()
            self.entropy_sum[layer] += routing_entropy(probs).item() * n
            lse = float("nan") if logits is None else mean_logsumexp(logits)
            self.lse_sum[layer] += lse * n
            self.tokens[layer] += n

    def utilization(self) -> list[list[float]]:
        return [(c.float() / c.sum()).tolist() for c in self.counts]

    def cv_per_layer(self) -> list[float]:
        return [coefficient_of_variation(c.float()).item() for c in self.counts]

    def cv_pooled_over_layers(self) -> float:
        """The original noise study's CV: counts of all layers summed per expert, then CV (:func:`pooled_usage_cv`)."""
        return pooled_usage_cv(self.counts).item() if self.counts else float("nan")

    def max_violation_per_layer(self) -> list[float]:
        return [max_violation(c).item() for c in self.counts]

    def entropy_per_layer(self) -> list[float]:
        return [s / n for s, n in zip(self.entropy_sum, self.tokens)]

    def logsumexp_per_layer(self) -> list[float]:
        return [s / n for s, n in zip(self.lse_sum, self.tokens)]

    def dropped_per_layer(self) -> list[float]:
        """Share of routed slots dropped by the capacity limit, per layer, pooled over batches."""
        return [s / n for s, n in zip(self.dropped_sum, self.slots)]
