"""Experts and dispatch: how routed tokens reach their experts and come back.

All E experts are SwiGLU feed-forward networks stored as stacked tensors, so the whole set
is two parameters: ``w_in [E, d, 2h]`` (gate and up projections side by side) and
``w_out [E, h, d]``. One expert computes ``E_e(x) = (silu(x W_gate) * (x W_up)) W_down``.

The layer output is ``y_n = sum_{j<k} g_{n,j} E_{e_{n,j}}(x_n)``. Two ways to compute it:

* :func:`dispatch_loop` - the reference, as most tutorials (and Hugging Face's Mixtral
  block) write it: a Python loop over experts, each gathering its tokens.
* :func:`dispatch_grouped` - loop-free: sort the ``N*k`` token slots by expert, run ONE
  grouped matmul per projection over the contiguous per-expert segments
  (``torch._grouped_mm``), and scatter the weighted results back to their tokens.
  In bf16 on CPU the segments are padded to a few fixed sizes and multiplied with one
  ``bmm`` instead (:func:`padded_grouped_matmul`).

Where the time goes (``benchmarks/bench_moe.py``): with fine-grained experts the matmuls are
small, so everything around them - the gather, the activation, the gate multiply, the
scatter, and their backward passes - moves as many bytes as the matmuls do useful work.
The fast path therefore avoids every pass over ``[N*k, .]`` tensors that it can; each trick
is explained where it is used.

Capacity (GShard/Switch): with a capacity factor ``cf`` each expert takes at most
``C = ceil(cf * N * k / E)`` slots; the rest are dropped and the token keeps only its residual
stream. ``capacity_factor=None`` is dropless. Priority as in GShard and ST-MoE: every token's
first choice queues before any token's second choice (and so on), tokens in order within a
choice, so a token loses its top expert only when that expert is full of other first choices.
Both paths apply the same rule (:func:`capacity_keep_mask`), so they agree exactly.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """``ceil(cf * N * k / E)`` slots per expert, or ``None`` (dropless)."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def rank_in_segment(sorted_experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Position of each row inside its expert's segment, for rows sorted by expert:
    ``rank_r = r - start(e_r)`` with ``start(e) = sum_{e' < e} counts[e']``."""
    segment_start = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_experts.numel(), device=sorted_experts.device) - segment_start[sorted_experts]


def queue_position(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[N, k]``: how many slots queue before slot ``(n, j)`` (token n's j-th choice) at its expert.

    GShard / ST-MoE priority: all first choices (j = 0) in token order, then all second
    choices, and so on; slot ``(n, j)`` comes ``(j N + n)``-th in that order overall, and an
    expert's queue is that order restricted to the slots routed to it::

        rank(n, j) = #{(m, i) : e_{m,i} = e_{n,j} and (i < j or (i = j and m < n))}
    """
    num_tokens, top_k = expert_indices.shape
    by_priority = expert_indices.t().reshape(-1)  # [k N]: position j N + n holds e_{n,j}
    order = torch.argsort(by_priority, stable=True)  # grouped by expert, priority order inside
    counts = torch.bincount(by_priority, minlength=num_experts)
    rank = torch.empty_like(order).scatter_(0, order, rank_in_segment(by_priority[order], counts))
    return rank.view(top_k, num_tokens).t()


