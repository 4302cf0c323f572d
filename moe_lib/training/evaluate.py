"""Evaluation: token-weighted loss, perplexity and accuracies of a model on held-out batches.

Used by the training loop for its periodic validations (the same first ``eval_batches``
validation batches every time) and for the final validation and test numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..data import eval_batches
from ..metrics import RoutingAccumulator, perplexity, top_k_accuracy
from ..moe.model import MoETransformer
from .precision import autocast_context


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    accuracy: float
    top3_accuracy: float
    tokens: int
    routing: RoutingAccumulator


@torch.no_grad()
def evaluate(model: MoETransformer, batches, device: torch.device, precision: str = "auto") -> EvalResult:
    """Token-weighted loss and accuracies over ``batches`` of ``(x, y)``; routing pooled over all of them.

    Padding positions (target -100) count nowhere: not in the loss, the accuracies or the
    routing statistics. Evaluation runs on a fork of the global RNG (the random router draws
    from it), so evaluating, however often, leaves the training run's random stream alone.
    """
    was_training = model.training
    model.eval()
    loss_sum, hits1, hits3, count = 0.0, 0, 0, 0
    routing = RoutingAccumulator()
    with _forked_rng(device):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast_context(device, precision):
                out = model(x, y)
            valid = y != -100
            n_valid = int(valid.sum())
            loss_sum += out.lm_loss.item() * n_valid
            h1, _ = top_k_accuracy(out.logits, y, 1)
            h3, _ = top_k_accuracy(out.logits, y, 3)
            hits1, hits3, count = hits1 + h1, hits3 + h3, count + n_valid
            if out.routing:
                routing.add(out.routing, valid=valid.reshape(-1))
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation saw no tokens: the split is shorter than one window")
    loss = loss_sum / count
    return EvalResult(loss, perplexity(loss), hits1 / count, hits3 / count, count, routing)


def _forked_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU generator and, on an accelerator, ``device``'s."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def validation_batches(data, tcfg: TrainConfig, max_batches: int | None):
    return eval_batches(data.val.tokens, tcfg.seq_len, tcfg.batch_size, max_batches=max_batches)


def final_evaluation(model: MoETransformer, data, tcfg: TrainConfig, device: torch.device) -> tuple[EvalResult, EvalResult]:
    """The trained model on validation and test: ``final_eval_batches`` batches each (``None``: the whole split)."""
    val = evaluate(model, validation_batches(data, tcfg, tcfg.final_eval_batches), device, tcfg.precision)
    test_batches = eval_batches(data.test.tokens, tcfg.seq_len, tcfg.batch_size, max_batches=tcfg.final_eval_batches)
    return val, evaluate(model, test_batches, device, tcfg.precision)
