"""Training, evaluation and generation for one run.

``train_run(config)`` builds the data and the model from a :class:`RunConfig`, trains for
``config.train.steps`` optimizer steps and returns a :class:`TrainResult`: the model, a
per-step history DataFrame and a flat dict of final metrics. Everything random is seeded
from ``config.train.seed``: initialisation, data order, router noise and random routing.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .config import RunConfig, TrainConfig
from .metrics import RoutingAccumulator, layer_routing_stats, perplexity, top_k_accuracy
from .model import MoETransformer, count_parameters
from .perf import configure_cpu_allocator
from .versions import library_versions

# --------------------------------------------------------------------------- device and precision


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit choice must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; valid here: 'cpu' or 'auto'")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device='mps' was requested but MPS is not available; valid here: 'cpu' or 'auto'")
    return torch.device(requested)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default (``auto``), on CPU only when asked (``bf16``)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- optimizers and schedule


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW, or the original's hybrid of Muon and AdamW.

    Hybrid split: Muon (``torch.optim.Muon``) takes the 2-D weight matrices of the hidden
    layers - attention ``qkv``/``proj`` and dense FFN projections - because it orthogonalises
    each update matrix, which only makes sense for a matrix acting on a hidden state. AdamW
    takes the rest: the embedding (a lookup table, tied to the LM head), RMSNorm gains,
    the router (a tiny E x d classifier whose logit scale we want AdamW to control), and
    the stacked expert weights ``[E, d, h]``, which ``torch.optim.Muon`` refuses because they
    are 3-D. Weight decay applies to matrices only, never to gains.
    """
    decay, no_decay, muon = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hidden_matrix = p.ndim == 2 and "embed" not in name and "lm_head" not in name and "router" not in name
        if cfg.optimizer == "muon" and is_hidden_matrix:
            muon.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=_fused_adamw_ok(decay + no_decay))
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if muon:
        optimizers.append(torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers


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


# --------------------------------------------------------------------------- evaluation


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
    """Token-weighted loss and accuracies over ``batches`` of ``(x, y)``; routing pooled over all of them."""
    was_training = model.training
    model.eval()
    loss_sum, hits1, hits3, count = 0.0, 0, 0, 0
    routing = RoutingAccumulator()
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            out = model(x, y)
        n_valid = int((y != -100).sum())
        loss_sum += out.lm_loss.item() * n_valid
        h1, _ = top_k_accuracy(out.logits, y, 1)
        h3, _ = top_k_accuracy(out.logits, y, 3)
        hits1, hits3, count = hits1 + h1, hits3 + h3, count + n_valid
        if out.routing:
            routing.add(out.routing)
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation saw no tokens: the split is shorter than one window")
    loss = loss_sum / count
    return EvalResult(loss, perplexity(loss), hits1 / count, hits3 / count, count, routing)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    model: MoETransformer
    config: RunConfig
    history: pd.DataFrame
    metrics: dict[str, Any]
    data: Any  # moe_lib.data.PreparedData

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 40, seed: int = 0) -> str:
        return generate_text(self.model, self.data.tokenizer, prompt, max_new_tokens, temperature, top_k, seed)


