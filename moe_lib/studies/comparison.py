"""The originals next to ours: each original's setup against our grid's (computed from its configs),
how big a profile's model is and how far it trains, and the numbers the originals reported next to ours.
"""

from __future__ import annotations

import functools
import re

import pandas as pd
import torch

from ..config import ModelConfig
from ..moe.model import MoETransformer, count_parameters
from ..profiles import Profile
from ..stats import format_mean_std, mean_std_text
from ..training.loop import load_data
from ..training.optim import build_optimizer, optimizer_split
from . import originals
from .result import StudyResult, paired_table, per_layer
from .run import build_grid
from .verdicts import VERDICT_METRIC


@functools.lru_cache(maxsize=None)
def _parameters(cfg: ModelConfig):
    """Total and active parameters of a model built from ``cfg`` (memoised: configs are frozen)."""
    return count_parameters(MoETransformer(cfg))


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _gate_description(cfg: ModelConfig) -> str:
    """How a token's chosen experts are weighted, in words (see :class:`~moe_lib.config.ModelConfig`)."""
    if cfg.router == "random":
        if cfg.top_k == 1:
            return "random top-1: one expert uniformly at random, weight 1"
        return f"random top-{cfg.top_k}: {cfg.top_k} distinct experts uniformly at random, weight 1/{cfg.top_k} each"
    scores = f"{cfg.score_func} scores over all {cfg.num_experts} experts"
    kept = f"renormalised over the chosen {cfg.top_k}" if cfg.gate_renormalized else "the chosen experts' probabilities, not renormalised"
    return f"top-{cfg.top_k}: {scores}, {kept}"


def _distinct(values) -> list:
    return list(dict.fromkeys(values))


def _optimizer_description(configs) -> str:
    """Which parameters each optimizer trains (over the grid's models, ``blocks.N.`` and ``.weight`` dropped), and how."""
    t, split = configs[0].train, {}
    for model_cfg in _distinct(c.model for c in configs):
        with torch.device("meta"):  # names and shapes only, no memory
            model = MoETransformer(model_cfg)
        for key, names in optimizer_split(model, t).items():
            split.setdefault(key, {}).update(dict.fromkeys(re.sub(r"^blocks\.\d+\.|\.weight$", "", n) for n in names))
    adamw, *muon = build_optimizer(model, t)
    tied = " (tied to the LM head)" if model.cfg.tie_weights else ""
    names = {key: ", ".join(n + tied if n == "embed" else n for n in found) or "nothing" for key, found in split.items()}
    text = (f"AdamW (lr {t.lr:g}, betas {'/'.join(f'{b:g}' for b in adamw.defaults['betas'])}, weight decay {t.weight_decay:g}): "
            f"{names['adamw, decay']}; without decay: {names['adamw, no decay']}")
    if muon:
        m = muon[0].defaults
        scale = "0.2 sqrt(max(rows, cols))" if m["adjust_lr_fn"] == "match_rms_adamw" else "sqrt(max(1, rows / cols))"
        text = (f"Muon (lr {t.muon_lr:g} x {scale} per matrix; momentum {m['momentum']:g}{', Nesterov' if m['nesterov'] else ''}; "
                f"weight decay {m['weight_decay']:g}; Newton-Schulz in fp32 on CPU, bf16 on GPU): "
                f"every block's {names['muon']}, each expert's matrix orthogonalised on its own; {text}; "
                f"AdamW's lr = {t.lr / t.muon_lr:.2g} x Muon's")
    return f"{text}; gradients clipped at {t.grad_clip:g}; precision {t.precision}"


# The metric each study's comparison with its original (results_vs_original) reads: the one nearest to what the
# original reported. The noise original's "best val PPL" was its final validation (its eval_every 500 > its 400
# steps), so ours is the final model's validation perplexity. The verdicts compare verdicts.VERDICT_METRIC.
COMPARED_METRIC = {"routing": "test_loss", "noise": "val_perplexity", "zloss": "test_perplexity"}


def _metric_description(metric: str, t) -> str:
    final = "the whole {} split" if t.final_eval_batches is None else f"the first {t.final_eval_batches} batches of the {{}} split"
    if metric.startswith("val_"):
        return (f"{metric}: the final model on {final.format('validation')}, as the original's final validation; "
                f"the verdicts compare {VERDICT_METRIC}, the final model on {final.format('test')} (notebook 01)")
    return f"{metric}: the final model on {final.format('test')}"


