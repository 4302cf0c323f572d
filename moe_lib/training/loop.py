"""One training run: the loop, its one training step, and the run's final metrics.

``train_run(config)`` builds the data and the model from a :class:`RunConfig`, trains for
``config.train.steps`` optimizer steps and returns a :class:`TrainResult`: the model, a
per-step history DataFrame and a flat dict of final metrics. Everything random is seeded
from ``config.train.seed``: initialisation, data order, router noise and random routing.

The run, top to bottom (each step a function below)::

    PeakMemory.start -> init_train_state -> train_loop -> final_evaluation -> run_metrics -> save_checkpoint
    train_loop:  steps x train_step [+ history_row, evaluate every eval_every]
    train_step:  forward_backward (micro-batches) -> [after_backward] -> optimizer_step (clip, step, zero, next LR)

``train_step`` is the only training step in the project: expert parallelism
(:func:`moe_lib.parallel.train_expert_parallel`) and the benchmark (``benchmarks/bench_moe.py``)
take theirs through it, changing only what :class:`TrainState`'s hooks say.

The optimizers and the schedule live in :mod:`.optim`, evaluation in :mod:`.evaluate`, the device
and the memory measurements in :mod:`.system`.
"""

from __future__ import annotations

import functools
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from tqdm.std import tqdm

from ..config import RunConfig, TrainConfig
from ..data import prepare_data, sample_batch
from ..metrics import layer_routing_stats, overfitting, perplexity
from ..moe.model import MoETransformer, count_parameters
from ..moe.routing import update_expert_biases
from ..versions import library_versions
from .checkpoint import save_checkpoint
from .evaluate import EvalResult, evaluate, final_evaluation, validation_batches
from .optim import build_optimizer, lr_schedulers
from .precision import Precision, resolve_precision
from .precision import optimizer_step as scaled_optimizer_step
from .system import PeakMemory, configure_cpu_allocator, resolve_device

# --------------------------------------------------------------------------- results, data and generation


@dataclass
class TrainResult:
    model: MoETransformer
    config: RunConfig
    history: pd.DataFrame
    metrics: dict[str, Any]
    data: Any  # moe_lib.data.PreparedData
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> state dict (checkpoint_steps)

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
    return prepare_data(data_cfg)


def load_data(data_cfg):
    """:func:`moe_lib.data.prepare_data`, memoised per process (configs are frozen, hence hashable)."""
    return _cached_data(data_cfg)


# --------------------------------------------------------------------------- one training run, step by step


@dataclass
class TrainState:
    """What a run changes while it trains: the model, its optimizers and the data order.

    The last four fields are the hooks by which expert parallelism (:mod:`moe_lib.parallel`)
    takes the same :func:`train_step`; their defaults are single-process training.
    """

    config: RunConfig
    device: torch.device
    model: MoETransformer
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]  # one per optimizer: warmup + cosine (moe_lib.training.optim)
    data_gen: torch.Generator  # draws the training batches
    dropped_sum: torch.Tensor  # [layers]: training dropped fraction summed over micro-batches
    precision: Precision  # bf16, or fp16 + GradScaler without native bf16 (moe_lib.training.precision)
    scaler: torch.amp.GradScaler  # disabled unless fp16
    forward: Callable[..., Any] | None = None  # what computes model(x, y); None: the model. EP: its DDP wrapper
    data_shard: tuple[int, int] = (0, 1)  # (index, count): train on rows chunk(count)[index] of each batch. EP: (rank, W)
    after_backward: Callable[[], None] | None = None  # runs once the micro-batches' gradients are summed. EP: scale_expert_grads
    clip_grad_norm: Callable[[float], torch.Tensor] | None = None  # (max_norm) -> pre-clip norm, clipping in place;
    # None: the global norm of the model's gradients. EP: clip_grad_norm_expert_parallel (the norm over all ranks)


@dataclass
class StepOutput:
    """One optimizer step: losses averaged over its micro-batches, the last micro-batch's routing."""

    losses: torch.Tensor  # [4]: total, lm, lb, z (lb and z: unweighted sums over layers)
    routing: list
    lr: float  # AdamW's LR in this step (Muon's is muon_lr / lr times it)
    seconds: float
    grad_norm: torch.Tensor  # global gradient norm before clipping (on the device; read on logging steps only)


