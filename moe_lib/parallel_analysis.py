"""Expert parallelism, measured and checked: what it costs and whether it computes what one process computes.

* :func:`check_layer_against_single_process` - run on every rank: :class:`~moe_lib.parallel.ExpertParallelMoE`
  against :class:`~moe_lib.moe.model.MoEFeedForward` on the same weights (outputs and every gradient);
* :func:`all_to_all_seconds` - run on every rank: the measured time of one all-to-all;
* :func:`rank_loads`, :func:`straggler_factor`, :func:`comm_compute_ratio` - what EP costs, from the
  routing statistics and the machine's speeds (no process group needed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .moe.experts import expert_capacity
from .moe.losses import expert_counts
from .moe.model import MoEFeedForward
from .parallel import EXPERT_PARAM_MARK, ExpertParallelMoE


# --------------------------------------------------------------------------- checking
def check_layer_against_single_process(
    cfg, tokens_per_rank: list[int], seed: int = 0, starve_expert: int | None = None, lb_weight: float = 0.1
) -> dict[str, Any]:
    """Run on every rank: compare :class:`ExpertParallelMoE` with :class:`MoEFeedForward` on the same weights.

    Rank ``r`` gets ``tokens_per_rank[r]`` random tokens (uneven loads allowed). The single-process
    reference routes the global batch once, drawing router noise or random experts from the same
    seed as the ranks do, and runs each rank's tokens through the dispatch with that rank's
    capacity (per source rank, as EP applies it). The loss is ``L^r = <y^r, w^r> + lb_weight * L_lb^r``;
    the reference sums ``<y^s, w^s>`` over all tokens and adds ``lb_weight * W * L_lb`` of the global
    batch (``sum_r L_lb^r = W L_lb``). ``starve_expert`` makes that expert's router row hugely
    negative on every token, so it receives no tokens.

    Returns ``compared``: name -> ``(EP value, single-process value)`` for this rank's output and
    input gradient, the load-balancing loss (mean over ranks) and every parameter's gradient (the
    replicated ones summed over ranks, the experts this rank's shard); and the dropped fraction
    and the global per-expert slot counts.
    """
    import copy

    world, rank = dist.get_world_size(), dist.get_rank()
    if len(tokens_per_rank) != world:
        raise ValueError(f"tokens_per_rank={tokens_per_rank} is invalid: expected {world} entries, one per rank")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = MoEFeedForward(cfg)
    x_all = torch.randn(sum(tokens_per_rank), cfg.d_model, generator=gen)
    w_all = torch.randn(sum(tokens_per_rank), cfg.d_model, generator=gen)
    if starve_expert is not None:
        with torch.no_grad():
            x_all[:, 0] = x_all[:, 0].abs() + 3.0
            layer.router.weight[starve_expert, 0] = -10.0
    starts = [sum(tokens_per_rank[:r]) for r in range(world + 1)]
    pieces = [slice(starts[r], starts[r + 1]) for r in range(world)]

    torch.manual_seed(seed + 1)  # the routers' random draws: one stream, the same in the reference and on every rank
    ref_x = x_all.clone().requires_grad_()
    ref_routing = layer.router(ref_x)  # the global batch, routed as one process routes it
    ref_y = torch.cat([_dispatch_piece(layer, ref_x[p], ref_routing.expert_indices[p], ref_routing.gate_weights[p]) for p in pieces])
    ((ref_y * w_all).sum() + lb_weight * world * ref_routing.load_balancing_loss).backward()

    ep = ExpertParallelMoE(copy.deepcopy(layer))
    torch.manual_seed(seed + 1)
    x = x_all[pieces[rank]].clone().requires_grad_()
    y, routing = ep(x)
    ((y * w_all[pieces[rank]]).sum() + lb_weight * routing.load_balancing_loss).backward()
    lb = routing.load_balancing_loss.detach().clone()
    dist.all_reduce(lb)
    compared = {
        "output": (y.detach(), ref_y[pieces[rank]].detach()),
        "input_grad": (x.grad, ref_x.grad[pieces[rank]]),
        "load_balancing": (lb / world, ref_routing.load_balancing_loss.detach()),
    }
    local = ep.experts.num_experts
    reference = dict(layer.named_parameters())
    for name, p in ep.named_parameters():
        grad = p.grad.clone()
        if EXPERT_PARAM_MARK in f".{name}":  # this rank's shard of the experts
            expected = reference[name].grad[rank * local : (rank + 1) * local]
        else:  # replicated: each rank holds the gradient of its own tokens' loss
            dist.all_reduce(grad)
            expected = reference[name].grad
        compared[f"{name}.grad"] = (grad, expected)
    return {
        "compared": compared,
        "dropped_fraction": float(routing.dropped_fraction),
        "expert_counts": expert_counts(ref_routing.expert_indices, cfg.num_experts).tolist(),
    }


def _dispatch_piece(layer: MoEFeedForward, tokens: torch.Tensor, expert_indices: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """``layer``'s output for ``tokens`` routed as given, with the capacity of a batch of these tokens alone."""
    capacity = expert_capacity(tokens.shape[0], layer.cfg.top_k, layer.cfg.num_experts, layer.cfg.capacity_factor)
    y, _ = layer.dispatch(tokens, expert_indices, gate_weights, layer.experts, capacity)
    return y if layer.shared_experts is None else y + layer.shared_experts(tokens)[0]


def all_to_all_seconds(values_per_peer: list[int], repeats: int = 5) -> list[float]:
    """Run on every rank: median wall time of one ``all_to_all_single`` of ``W * v`` fp32 values, per ``v``."""
    import time

    world = dist.get_world_size()
    seconds = []
    for values in values_per_peer:
        send = torch.randn(world * values)
        recv = torch.empty_like(send)
        times = []
        for _ in range(repeats + 1):  # the first call warms the connection up
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            times.append(time.perf_counter() - t0)
        seconds.append(sorted(times[1:])[len(times[1:]) // 2])
    return seconds


# --------------------------------------------------------------------------- what EP costs
def rank_loads(utilization: torch.Tensor, world_size: int) -> torch.Tensor:
    """Share of all slots each rank's experts receive: ``[..., E]`` expert shares -> ``[..., W]`` (contiguous blocks)."""
    num_experts = utilization.shape[-1]
    if world_size < 1 or num_experts % world_size:
        raise ValueError(f"world_size={world_size} is invalid: expected a divisor of num_experts={num_experts}")
    return utilization.reshape(*utilization.shape[:-1], world_size, num_experts // world_size).sum(-1)


def straggler_factor(utilization: torch.Tensor, world_size: int) -> torch.Tensor:
    """``max_r load_r / mean_r load_r``: how much longer the busiest rank's experts run than a balanced rank's."""
    loads = rank_loads(utilization, world_size)
    return loads.max(-1).values / loads.mean(-1)


def comm_compute_ratio(d_hidden: float, bytes_per_value: float, flops_per_s: float, bytes_per_s: float) -> float:
    """Time in all-to-alls over time in expert matmuls, per token and MoE layer, forward plus backward.

    Communication: 4 all-to-alls (dispatch and combine, each twice) of ``k d`` values each,
    ``4 k d b`` bytes. Compute: a SwiGLU expert is ``6 d h`` FLOPs forward per slot, three times
    that with the backward, ``18 k d h``. The ratio ``(4 k d b / B) / (18 k d h / F) = 2 b F / (9 h B)``
    depends on neither ``k`` nor ``d``: only on the expert width and the machine.
    """
    return 2 * bytes_per_value * flops_per_s / (9 * d_hidden * bytes_per_s)
