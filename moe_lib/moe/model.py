"""A small LLaMA-style decoder whose feed-forward blocks are Mixtures of Experts.

    tokens -> embedding -> n_layers x [ x + Attn(RMSNorm(x)) ; x + FFN(RMSNorm(x)) ] -> RMSNorm -> LM head

* Attention: causal, multi-head, rotary position embeddings, ``F.scaled_dot_product_attention``.
* FFN: an MoE block (router -> dispatch -> SwiGLU experts) or, for the dense baseline, one
  SwiGLU of width ``k * d_ff`` so that both spend the same FLOPs per token.
* Loss: ``L = L_lm + w_lb * sum_layers(L_lb) + w_z * sum_layers(L_z)``: each MoE layer adds its
  own weighted auxiliary terms, as in Switch, ST-MoE and the original noise study (see
  :mod:`moe_lib.moe.losses` for the convention). The weights are taken from the config and applied
  here, so a weight of 0 really removes its term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .experts import DISPATCHERS, Experts, dispatch_expert_choice, expert_capacity, swiglu_fused
from .routing import RoutingResult, build_router


# --------------------------------------------------------------------------- attention
def rotary_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim/2]`` for angles ``t * theta^(-2i/head_dim)``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of ``x [B, H, T, D]`` by its position's angle.

    In fp32/fp64 on CPU or CUDA, as Meta's LLaMA does: each pair is one complex number, rotated by
    one complex multiply ``(x_2i + i x_2i+1) (cos + i sin)``. The real form's values up to float
    round-off, but one kernel forward and one backward instead of about a dozen (slices, four
    products, a stack, and their backwards): 2.5x faster at the cpu profile's shape.
    16-bit floats have no complex dtype, so they take the real form.
    """
    if x.dtype in (torch.float32, torch.float64) and x.device.type in ("cpu", "cuda"):
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.complex(cos.to(x.dtype), sin.to(x.dtype))).flatten(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, d_model))