@dataclass
class TrainLog:
    """What the loop records: the history rows, every step's wall time, the best periodic validation
    (all on the same first ``eval_batches`` validation batches)."""

    rows: list[dict[str, Any]]
    step_times: list[float]
    seconds: float
    best_val_loss: float
    snapshots: dict[int, dict[str, torch.Tensor]]  # after each of TrainConfig.checkpoint_steps


def init_train_state(config: RunConfig, device: torch.device, model: MoETransformer | None = None) -> TrainState:
    """Seed, build the model on ``device`` and its optimizers, and the data-order generator.

    One seed covers everything: ``torch.manual_seed`` before initialisation (and so router
    noise and random routing after it), a separate CPU generator for the batch order.
    ``model``: one already built that way (expert parallelism's, experts sharded), used as is.
    """
    if model is None:
        torch.manual_seed(config.train.seed)
        model = MoETransformer(config.model).to(device)
    optimizers = build_optimizer(model, config.train)
    precision = resolve_precision(config.train.precision, device)
    return TrainState(
        config=config,
        device=device,
        model=model.train(),
        optimizers=optimizers,
        schedulers=lr_schedulers(optimizers, config.train),
        data_gen=torch.Generator().manual_seed(config.train.seed),
        dropped_sum=torch.zeros((), device=device),
        precision=precision,
        scaler=precision.grad_scaler(device),
    )


def forward_backward(state: TrainState, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> tuple[torch.Tensor, list]:
    """Forward and backward over the micro-batches, each adding ``grad(loss_m) / M`` to ``.grad``.

    With ``M`` equal micro-batches the gradient is that of their mean loss: one batch ``M``
    times larger, except for the load-balancing loss, which each micro-batch computes from its
    own expert fractions (as each device does in Switch). Returns the losses
    ``[total, lm, lb, z]`` averaged over the micro-batches and the last one's routing.
    """
    device, accum = state.device, len(micro_batches)
    forward = state.model if state.forward is None else state.forward
    sums = torch.zeros(4, device=device)
    for x, y in micro_batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with state.precision.autocast(device):
            out = forward(x, y)
        _check_finite(step, out)
        state.scaler.scale(out.loss / accum).backward()
        sums += torch.stack([out.loss, out.lm_loss, out.load_balancing_loss, out.z_loss]).detach().float()
        if out.routing:  # slots the training capacity dropped, per layer
            state.dropped_sum = state.dropped_sum + torch.stack([torch.as_tensor(r.dropped_fraction, device=device) for r in out.routing])
    return sums / accum, out.routing


def optimizer_step(state: TrainState) -> torch.Tensor:
    """Unscale (fp16), clip the global gradient norm to ``grad_clip`` (0 = off), step every optimizer,
    clear the gradients (:func:`moe_lib.training.precision.optimizer_step`); then the aux-loss-free expert
    biases follow this step's loads (:func:`moe_lib.moe.routing.update_expert_biases`), unless the fp16
    GradScaler skipped the step: the bias then stays, as the weights do. Last, every LR scheduler moves
    to the next step's LR (a skipped step counts too, as in the original). Returns the pre-clip gradient norm."""
    step = scaled_optimizer_step(state.optimizers, state.scaler, state.model.parameters(), state.config.train.grad_clip,
                                 clip_grad_norm=state.clip_grad_norm)
    update_expert_biases(state.model, step_taken=step.taken)  # aux-loss-free balancing: this step's loads, all micro-batches
    with warnings.catch_warnings():
        # a GradScaler-skipped first step makes LambdaLR warn that it stepped before the optimizer: intended here
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
        for scheduler in state.schedulers:
            scheduler.step()
    return step.grad_norm


def train_step(state: TrainState, train_tokens: torch.Tensor, step: int) -> StepOutput:
    """Optimizer step ``step`` (0-based): accumulate gradients, update; the LR is the schedulers' for ``step``."""
    t0 = time.perf_counter()
    tcfg = state.config.train
    if step != state.schedulers[0].last_epoch:
        raise ValueError(f"step={step} is invalid: this state's LR schedulers are at optimizer step {state.schedulers[0].last_epoch}, "
                         "which must come next (steps run in order from 0)")
    lr = state.optimizers[0].param_groups[0]["lr"]
    micro_batches = [sample_batch(train_tokens, tcfg.batch_size, tcfg.seq_len, state.data_gen) for _ in range(tcfg.grad_accum_steps)]
    index, count = state.data_shard
    if count > 1:  # this rank's rows of the global batch
        micro_batches = [(x.chunk(count)[index], y.chunk(count)[index]) for x, y in micro_batches]
    losses, routing = forward_backward(state, micro_batches, step)
    if state.after_backward is not None:
        state.after_backward()
    grad_norm = optimizer_step(state)
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)  # so that the step time is the step's
    return StepOutput(losses, routing, lr, time.perf_counter() - t0, grad_norm)


