"""The optimizers of a run and their learning-rate schedule.

AdamW, or the original's hybrid of Muon (:mod:`moe_lib.training.muon`) and AdamW; the schedule is a
linear warmup and a cosine down to ``min_lr_ratio`` (:func:`lr_factor`), applied by torch's
``LambdaLR``, one per optimizer (:func:`lr_schedulers`), so that AdamW and Muon each keep their own base LR.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig
from .muon import Muon


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW, or the original's hybrid of Muon and AdamW: ``[adamw]`` or ``[adamw, muon]``.

    Hybrid split (:func:`optimizer_split`), as the original's ``llm.py``: Muon (:mod:`moe_lib.training.muon`)
    takes every weight matrix of the blocks - attention ``qkv``/``proj``, the dense or shared
    experts' projections, the router's gate ``[E, d]`` and the routed experts' stacked weights
    ``[E, d, 2h]``/``[E, h, d]``, each expert's matrix orthogonalised on its own. AdamW takes the
    rest: the embedding (a lookup table, tied to the LM head; an untied head too) with weight
    decay, and the RMSNorm gains without. The aux-loss-free expert bias is a buffer, moved by its
    own rule (:func:`moe_lib.moe.routing.update_expert_biases`), not by an optimizer. The router's gate
    on Muon (the original's choice) moves each step by an orthogonalised update of a fixed size,
    not AdamW's: its logits' growth, which the z-loss study measures, follows from that.
    """
    params, split = dict(model.named_parameters()), optimizer_split(model, cfg)
    decay, no_decay, muon = ([params[name] for name in split[key]] for key in ("adamw, decay", "adamw, no decay", "muon"))
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=_fused_adamw_ok(decay + no_decay))
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if muon:
        optimizers.append(Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def optimizer_split(model: nn.Module, cfg: TrainConfig) -> dict[str, list[str]]:
    """The names of the trainable parameters each optimizer takes: ``muon``, ``adamw, decay``, ``adamw, no decay``.

    Muon: the 2-D and stacked 3-D matrices except the embedding and the LM head (only with
    ``cfg.optimizer == "muon"``). AdamW with weight decay: the other matrices. Without: 1-D gains.
    """
    split: dict[str, list[str]] = {"muon": [], "adamw, decay": [], "adamw, no decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_block_matrix = p.ndim in (2, 3) and "embed" not in name and "lm_head" not in name
        if cfg.optimizer == "muon" and is_block_matrix:
            split["muon"].append(name)
        elif p.ndim >= 2:
            split["adamw, decay"].append(name)
        else:
            split["adamw, no decay"].append(name)
    return split


def _fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """Use the fused AdamW kernel (one pass over each tensor instead of about a dozen).

    On CPU PyTorch's default AdamW updates parameter by parameter with separate elementwise
    ops; ``fused=True`` measured 7x faster for the gpu-profile model (110 M parameters) on the
    2-core benchmark machine (``benchmarks/RESULTS.md``). Same update rule, same state dict.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Linear warmup ``(s+1)/W`` for ``s < W``, then a cosine from 1 down to ``min_lr_ratio``
    reached exactly at the last step ``S-1``: ``m + (1-m) (1 + cos(pi t)) / 2`` with
    ``t = (s-W)/(S-1-W)``.
    """
    warmup, last = cfg.warmup_steps, cfg.steps - 1
    if step < warmup:
        return (step + 1) / warmup
    t = 1.0 if last == warmup else min(1.0, (step - warmup) / (last - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def lr_schedulers(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig) -> list[LambdaLR]:
    """One ``LambdaLR`` per optimizer: every param group's LR = its own base LR x :func:`lr_factor`.

    Built, each sets its groups to step 0's LR; ``scheduler.step()`` after each optimizer step
    moves them to the next step's. AdamW's base is ``cfg.lr``, Muon's ``cfg.muon_lr``.
    """
    factor = functools.partial(lr_factor, cfg=cfg)
    return [LambdaLR(opt, factor) for opt in optimizers]