def generate_text(model, tokenizer, prompt: str, max_new_tokens=200, temperature=0.8, top_k=40, seed=0) -> str:
    """Decode a sampled continuation of ``prompt`` (seeded, so it is reproducible)."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tokenizer.decode(out[0].tolist())


@functools.lru_cache(maxsize=4)
def _cached_data(data_cfg):
    from .data import prepare_data

    return prepare_data(data_cfg)


def load_data(data_cfg):
    """:func:`moe_lib.data.prepare_data`, memoised per process (configs are frozen, hence hashable)."""
    return _cached_data(data_cfg)


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated since the run's reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if platform.system() == "Darwin" else rss / 1e6  # bytes on macOS, KiB on Linux


def _routing_columns(prefix: str, stats) -> dict[str, float]:
    row: dict[str, float] = {}
    for layer, s in enumerate(stats):
        row[f"{prefix}entropy_L{layer}"] = s.entropy
        row[f"{prefix}norm_entropy_L{layer}"] = s.normalized_entropy
        row[f"{prefix}cv_L{layer}"] = s.utilization_cv
        row[f"{prefix}util_std_L{layer}"] = s.utilization_std
        row[f"{prefix}logsumexp_L{layer}"] = s.mean_logsumexp
        row[f"{prefix}max_logit_L{layer}"] = s.max_abs_logit
        row[f"{prefix}dropped_L{layer}"] = s.dropped_fraction
        for e, u in enumerate(s.utilization):
            row[f"{prefix}util_L{layer}_E{e}"] = u
    return row


def _check_finite(step: int, out) -> None:
    if not torch.isfinite(out.loss):
        raise FloatingPointError(
            f"non-finite loss at optimizer step {step}: total={out.loss.item()}, lm={out.lm_loss.item()}, "
            f"load_balancing={out.load_balancing_loss.item()}, z={out.z_loss.item()}"
        )


def _progress_bar(cfg: TrainConfig, desc: str):
    """A text tqdm bar: redraws in place in terminals and notebooks alike, at most once a second."""
    from tqdm.std import tqdm

    return tqdm(total=cfg.steps, desc=desc, disable=not cfg.progress, leave=False, mininterval=1.0, dynamic_ncols=True)


def train_run(
    config: RunConfig,
    *,
    run_id: str = "run",
    checkpoint_dir: str | Path | None = None,
    data=None,
    profile: str | None = None,
) -> TrainResult:
    """Train one model as ``config`` says and evaluate it on validation and test."""
    from .data import eval_batches, sample_batch

    data = data if data is not None else load_data(config.data)
    if config.model.vocab_size != data.vocab_size:
        config = config.with_model(vocab_size=data.vocab_size)
    tcfg, mcfg = config.train, config.model
    device = resolve_device(tcfg.device)
    if device.type == "cpu":
        configure_cpu_allocator()  # recycle freed tensor memory: see moe_lib.perf

    torch.manual_seed(tcfg.seed)
    model = MoETransformer(mcfg).to(device)
    optimizers = build_optimizer(model, tcfg)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    data_gen = torch.Generator().manual_seed(tcfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def val_batches(max_batches):
        return eval_batches(data.val.tokens, tcfg.seq_len, tcfg.batch_size, max_batches=max_batches)

    rows: list[dict[str, Any]] = []
    best_val = float("inf")
    tokens_per_step = tcfg.tokens_per_step
    step_times: list[float] = []
    bar = _progress_bar(tcfg, run_id)
    model.train()
    train_start = time.perf_counter()
    for step in range(tcfg.steps):
        t0 = time.perf_counter()
        factor = lr_factor(step, tcfg)
        for opt, lrs in zip(optimizers, base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * factor
        sums = torch.zeros(4, device=device)  # total, lm, lb, z
        for _ in range(tcfg.grad_accum_steps):
            x, y = sample_batch(data.train.tokens, tcfg.batch_size, tcfg.seq_len, data_gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device, tcfg.precision):
                out = model(x, y)
            _check_finite(step, out)
            (out.loss / tcfg.grad_accum_steps).backward()
            sums += torch.stack([out.loss, out.lm_loss, out.load_balancing_loss, out.z_loss]).detach().float()
        if tcfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t0)

        is_last = step == tcfg.steps - 1
        if step % tcfg.log_every == 0 or is_last or (step + 1) % tcfg.eval_every == 0:
            total, lm, lb, z = (sums / tcfg.grad_accum_steps).tolist()
            row = {
                "step": step + 1,
                "tokens": (step + 1) * tokens_per_step,
                "lr": tcfg.lr * factor,
                "train_loss": total,
                "lm_loss": lm,
                "lb_loss": lb,
                "z_loss": z,
                "tokens_per_s": tokens_per_step / step_times[-1],
            }
            row.update(_routing_columns("", [layer_routing_stats(r) for r in out.routing]))
            if (step + 1) % tcfg.eval_every == 0 or is_last:
                val = evaluate(model, val_batches(tcfg.eval_batches), device, tcfg.precision)
                best_val = min(best_val, val.loss)
                row.update(val_loss=val.loss, val_perplexity=val.perplexity, val_accuracy=val.accuracy, val_top3_accuracy=val.top3_accuracy)
            rows.append(row)
            bar.set_postfix(loss=f"{lm:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - train_start

    final_val = evaluate(model, val_batches(tcfg.final_eval_batches), device, tcfg.precision)
    test_batches = eval_batches(data.test.tokens, tcfg.seq_len, tcfg.batch_size, max_batches=tcfg.final_eval_batches)
    test = evaluate(model, test_batches, device, tcfg.precision)
    best_val = min(best_val, final_val.loss)
    history = pd.DataFrame(rows)
    steady = step_times[1:] or step_times  # the first step pays one-off warm-up costs
    counts = count_parameters(model)
    cvs, entropies = final_val.routing.cv_per_layer(), final_val.routing.entropy_per_layer()
    metrics: dict[str, Any] = {
        "val_loss": final_val.loss,
        "val_perplexity": final_val.perplexity,
        "val_accuracy": final_val.accuracy,
        "val_top3_accuracy": final_val.top3_accuracy,
        "best_val_loss": best_val,
        "best_val_perplexity": perplexity(best_val),
        "test_loss": test.loss,
        "test_perplexity": test.perplexity,
        "test_accuracy": test.accuracy,
        "test_top3_accuracy": test.top3_accuracy,
        "expert_usage_cv": sum(cvs) / len(cvs) if cvs else float("nan"),
        "router_entropy": sum(entropies) / len(entropies) if entropies else float("nan"),
        "router_logsumexp": _mean(final_val.routing.logsumexp_per_layer()),
        "dropped_fraction": _mean(final_val.routing.dropped_per_layer()),
        "training_time_minutes": train_seconds / 60,
        "ms_per_step": 1000 * sum(steady) / len(steady),
        "tokens_per_second": tokens_per_step * len(steady) / sum(steady),
        "peak_memory_gb": peak_memory_gb(device),
        "total_params": counts.total,
        "active_params": counts.active,
        "train_tokens": tcfg.steps * tokens_per_step,
        "device": _device_name(device),
        "precision": tcfg.precision,
        "profile": profile or "custom",
        "corpus": config.data.corpus,
        "tokenizer": config.data.tokenizer,
        "vocab_size": data.vocab_size,
        **{f"{k}_version": v for k, v in library_versions().items()},
    }
    dropped = final_val.routing.dropped_per_layer()
    for layer, (cv, h, drop) in enumerate(zip(cvs, entropies, dropped)):
        metrics[f"val_cv_L{layer}"] = cv
        metrics[f"val_entropy_L{layer}"] = h
        metrics[f"val_util_std_L{layer}"] = cv / mcfg.num_experts  # std = CV * mean, mean = 1/E
        metrics[f"val_dropped_L{layer}"] = drop
    result = TrainResult(model=model, config=config, history=history, metrics=metrics, data=data)
    if checkpoint_dir is not None:
        from .checkpoint import save_checkpoint

        save_checkpoint(model, config, metrics, checkpoint_dir)
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type