def history_row(state: TrainState, step: int, out: StepOutput) -> dict[str, Any]:
    """One row of the history: step, tokens, LR, losses, speed and the last micro-batch's routing."""
    tcfg = state.config.train
    total, lm, lb, z = out.losses.tolist()
    row = {
        "step": step + 1,
        "tokens": (step + 1) * tcfg.tokens_per_step,
        "lr": out.lr,
        "train_loss": total,
        "lm_loss": lm,
        "lb_loss": lb,
        "z_loss": z,
        "grad_norm": out.grad_norm.item(),  # before clipping
        "tokens_per_s": tcfg.tokens_per_step / out.seconds,
    }
    row.update(_routing_columns("", [layer_routing_stats(r) for r in out.routing]))
    return row


def train_loop(state: TrainState, data, run_id: str) -> TrainLog:
    """``steps`` optimizer steps; a history row every ``log_every`` steps, a validation every ``eval_every``.

    The last step is always logged and validated.
    """
    tcfg = state.config.train
    rows: list[dict[str, Any]] = []
    step_times: list[float] = []
    best_val = float("inf")
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    bar = _progress_bar(tcfg, run_id)
    start = time.perf_counter()
    for step in range(tcfg.steps):
        out = train_step(state, data.train.tokens, step)
        step_times.append(out.seconds)
        is_last = step == tcfg.steps - 1
        validate = (step + 1) % tcfg.eval_every == 0 or is_last
        if step % tcfg.log_every == 0 or validate:
            row = history_row(state, step, out)
            if validate:
                val = evaluate(state.model, validation_batches(data, tcfg, tcfg.eval_batches), state.device, tcfg.precision)
                best_val = min(best_val, val.loss)
                row.update(val_loss=val.loss, val_perplexity=val.perplexity, val_accuracy=val.accuracy, val_top3_accuracy=val.top3_accuracy)
            rows.append(row)
            bar.set_postfix(loss=f"{row['lm_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step + 1 in tcfg.checkpoint_steps:
            snapshots[step + 1] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        bar.update(1)
    bar.close()
    return TrainLog(rows, step_times, time.perf_counter() - start, best_val, snapshots)


def run_metrics(
    state: TrainState, data, log: TrainLog, val: EvalResult, test: EvalResult, memory: PeakMemory, profile: str | None
) -> dict[str, Any]:
    """The flat dict of a run's final numbers, one results-CSV row.

    ``val_*`` and ``test_*`` are the final model on ``final_eval_batches`` batches of each
    split (the whole split by default). ``best_val_*`` is the best of the periodic validations
    during training, ALL on the same first ``eval_batches`` validation batches, the last step's
    included; it is comparable with the history's ``val_loss``, not with ``val_loss`` here.
    """
    config, tcfg, mcfg, device = state.config, state.config.train, state.config.model, state.device
    steady = log.step_times[1:] or log.step_times  # the first step pays one-off warm-up costs
    counts = count_parameters(state.model)
    steps_seen = tcfg.steps * tcfg.grad_accum_steps
    train_dropped = (state.dropped_sum / steps_seen).reshape(-1).tolist() if mcfg.is_moe else []
    cvs, entropies = val.routing.cv_per_layer(), val.routing.entropy_per_layer()
    metrics: dict[str, Any] = {
        "val_loss": val.loss,
        "val_perplexity": val.perplexity,
        "val_accuracy": val.accuracy,
        "val_top3_accuracy": val.top3_accuracy,
        "best_val_loss": log.best_val_loss,
        "best_val_perplexity": perplexity(log.best_val_loss),
        **overfitting([row["val_loss"] for row in log.rows if "val_loss" in row]),  # val_loss_rise_from_best, overfit
        "test_loss": test.loss,
        "test_perplexity": test.perplexity,
        "test_accuracy": test.accuracy,
        "test_top3_accuracy": test.top3_accuracy,
        "expert_usage_cv": _mean(cvs),  # per-layer CV, mean over layers
        "expert_usage_cv_pooled": val.routing.cv_pooled_over_layers(),  # the original's: layers' counts summed
        "expert_maxvio": _mean(val.routing.max_violation_per_layer()),
        "router_entropy": _mean(entropies),
        "router_logsumexp": _mean(val.routing.logsumexp_per_layer()),
        "val_dropped_fraction": _mean(val.routing.dropped_per_layer()),  # at capacity_factor_eval
        "train_dropped_fraction": _mean(train_dropped),  # at capacity_factor, mean over training
        "training_time_minutes": log.seconds / 60,
        "ms_per_step": 1000 * sum(steady) / len(steady),
        "tokens_per_second": tcfg.tokens_per_step * len(steady) / sum(steady),
        "peak_memory_gb": memory.gb(),
        "peak_memory_measure": memory.measure,
        "total_params": counts.total,
        "active_params": counts.active,
        "train_tokens": tcfg.steps * tcfg.tokens_per_step,
        "device": _device_name(device),
        "precision": tcfg.precision,  # as requested ("auto" by default)
        "precision_used": state.precision.name,  # what ran: fp32, bf16 or fp16 (moe_lib.training.precision.resolve_precision)
        "profile": profile or "custom",
        "corpus": config.data.corpus,
        "tokenizer": config.data.tokenizer,
        "vocab_size": data.vocab_size,
        **{f"{k}_version": v for k, v in library_versions().items()},
    }
    for layer, (cv, h, drop) in enumerate(zip(cvs, entropies, val.routing.dropped_per_layer())):
        metrics[f"val_cv_L{layer}"] = cv
        metrics[f"val_entropy_L{layer}"] = h
        metrics[f"val_util_std_L{layer}"] = cv / mcfg.num_experts  # std = CV * mean, mean = 1/E
        metrics[f"val_dropped_L{layer}"] = drop
    for layer, drop in enumerate(train_dropped):
        metrics[f"train_dropped_L{layer}"] = drop
    metrics.update({f"val_maxvio_L{layer}": v for layer, v in enumerate(val.routing.max_violation_per_layer())})
    return metrics


def train_run(
    config: RunConfig,
    *,
    run_id: str = "run",
    checkpoint_dir: str | Path | None = None,
    data=None,
    profile: str | None = None,
) -> TrainResult:
    """Train one model as ``config`` says and evaluate it on validation and test."""
    data = data if data is not None else load_data(config.data)
    if config.model.vocab_size != data.vocab_size:
        config = config.with_model(vocab_size=data.vocab_size)
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        configure_cpu_allocator()  # recycle freed tensor memory: see moe_lib.training.system
    memory = PeakMemory.start(device)
    state = init_train_state(config, device)
    log = train_loop(state, data, run_id)
    val, test = final_evaluation(state.model, data, state.config.train, state.device)
    metrics = run_metrics(state, data, log, val, test, memory, profile)
    if checkpoint_dir is not None:
        save_checkpoint(state.model, config, metrics, checkpoint_dir)
    return TrainResult(model=state.model, config=config, history=pd.DataFrame(log.rows), metrics=metrics, data=data,
                       snapshots=log.snapshots)


# --------------------------------------------------------------------------- small helpers


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
    return tqdm(total=cfg.steps, desc=desc, disable=not cfg.progress, leave=False, mininterval=1.0, dynamic_ncols=True)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type