def capacity_keep_mask(expert_indices: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """``[N, k]`` booleans: which routed slots an expert with ``capacity`` slots accepts.

    The first ``capacity`` slots of each expert's queue (:func:`queue_position`) are kept, the
    rest dropped: ``keep <=> rank(n, j) < C``. ``None`` keeps every slot. Both dispatchers apply
    this rule.
    """
    if capacity is None:
        return torch.ones_like(expert_indices, dtype=torch.bool)
    return queue_position(expert_indices, num_experts) < capacity


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights ``w_in [E, d, 2h]`` and ``w_out [E, h, d]``."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, out_std: float | None = None):
        super().__init__()
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02 if out_std is None else out_std)

    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.d_hidden

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}"


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` on the last dimension."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    """:func:`swiglu` with a hand-written backward that writes ``[d gate | d up]`` into ONE buffer.

    Autograd's own backward of ``h.chunk(2)`` -> ``silu`` -> ``*`` produces the two halves of
    the gradient as separate tensors and then concatenates them (a full extra read and write of
    ``[rows, 2h]``), and it recomputes nothing it could have kept. Here the forward keeps
    ``silu(gate)``, and the backward fills the two halves of a single ``[rows, 2h]`` tensor in
    place, which the grouped matmul's backward then reads as one contiguous operand::

        d up   = g * silu(gate)
        d gate = silu'(gate) * (g * up)      # aten.silu_backward, written in place

    The arithmetic is exactly autograd's, so the results are bit-identical to :func:`swiglu`.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(h, silu_gate)
        return silu_gate * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, silu_gate = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty(h.shape, dtype=grad.dtype, device=grad.device)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.mul(grad, silu_gate, out=d_up)
        torch.mul(grad, up, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        return dh


def swiglu_fused(h: torch.Tensor) -> torch.Tensor:
    """Same values and gradients as :func:`swiglu`, fewer memory passes (see :class:`SwiGLUFunction`)."""
    if not torch.is_grad_enabled() or not h.requires_grad:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)  # inference: one temporary instead of two
    return SwiGLUFunction.apply(h)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would use for a matmul here (autocast does not cover ``_grouped_mm``)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _grouped_mm_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm(a, w, offs=...)`` can run here; else :func:`grouped_matmul` loops.

    Two conditions. (1) The kernel exists for this device and dtype: tried once on a tiny
    input, the answer cached (:func:`_grouped_mm_runs`). The attribute alone says nothing:
    torch 2.8 has no CPU kernel, and CUDA's need bf16 on recent GPUs. (2) Rows and base
    pointers are 16-byte aligned, which the kernel requires of every call.
    """
    align = 16 // a.element_size()
    aligned = a.shape[-1] % align == 0 and w.shape[-1] % align == 0 and a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    return aligned and _grouped_mm_runs(a.device, a.dtype)


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """One tiny aligned ``torch._grouped_mm`` on ``device`` in ``dtype``: does it run and match a loop?"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    a = (torch.arange(4 * 16, device=device) % 3).to(dtype).view(4, 16)  # 2 segments of 2 rows; small
    w = (torch.arange(2 * 16 * 16, device=device) % 2).to(dtype).view(2, 16, 16)  # integers: exact in any dtype
    try:
        out = torch._grouped_mm(a, w, offs=torch.tensor([2, 4], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return torch.equal(out, torch.cat([a[:2] @ w[0], a[2:] @ w[1]]))


PAD_BLOCK = 128


def padded_grouped_matmul(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, block: int = PAD_BLOCK) -> torch.Tensor:
    """:func:`grouped_matmul` as one ``bmm`` over segments padded to ``C`` rows, ``C`` the largest
    segment rounded up to a multiple of ``block``.

    For bf16 on CPU. There, matmuls run as JIT-compiled oneDNN kernels specialised to their
    shapes; the segment sizes change every step with the routing, so ``_grouped_mm`` (and a
    loop) compile new kernels every step, which measured 7x slower than fixed sizes. Padding
    leaves only a handful of shapes, each compiled once, for some zero rows of extra work::

        slot of row r (expert e, r-th of its segment) = e * C + r
    """
    num_experts = w.shape[0]
    capacity = max(block, -(-int(counts.max()) // block) * block)
    expert = torch.repeat_interleave(torch.arange(num_experts, device=a.device), counts)
    slot = expert * capacity + rank_in_segment(expert, counts)
    padded = a.new_zeros(num_experts * capacity, a.shape[-1]).index_copy(0, slot, a)
    out = torch.bmm(padded.view(num_experts, capacity, -1), w)
    return out.view(num_experts * capacity, -1).index_select(0, slot)


def grouped_matmul(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Segment e of ``a`` (``counts[e]`` rows, in order) times ``w[e]``: ``[S, d] x [E, d, m] -> [S, m]``.

    One ``torch._grouped_mm`` call where supported, padded ``bmm`` for 16-bit floats on CPU
    (see :func:`padded_grouped_matmul`), else a loop over the segments.
    """
    if a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16) and a.shape[0] > 0:
        return padded_grouped_matmul(a, w, counts)
    if _grouped_mm_ok(a, w):
        return torch._grouped_mm(a, w, offs=offsets)
    pieces = torch.split(a, counts.tolist())
    return torch.cat([piece @ w[e] for e, piece in enumerate(pieces)], dim=0)


def dispatch_grouped(
    x: torch.Tensor,
    expert_indices: torch.Tensor,
    gate_weights: torch.Tensor,
    experts: Experts,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort slots by expert -> grouped SwiGLU -> weighted scatter-add. Returns ``(y, dropped_fraction)``.

    The speed tricks, each measured in ``benchmarks/bench_moe.py`` (``benchmarks/README.md``):

    * Gathers use ``index_select``, never ``x[idx]``: both copy the same rows forward, but the
      backward of advanced indexing is an accumulating ``index_put_`` (serial on CPU, about
      7x slower here), while ``index_select``'s backward is an ``index_add_``.
    * Cast to the matmul dtype BEFORE gathering, so the cast touches ``N`` rows, not ``N*k``.
    * The activation is :func:`swiglu_fused`: its backward writes ``[d gate | d up]`` into
      one buffer instead of two halves plus a concatenation.
    * The scatter stays ``index_add_`` of the gate-weighted rows: on CPU it is a single pass,
      and un-permuting (``out[inverse]``) then a k-way sum or ``bmm`` measured slower.
    """
    num_tokens, top_k = expert_indices.shape
    num_experts = experts.num_experts
    flat_experts = expert_indices.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)  # slots grouped by expert, token order inside
    counts = torch.bincount(flat_experts, minlength=num_experts)
    num_slots = flat_experts.numel()
    if capacity is not None:
        keep = capacity_keep_mask(expert_indices, num_experts, capacity).reshape(-1)  # [N k]
        order = order[keep.index_select(0, order)]  # kept slots, still grouped, token order inside
        counts = counts.clamp(max=capacity)
    dropped = 1.0 - order.numel() / num_slots if num_slots else 0.0

    dtype = _matmul_dtype(x)
    token_of_slot = order // top_k
    tokens = x.to(dtype).index_select(0, token_of_slot)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    hidden = swiglu_fused(grouped_matmul(tokens, experts.w_in.to(dtype), counts, offsets))
    out_slots = grouped_matmul(hidden, experts.w_out.to(dtype), counts, offsets)
    slot_gates = gate_weights.reshape(-1).index_select(0, order)
    out_slots = out_slots * slot_gates.unsqueeze(-1).to(out_slots.dtype)
    y = torch.zeros(num_tokens, x.shape[-1], dtype=out_slots.dtype, device=x.device)
    y.index_add_(0, token_of_slot, out_slots)
    return y.to(x.dtype), torch.tensor(dropped, device=x.device)


def dispatch_loop(
    x: torch.Tensor,
    expert_indices: torch.Tensor,
    gate_weights: torch.Tensor,
    experts: Experts,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: for each expert, gather its slots (those :func:`capacity_keep_mask` keeps), run it, add back."""
    top_k = expert_indices.shape[-1]
    flat_experts = expert_indices.reshape(-1)
    flat_gates = gate_weights.reshape(-1)
    keep = capacity_keep_mask(expert_indices, experts.num_experts, capacity).reshape(-1)
    y = torch.zeros_like(x)
    kept = 0
    for e in range(experts.num_experts):
        slots = torch.nonzero((flat_experts == e) & keep).squeeze(-1)
        if slots.numel() == 0:
            continue
        kept += slots.numel()
        token_ids = slots // top_k
        expert_out = swiglu(x[token_ids] @ experts.w_in[e]) @ experts.w_out[e]
        y.index_add_(0, token_ids, (expert_out * flat_gates[slots].unsqueeze(-1)).to(y.dtype))
    num_slots = flat_experts.numel()
    dropped = 1.0 - kept / num_slots if num_slots else 0.0
    return y, torch.tensor(dropped, device=x.device)


DISPATCHERS = {"grouped": dispatch_grouped, "loop": dispatch_loop}


def dispatch_expert_choice(
    x: torch.Tensor,
    token_indices: torch.Tensor,
    gate_weights: torch.Tensor,
    experts: Experts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice: expert e runs on the C tokens it picked, ``token_indices [E, C]``.

    Every segment has the same length C, so one ``bmm`` per projection does all experts.
    ``y_n = sum_{e picked n} g_{e,n} E_e(x_n)``. Returns ``(y, dropped)`` with ``dropped`` the
    share of the N tokens that no expert picked (they keep only their residual stream).
    """
    num_experts, capacity = token_indices.shape
    dtype = _matmul_dtype(x)
    flat_tokens = token_indices.reshape(-1)
    tokens = x.to(dtype).index_select(0, flat_tokens).view(num_experts, capacity, -1)  # [E, C, d]
    hidden = swiglu_fused(torch.bmm(tokens, experts.w_in.to(dtype)))  # [E, C, h]
    out = torch.bmm(hidden, experts.w_out.to(dtype)) * gate_weights.unsqueeze(-1).to(dtype)  # [E, C, d]
    y = torch.zeros(x.shape[0], x.shape[-1], dtype=dtype, device=x.device)
    y.index_add_(0, flat_tokens, out.reshape(-1, x.shape[-1]))
    picked = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device).index_fill_(0, flat_tokens, True)
    return y.to(x.dtype), 1.0 - picked.float().mean()
