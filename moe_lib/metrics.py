"""What we measure about routing and about the language model.

Routing, per layer, from a :class:`~moe_lib.routing.RoutingResult`:

* entropy ``H = mean_n(-sum_i p_{n,i} ln p_{n,i})`` of the router's distribution, in nats, and
  normalised by its maximum ``ln E`` (1 = uniform, 0 = one-hot). For the random router the
  distribution it samples from is uniform, so H = ln E exactly.
* utilization ``u_i = count_i / (N k)``: the share of routed slots each expert received;
  ``std(u)`` (population) and the coefficient of variation ``CV = std(u) / mean(u) = E std(u)``.
* logit magnitude: ``mean_n logsumexp(logits_n)`` (what z-loss squares) and ``max |logit|``.
* dropped fraction: the share of the ``N k`` routed slots that a capacity limit turned away
  (``ModelConfig.capacity_factor``; 0 when dropless). A dropped slot adds no expert output,
  so its token keeps only the residual stream for that slot.

Language model: cross-entropy, perplexity ``exp(loss)`` and top-k accuracy, ignoring
targets of -100 (padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .losses import expert_counts, mean_logsumexp
from .routing import RoutingResult


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


class RoutingAccumulator:
    """Accumulates expert counts, entropy and logit magnitude per layer over many batches.

    Used for validation-set statistics: the CV of the pooled counts over the whole set, as
    the original noise study computed it at the end, is less noisy than a per-batch CV.
    Dropped fractions are pooled by slots: ``sum_b dropped_b N_b k / sum_b N_b k``.
    """

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []
        self.entropy_sum: list[float] = []
        self.lse_sum: list[float] = []
        self.dropped_sum: list[float] = []
        self.tokens: list[int] = []

    @torch.no_grad()
    def add(self, routing: list[RoutingResult]) -> None:
        if not self.counts:
            self.counts = [torch.zeros(r.num_experts, dtype=torch.long) for r in routing]
            self.entropy_sum = [0.0] * len(routing)
            self.lse_sum = [0.0] * len(routing)
            self.dropped_sum = [0.0] * len(routing)
            self.tokens = [0] * len(routing)
        for layer, r in enumerate(routing):
            n = r.probs.shape[0]
            self.counts[layer] += expert_counts(r.expert_indices, r.num_experts).cpu()
            self.entropy_sum[layer] += routing_entropy(r.probs).item() * n
            lse = float("nan") if r.logits is None else mean_logsumexp(r.logits)
            self.lse_sum[layer] += lse * n
            self.dropped_sum[layer] += float(r.dropped_fraction) * n  # every batch routes N*k slots, k fixed
            self.tokens[layer] += n

    def utilization(self) -> list[list[float]]:
        return [(c.float() / c.sum()).tolist() for c in self.counts]

    def cv_per_layer(self) -> list[float]:
        return [coefficient_of_variation(c.float()).item() for c in self.counts]

    def entropy_per_layer(self) -> list[float]:
        return [s / n for s, n in zip(self.entropy_sum, self.tokens)]

    def logsumexp_per_layer(self) -> list[float]:
        return [s / n for s, n in zip(self.lse_sum, self.tokens)]

    def dropped_per_layer(self) -> list[float]:
        """Share of routed slots dropped by the capacity limit, per layer, pooled over batches."""
        return [s / n for s, n in zip(self.dropped_sum, self.tokens)]