def setup_comparison(study_name: str, profile: Profile) -> pd.DataFrame:
    """The original's setup next to ours, one row per :data:`~moe_lib.studies.originals.SETUP_ROWS`.

    The original's column is data from :mod:`moe_lib.studies.originals` (its source in the last row); ours
    is computed from the configs of ``study_name``'s grid under ``profile``.
    """
    if study_name not in originals.SETUPS:
        raise ValueError(f"unknown study {study_name!r}: valid choices are {sorted(originals.SETUPS)}")
    grid = build_grid(study_name, profile)
    configs = [run.config for run in grid.runs]
    models = _distinct(c.model for c in configs)
    m, t, d = configs[0].model, configs[0].train, configs[0].data
    params = _parameters(m)
    active = sorted({_parameters(model).active for model in models})
    shared = _distinct(model.num_shared_experts for model in models)
    ours = {
        "data": f"{d.corpus}, {d.tokenizer} tokens (vocab {m.vocab_size:,})",
        "model size": (
            f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, context {t.seq_len}, {m.num_experts} routed experts "
            f"of width {m.d_ff}, top-{'/'.join(str(k) for k in _distinct(model.top_k for model in models))}; "
            f"{_millions(params.total)} params, {'-'.join(_distinct(_millions(a) for a in (active[0], active[-1])))} active"
        ),
        "steps and tokens": f"{t.steps:,} steps x batch {t.batch_size} x {t.seq_len} = {t.steps * t.batch_size * t.seq_len:,} tokens",
        "gate function": "; ".join(_distinct(_gate_description(model) for model in models)),
        "shared expert": "; ".join(
            "none" if s == 0 else f"{s} SwiGLU expert(s) of width {m.d_ff} in every MoE layer "
            f"({', '.join(_distinct(r.condition for r in grid.runs if r.config.model.num_shared_experts == s))})"
            for s in shared
        ),
        "auxiliary-loss reduction": "weight x per-layer loss, summed over layers; weight "
                                    + ", ".join(f"{w:g}" for w in _distinct(model.load_balancing_weight for model in models)),
        "CV definition": "per layer: CV of expert counts, mean over layers (expert_usage_cv); pooled over layers also logged",
        "router noise": "noise_std " + ", ".join(f"{n:g}" for n in _distinct(model.noise_std for model in models)),
        "optimizer": _optimizer_description(configs),
        "experts": f"SwiGLU: silu(x W_gate) * (x W_up), then W_down, width {m.d_ff}, no biases; no dropout",
        "z-loss reduction": "ST-MoE's mean over tokens of logsumexp(logits)^2 per layer, summed over layers; weight "
                            + ", ".join(f"{z:g}" for z in _distinct(model.z_loss_weight for model in models))
                            + (" (none: no z-loss)" if all(model.z_loss_weight == 0 for model in models) else ""),
        "step counting": f"{t.steps:,} optimizer steps of {t.grad_accum_steps} micro-batch(es) each; warmup {t.warmup_steps} steps, "
                         f"then a cosine to {t.min_lr_ratio:g} x lr reached at the last step (the whole curve)",
        "reported metric": _metric_description(COMPARED_METRIC[study_name], t),
    }
    table = pd.DataFrame(
        {"original": [originals.SETUPS[study_name][row] for row in originals.SETUP_ROWS],
         f"ours ({profile.name})": [ours[row] for row in originals.SETUP_ROWS]},
        index=list(originals.SETUP_ROWS),
    )
    table.loc["source"] = [originals.SETUP_SOURCES[study_name], f"moe_lib.studies.build_grid({study_name!r}, profile)"]
    return table


