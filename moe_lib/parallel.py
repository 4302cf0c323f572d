"""Expert parallelism (EP): the experts of every MoE layer spread over ``W`` ranks.

Rank ``r`` holds experts ``[r E/W, (r+1) E/W)``; everything else (attention, norms, router,
embedding) is replicated and trained data-parallel. One MoE layer, on every rank at once::

    1. route its own N tokens locally            -> [N, k] experts and gates
    2. all_to_all  per-expert slot counts        [E] -> [W, E/W]   (who sends me how many)
    3. all_to_all  the token rows, uneven splits [S_send, d] -> [S_recv, d]
    4. the local experts, grouped dispatch        [S_recv, d] -> [S_recv, d]
    5. all_to_all  back, the reverse splits      [S_recv, d] -> [S_send, d]
    6. combine with the gates                     y_n = sum_j g_{n,j} E_{e_{n,j}}(x_n)

Steps 3 and 5 use ``torch.distributed``'s functional autograd all-to-all: the backward of an
all-to-all is the all-to-all with input and output splits swapped, so gradients flow from
each expert back to the rank that owns the token, and from the gates into the local router.
Every rank calls every collective, with empty buffers when it has nothing to send.

Conventions (each chosen so that dropless EP equals single-process training on the global batch):

* Capacity is per source rank, ``C = ceil(cf * N_local * k / E)`` (GShard's groups): a
  rank keeps at most ``C`` slots per expert, so an EP rank's output equals the
  single-process layer's output on that rank's tokens ALONE. Single-process training on the
  global batch queues all ``N`` tokens for one capacity, so with a capacity factor the two
  drop different slots: EP equals single-process training only when dropless.
* Random draws (router noise, the random router): every rank has the same seed and draws for
  the GLOBAL batch, keeping its own rows (:func:`moe_lib.moe.routing.draw_for_rows`), so each
  token gets the noise it gets in one process.
* The load-balancing loss uses the GLOBAL routed fractions ``f`` (one all-reduce of ``[E]``
  counts) and the local mean probabilities ``P^r``: ``L^r = E sum_i f_i P^r_i``. Its mean
  over ranks is exactly the global-batch ``E sum_i f_i P_i``, because ``P = mean_r P^r``.
* Gradients: the data-parallel loss is ``L = mean_r L^r``. DDP averages the replicated
  parameters' gradients. An expert's backward on its owner already SUMS ``dL^r/dW_e`` over
  all ranks' tokens, so :func:`scale_expert_grads` divides it by ``W``.
"""

from __future__ import annotations

import datetime
import inspect
import os
import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .config import RunConfig
from .moe.experts import Experts, capacity_keep_mask, dispatch_grouped, expert_capacity
from .moe.losses import expert_counts
from .moe.model import MoEFeedForward, MoETransformer
from .moe.routing import BatchRows, RoutingResult, draws_random_numbers

EXPERT_PARAM_MARK = ".experts."


def expert_shard(experts: Experts, rank: int, world_size: int) -> Experts:
    """The experts rank ``rank`` owns, ``[rank E/W, (rank+1) E/W)``, as their own :class:`Experts` (copied)."""
    if world_size < 1 or experts.num_experts % world_size:
        raise ValueError(f"world_size={world_size} is invalid: expected a divisor of num_experts={experts.num_experts}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid: expected 0 <= rank < world_size={world_size}")
    local = experts.num_experts // world_size
    with torch.device("meta"):  # no initialisation: it would draw from the global RNG, unlike single-process
        shard = Experts(local, experts.d_model, experts.d_hidden)
    shard.to_empty(device=experts.w_in.device)
    with torch.no_grad():
        shard.w_in.copy_(experts.w_in[rank * local : (rank + 1) * local])
        shard.w_out.copy_(experts.w_out[rank * local : (rank + 1) * local])
    return shard