# --------------------------------------------------------------------------- feed-forward
class DenseFeedForward(nn.Module):
    """One SwiGLU ``(silu(x W_gate) * x W_up) W_down``: the dense baseline."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """``valid`` is unused: a dense FFN treats every token alike (the MoE block's signature)."""
        return self.w_out(swiglu_fused(self.w_in(x))), None


class GatedSharedExperts(nn.Module):
    """Qwen2-MoE's gated shared expert: ``sigmoid(x w_s) * S(x)``, a per-token scalar gate in (0, 1).

    ``S`` is the shared SwiGLU and ``w_s`` a learned ``d``-vector (``nn.Linear(d, 1)``): the
    token decides how much of the always-on expert it takes (``ModelConfig.shared_expert_gate``).
    """

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.ffn = DenseFeedForward(d_model, d_hidden)
        self.gate = nn.Linear(d_model, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.sigmoid(self.gate(x)) * self.ffn(x)[0], None


def build_shared_experts(cfg: ModelConfig) -> nn.Module | None:
    """The ``num_shared_experts`` shared experts as one SwiGLU of width ``s d_ff`` (gated if ``cfg.shared_expert_gate``), or None."""
    if not cfg.num_shared_experts:
        return None
    width = cfg.num_shared_experts * cfg.d_ff
    return GatedSharedExperts(cfg.d_model, width) if cfg.shared_expert_gate else DenseFeedForward(cfg.d_model, width)


class MoEFeedForward(nn.Module):
    """Router -> dispatch -> experts (+ shared experts). Returns the output and the :class:`RoutingResult`.

    ``num_shared_experts = s`` dense SwiGLU experts of width ``d_ff`` see every token:
    ``y = routed(x) + sum_s S_s(x)``, computed as one SwiGLU of width ``s d_ff`` (the same
    function: its hidden units are the s experts' side by side), as torchtitan does; with
    ``shared_expert_gate`` the shared sum is scaled by ``sigmoid(x w_s)`` (:class:`GatedSharedExperts`).

    The capacity factor is ``cfg.capacity_factor`` in training mode and ``cfg.capacity_factor_eval``
    in eval mode (``model.eval()``). ``valid [N]`` marks real tokens (False: evaluation padding);
    only expert choice uses it, to keep padding out of its top-C.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_ff)
        self.dispatch = DISPATCHERS[cfg.dispatch]
        self.shared_experts = build_shared_experts(cfg)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingResult]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens, valid=valid) if self.cfg.router == "expert_choice" else self.router(tokens)
        if routing.token_indices is not None:  # expert choice: each expert already holds its C tokens
            y, dropped = dispatch_expert_choice(tokens, routing.token_indices, routing.gate_weights, self.experts)
        else:
            capacity_factor = self.cfg.capacity_factor if self.training else self.cfg.capacity_factor_eval
            capacity = expert_capacity(tokens.shape[0], self.cfg.top_k, self.cfg.num_experts, capacity_factor)
            y, dropped = self.dispatch(tokens, routing.expert_indices, routing.gate_weights, self.experts, capacity)
        routing.dropped_fraction = dropped
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens)[0]
        return y.view(shape), routing


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg) if cfg.is_moe else DenseFeedForward(cfg.d_model, cfg.top_k * cfg.d_ff)

    def forward(self, x, cos, sin, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingResult | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        ffn_out, routing = self.ffn(self.ffn_norm(x), valid)
        return x + ffn_out, routing


# --------------------------------------------------------------------------- model
@dataclass
class ModelOutput:
    """Logits plus every loss term. ``loss`` is what the optimiser sees.

    ``load_balancing_loss`` and ``z_loss`` are unweighted SUMS over the MoE layers (the terms
    the weights multiply); each layer's own value is in ``routing[i]``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    routing: list[RoutingResult]


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.endswith("router.weight"):
                continue  # norms keep ones; the router keeps its own init
            is_residual_out = name.endswith(("proj.weight", "w_out", "w_out.weight"))
            nn.init.normal_(p, std=residual_std if is_residual_out else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        seq = idx.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed(idx)
        # Evaluation padding (target -100; training windows have none, and None spares expert choice a host sync)
        valid = targets.reshape(-1) != -100 if targets is not None and not self.training else None
        routing: list[RoutingResult] = []
        for block in self.blocks:
            x, layer_routing = block(x, cos, sin, valid)
            if layer_routing is not None:
                routing.append(layer_routing)
        logits = self.lm_head(self.norm(x))

        zero = logits.new_zeros((), dtype=torch.float32)
        lb = torch.stack([r.load_balancing_loss for r in routing]).sum() if routing else zero  # sum, not mean
        z = torch.stack([r.z_loss for r in routing]).sum() if routing else zero
        lm_loss = loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            loss = lm_loss
            if self.cfg.load_balancing_weight > 0:
                loss = loss + self.cfg.load_balancing_weight * lb
            if self.cfg.z_loss_weight > 0:
                loss = loss + self.cfg.z_loss_weight * z
        return ModelOutput(logits, loss, lm_loss, lb, z, routing)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx [B, T]``; temperature 0 is greedy."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a number >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k!r} is invalid: expected None or an integer >= 1")
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.max_seq_len :]).logits[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        self.train(was_training)
        return idx


# --------------------------------------------------------------------------- parameter counts
@dataclass(frozen=True)
class ParameterCounts:
    """Total parameters, and the ones a single token actually uses (k of E experts, all shared ones)."""

    total: int
    active: int
    embedding: int
    experts: int
    active_experts: int
    router: int
    shared_experts: int = 0

    @property
    def active_fraction(self) -> float:
        return self.active / self.total


def count_parameters(model: MoETransformer) -> ParameterCounts:
    """``active = total - n_layers * (E - k) * params_per_expert`` (tied weights counted once).

    Shared experts are dense, so every one of their parameters is active.
    """
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())  # .parameters() de-duplicates tied weights
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    router = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared_experts." in n)
    active_experts = experts * cfg.top_k // cfg.num_experts if cfg.is_moe else 0
    return ParameterCounts(
        total=total,
        active=total - experts + active_experts,
        embedding=model.embed.weight.numel(),
        experts=experts,
        active_experts=active_experts,
        router=router,
        shared_experts=shared,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, ``3 x forward`` with ``forward = 2 N_active + 2 n_layers T d`` (Kaplan et al. 2020).

    ``N_active`` counts the matmul weights one token uses: attention ``4 d^2``, the router
    ``d E``, k routed experts and the shared ones at ``3 d d_ff`` each (or the dense SwiGLU
    ``3 d k d_ff``) and the shared experts' gate ``d`` if any, per layer, plus the LM head ``d V``; ``2 n_layers T d`` is the attention
    scores and their weighted sum. Fine-grained splitting (:func:`~moe_lib.config.fine_grained`)
    changes only the router term. Expert choice is counted at its mean of k experts per token.
    """
    d = cfg.d_model
    if cfg.is_moe:
        ffn = d * cfg.num_experts + 3 * d * cfg.d_ff * (cfg.top_k + cfg.num_shared_experts) + d * cfg.shared_expert_gate
    else:
        ffn = 3 * d * cfg.top_k * cfg.d_ff
    active_matmul = cfg.n_layers * (4 * d * d + ffn) + d * cfg.vocab_size
    return 3 * (2 * active_matmul + 2 * cfg.n_layers * seq_len * d)