def scale_statement(profile: Profile, study: str | None = None) -> str:
    """How big the profile's model is and how far it trains: parameters, tokens seen, tokens per
    parameter and epochs over the training split, all computed from the profile's base config, or with
    ``study`` from the baseline run of that study's grid (notebook 02's grid has 4 experts, the profile 8)."""
    cfg, subject = profile.base, f"Profile {profile.name}"
    if study is not None:
        grid = build_grid(study, profile)
        cfg = next(run.config for run in grid.runs if run.condition == (grid.baseline or grid.runs[0].condition))
        subject += f", {grid.name} grid's {grid.baseline or grid.runs[0].condition} model ({cfg.model.num_experts} experts, top-{cfg.model.top_k})"
    counts = _parameters(cfg.model)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    train_tokens = len(load_data(cfg.data).train)
    return (
        f"{subject}: {counts.total:,} parameters ({_millions(counts.total)}), {counts.active:,} active per token; "
        f"training sees {cfg.train.steps:,} steps x {cfg.train.batch_size} x {cfg.train.seq_len} = {tokens:,} tokens, "
        f"{tokens / counts.total:.2f} tokens per parameter (Chinchilla's compute-optimal ratio is about 20) and "
        f"{tokens / train_tokens:.2f} epochs over the {train_tokens:,}-token training split."
    )


def results_vs_original(study: StudyResult) -> pd.DataFrame:
    """The original's reported numbers (:mod:`moe_lib.studies.originals`) next to ours, per condition.

    Columns are (metric, "original" | "ours"). Ours are seed means ± std over ``seeds``; the
    original's are as reported (one seed for routing and z-loss, mean ± std of 3 seeds for the
    noise study). Each original's metric stands beside ours in :data:`COMPARED_METRIC` (the noise original's
    "best val PPL" was its final validation, so it is shown as "final val PPL"). Only metrics both report are
    shown; levels differ with corpus, tokenizer and size (see :func:`setup_comparison`), so compare orderings
    and ratios, not levels.
    """
    name, r = study.grid.name, study.results
    rows = {}
    if name == "routing_types":
        for condition, orig in originals.ROUTING.iterrows():
            part = r[r.condition == condition]
            rows[condition] = {
                ("test loss", "original"): f"{orig.test_loss:.2f}", ("test loss", "ours"): mean_std_text(part.test_loss, 3),
                ("top-3 acc. %", "original"): f"{orig.top3_accuracy_pct:.2f}", ("top-3 acc. %", "ours"): mean_std_text(100 * part.test_top3_accuracy, 2),
                ("routing entropy per layer", "original"): " ".join(f"{v:.2f}" for v in orig.routing_entropy_per_layer),
                ("routing entropy per layer", "ours"): per_layer(part, "val_entropy"),
                ("seeds", "ours"): len(part),
            }
    elif name == "noise_factorial":
        for _, orig in originals.NOISE.iterrows():
            part = r[(r.noise_std == orig.noise_std) & (r.load_balancing_weight == orig.load_balancing_weight)]
            rows[f"noise={orig.noise_std}, lb={orig.load_balancing_weight}"] = {
                ("final val PPL", "original"): format_mean_std(orig.best_val_perplexity_mean, orig.best_val_perplexity_std, 2),
                ("final val PPL", "ours"): mean_std_text(part[COMPARED_METRIC["noise"]], 2),
                ("pooled usage CV", "original"): f"{orig.expert_usage_cv:.4f}", ("pooled usage CV", "ours"): mean_std_text(part.expert_usage_cv_pooled, 4),
                ("minutes per run", "original"): f"{orig.training_time_minutes:.1f}", ("minutes per run", "ours"): mean_std_text(part.training_time_minutes, 2),
                ("seeds", "ours"): len(part),
            }
    elif name == "zloss":
        paired = paired_table(study, "test_perplexity", "baseline")
        for condition, orig in originals.ZLOSS.iterrows():
            part = r[r.condition == condition]
            rows[condition] = {
                ("test PPL", "original"): f"{orig.test_perplexity:.2f}", ("test PPL", "ours"): mean_std_text(part.test_perplexity, 2),
                ("improvement vs baseline", "original"): f"{orig.improvement_pct:+.1f}%" if pd.notna(orig.improvement_pct) else "–",
                ("improvement vs baseline", "ours"): f"{paired.loc[condition].improvement_pct:+.2f}%" if condition in paired.index else "–",
                ("router entropy", "original"): f"{orig.router_entropy:.3f}" if pd.notna(orig.router_entropy) else "–",
                ("router entropy", "ours"): mean_std_text(part.router_entropy, 3),
                ("seeds", "ours"): len(part),
            }
    else:
        raise ValueError(f"no original results for study {name!r}: valid studies are 'routing_types', 'noise_factorial', 'zloss'")
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    table.index.name = "condition"
    return table