def send_plan(expert_indices: torch.Tensor, num_experts: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which slots leave, in which order, and how many per expert: ``(order [S], counts [E])``.

    ``order`` lists the kept slots (``n k + j``) sorted by expert, token order inside, which is
    also by owner rank, since rank ``r`` owns a contiguous block of experts. Rank ``r``'s send
    split is ``counts.view(W, E/W)[r].sum()``.
    """
    flat = expert_indices.reshape(-1)
    keep = capacity_keep_mask(expert_indices, num_experts, capacity).reshape(-1)
    order = torch.argsort(flat, stable=True)
    order = order[keep[order]]
    return order, torch.bincount(flat[order], minlength=num_experts)


class ExpertParallelMoE(nn.Module):
    """Drop-in for :class:`MoEFeedForward` whose experts live on ``W`` ranks (see the module docstring)."""

    def __init__(self, layer: MoEFeedForward, group: dist.ProcessGroup | None = None):
        super().__init__()
        if layer.cfg.router == "expert_choice":  # its top-C runs over the whole batch: it would need every rank's tokens
            raise ValueError("ModelConfig.router='expert_choice' is not supported by ExpertParallelMoE: expected 'topk' or 'random'")
        self.cfg, self.group = layer.cfg, group if group is not None else dist.group.WORLD
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.router = layer.router
        self.experts = expert_shard(layer.experts, self.rank, self.world_size)
        self.shared_experts = layer.shared_experts  # replicated: every rank runs them on its own tokens

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingResult]:
        """``valid`` (padding) is unused: only expert choice reads it, and EP refuses expert choice."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [N, d]
        routing = self.router(tokens, rows=self.batch_rows(tokens.shape[0]) if draws_random_numbers(self.router) else None)
        num_tokens, top_k = routing.expert_indices.shape
        num_experts, local = self.cfg.num_experts, self.experts.num_experts
        capacity_factor = self.cfg.capacity_factor if self.training else self.cfg.capacity_factor_eval
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        order, send_counts = send_plan(routing.expert_indices, num_experts, capacity)
        flat_experts = routing.expert_indices.reshape(-1)  # [N k]

        # 2. who sends me how many: recv_counts[s, e'] = slots rank s sends to my local expert e'
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.view(self.world_size, local).sum(1).tolist()
        recv_splits = recv_counts.view(self.world_size, local).sum(1).tolist()

        # 3. token rows to their experts' owners; received rows arrive grouped by source rank
        send = tokens.index_select(0, order // top_k)  # [S_send, d]
        received = all_to_all_single_autograd(send, recv_splits, send_splits, self.group)  # [S_recv, d]

        # 4. the local experts: one "slot" per received row, gate 1 (the gates are applied at home)
        local_expert = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(self.world_size), recv_counts)
        ones = torch.ones(local_expert.shape[0], 1, dtype=received.dtype, device=x.device)
        expert_out, _ = dispatch_grouped(received, local_expert.unsqueeze(1), ones, self.experts)

        # 5. results back home, 6. gate-weighted sum per token
        returned = all_to_all_single_autograd(expert_out, send_splits, recv_splits, self.group)  # [S_send, d]
        gates = routing.gate_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(returned.dtype)
        y = torch.zeros_like(tokens).index_add_(0, order // top_k, returned * gates)

        routing.dropped_fraction = torch.tensor(1.0 - order.numel() / max(flat_experts.numel(), 1), device=x.device)
        routing.load_balancing_loss = self.global_load_balancing_loss(routing.probs, routing.expert_indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens)[0]
        return y.view(shape), routing

    def batch_rows(self, num_tokens: int) -> BatchRows:
        """This rank's rows of the global batch (one all-gather of the ranks' token counts), for the router's random draws.

        Rank ``r``'s tokens are rows ``[sum_{s<r} N_s, sum_{s<=r} N_s)``, as :func:`train_expert_parallel` splits the batch.
        """
        counts = torch.tensor([num_tokens], device=self.experts.w_in.device)
        gathered = [torch.empty_like(counts) for _ in range(self.world_size)]
        dist.all_gather(gathered, counts, group=self.group)
        sizes = torch.cat(gathered).tolist()
        return BatchRows(start=sum(sizes[: self.rank]), total=sum(sizes))

    def global_load_balancing_loss(self, probs: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        """``L^r = (W E / N) sum_i f_i sum_{n on r} p_{n,i}``, ``f`` and ``N`` over ALL ranks' tokens (before capacity).

        Its mean over ranks is the global-batch ``E sum_i f_i P_i`` with ``P_i = (1/N) sum_n p_{n,i}``,
        however unevenly the N tokens are spread; with equal shares it is ``E sum_i f_i P^r_i``.
        """
        num_experts = probs.shape[-1]
        counts = expert_counts(expert_indices, num_experts)
        totals = torch.cat([counts, counts.new_tensor([expert_indices.shape[0]])])
        dist.all_reduce(totals, group=self.group)  # [E + 1]: global slot counts, global number of tokens
        fractions = totals[:-1].to(probs.dtype) / (totals[-1] * expert_indices.shape[1])
        return self.world_size * num_experts * (fractions * probs.sum(dim=0)).sum() / totals[-1]


def shard_model_experts(model: MoETransformer, group: dist.ProcessGroup | None = None) -> MoETransformer:
    """Replace every MoE layer of ``model`` (in place) by its :class:`ExpertParallelMoE` shard on this rank."""
    for block in model.blocks:
        if isinstance(block.ffn, MoEFeedForward):
            block.ffn = ExpertParallelMoE(block.ffn, group)
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert weights: the ones data parallelism must not all-reduce."""
    return [name for name, _ in model.named_parameters() if EXPERT_PARAM_MARK in name]


# --------------------------------------------------------------------------- training with EP
def scale_expert_grads(model: nn.Module, world_size: int) -> None:
    """Divide the expert gradients by ``W``: their backward summed ``dL^r/dW_e`` over ranks; ``L = mean_r L^r``."""
    for name, p in model.named_parameters():
        if EXPERT_PARAM_MARK in name and p.grad is not None:
            p.grad.div_(world_size)


def clip_grad_norm_expert_parallel(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Clip by the norm of the WHOLE model's gradient: ``||g||^2 = ||g_dense||^2 + sum_r ||g_experts^r||^2``;
    return that norm (before clipping; ``max_norm=0`` only computes it).

    The replicated (already averaged) gradients are the same on every rank and count once; each
    rank's expert shard is different and the squares are summed over ranks.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    dense = [p.grad for n, p in named if EXPERT_PARAM_MARK not in n]
    experts = [p.grad for n, p in named if EXPERT_PARAM_MARK in n]
    expert_sq = nn.utils.get_total_norm(experts).square() if experts else torch.zeros(())
    dist.all_reduce(expert_sq, group=group)
    total = (nn.utils.get_total_norm(dense).square() + expert_sq).sqrt()
    if max_norm > 0:
        nn.utils.clip_grads_with_norm_([p for _, p in named], max_norm, total)
    return total


def ep_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return torch.device("cpu")


def expert_parallel_model(config: RunConfig, device: torch.device):
    """Every rank: the single-process model of seed ``config.train.seed``, experts sharded, the rest in DDP.

    Returns ``(model, ddp, ep_group)``: call ``ddp`` forward, read and step ``model``'s parameters.
    The all-to-alls get their own process group, so they never interleave with DDP's all-reduces.
    """
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(config.train.seed)  # the same initial weights on every rank, and as in train_run
    model = MoETransformer(config.model).to(device)
    ep_group = dist.new_group(backend=dist.get_backend())
    shard_model_experts(model, ep_group)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    # No buffer sync before each forward: the buffers are identical on every rank by construction, except the
    # aux-loss-free routers' per-rank token counts, which rank 0's copy must not overwrite (syncing at init is harmless:
    # they start at 0). torch 2.13 renamed the switch; older releases only have broadcast_buffers.
    no_forward_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else {"broadcast_buffers": False}
    return model, DistributedDataParallel(model, **no_forward_sync), ep_group


def train_expert_parallel(config: RunConfig, data=None) -> list[dict[str, float]]:
    """Train ``config`` with experts sharded over the ranks of the default process group.

    Every rank draws the same global batch (same seeded generator as :func:`moe_lib.training.loop.train_run`)
    and keeps its ``batch_size / W`` rows; the replicated parameters are DDP-averaged, the expert
    shards are not (DDP ignores them) and get :func:`scale_expert_grads`. Returns the per-step
    losses averaged over ranks and the pre-clip gradient norm of the whole model. When dropless,
    these are single-process training's on the global batch (``train_run``'s history); with a
    capacity factor EP applies capacity per source rank (GShard's groups), one process to the
    whole batch, so the dropped slots, and the numbers, differ.
    """
    import dataclasses
    import functools

    from .training.loop import init_train_state, load_data, train_step
    from .training.precision import resolve_precision

    world, rank = dist.get_world_size(), dist.get_rank()
    tcfg = config.train
    if tcfg.batch_size % world:
        raise ValueError(f"batch_size={tcfg.batch_size} is invalid: expected a multiple of the world size {world}")
    device = ep_device()
    precision = resolve_precision(tcfg.precision, device)
    if precision.dtype == torch.float16:
        # each rank's GradScaler would find infs, and skip steps, on its own: the replicas would drift apart
        raise ValueError(f"precision={tcfg.precision!r} resolves to fp16 + GradScaler here, which expert-parallel training "
                         "does not support; use 'bf16' or 'fp32'")
    data = data if data is not None else load_data(config.data)
    if config.model.vocab_size != data.vocab_size:
        config = config.with_model(vocab_size=data.vocab_size)
    model, ddp, ep_group = expert_parallel_model(config, device)
    # the single-process train_step, with EP's differences as its hooks: forward through DDP, this rank's rows of
    # the global batch, expert gradients divided by W, and the clip by the whole model's norm over all ranks.
    # Aux-loss-free biases: loads all-reduced over ranks, so every replica keeps the same bias; every step is
    # taken (no GradScaler: fp16 is refused above), so the bias moves after every step.
    state = dataclasses.replace(
        init_train_state(config, device, model=model), forward=ddp, data_shard=(rank, world),
        after_backward=functools.partial(scale_expert_grads, model, world),
        clip_grad_norm=functools.partial(clip_grad_norm_expert_parallel, model),
    )
    rows = []
    for step in range(tcfg.steps):
        out = train_step(state, data.train.tokens, step)
        losses = out.losses.clone()  # this rank's mean over its micro-batches
        dist.all_reduce(losses)
        total, lm, lb, z = (losses / world).tolist()
        rows.append({"step": step + 1, "train_loss": total, "lm_loss": lm, "lb_loss": lb, "z_loss": z, "grad_norm": out.grad_norm.item()})
    dist.destroy_process_group(ep_group)
    return rows


# --------------------------------------------------------------------------- launching
def init_from_env(timeout_s: float = 120.0) -> None:
    """``dist.init_process_group`` from torchrun's environment: NCCL when CUDA is there, else gloo."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def torchrun_main(config: RunConfig) -> list[dict[str, float]]:
    """The body of ``torchrun --nproc-per-node W -m moe_lib ep``: train, print rank 0's table."""
    init_from_env()
    try:
        rows = train_expert_parallel(config)
        if dist.get_rank() == 0:
            print(f"expert parallel: world_size={dist.get_world_size()} backend={dist.get_backend()}")
            for row in rows:
                print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return rows
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world_size: int, port: int, timeout_s: float, queue, fn, args: tuple) -> None:
    """One spawned rank: join a gloo group on localhost, run ``fn(*args)``, hand back its result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        # plain pickle copies tensors by value; the queue's own pickler would hand over shared
        # memory that disappears with this process
        queue.put((rank, pickle.dumps(fn(*args))))
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks (fresh processes); return each rank's result.

    ``fn`` must live in an importable module (spawn re-imports it; a notebook's own functions
    do not qualify). A rank that raises ends all of them at once with its traceback
    (``torch.multiprocessing.ProcessRaisedException``); past ``timeout_s`` every rank is killed
    and :class:`TimeoutError` raised, so nothing ever hangs.
    """
    import socket
    import time

    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: expected an integer >= 1")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_spawned, (world_size, port, timeout_s, queue, fn, args), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    while not ctx.join(timeout=0.2):
        while not queue.empty():
            rank, value = queue.get()
            results[rank] = pickle.loads(value)
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise TimeoutError(f"expert-parallel ranks still running after timeout_s={timeout_s}; all {world_size} killed")
    while not queue.empty():
        rank, value = queue.get()
        results[rank] = pickle.loads(value)
    return [results[r] for r in range(world_size)]
