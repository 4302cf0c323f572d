"""Tables, verdicts and figures of a finished study (a :class:`~moe_lib.studies.StudyResult`).

Every number in a verdict is computed: ours from the results table (:mod:`moe_lib.statistics`),
the originals' from :mod:`moe_lib.originals`. A comparison claims a winner only when its 95%
confidence interval excludes 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from . import originals, plots
from . import specialization as spec
from .config import ModelConfig
from .model import MoETransformer, count_parameters
from .profiles import Profile
from .statistics import (
    capacity_label, factorial_anova, factorial_contrasts, format_mean_std, mean_ci, mean_std_text, minimum_detectable_effect, paired_comparison,
    paired_differences, sign_consistency, summarize,
)
from .studies import LB_WEIGHTS, NOISE_LEVELS, SpecializationAnalysis, StudyResult, build_grid
from .train import load_data


ORIGINAL_NOISE_COLUMNS = [
    "seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
    "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv",
    "expert_usage_cv_pooled",  # the original's expert_usage_cv: counts of all layers summed, then CV
]


def _conditions(study: StudyResult) -> list[str]:
    return list(dict.fromkeys(run.condition for run in study.grid.runs))


def _layer_means(rows: pd.DataFrame, prefix: str) -> list[float]:
    layers = sorted(int(c.rsplit("_L", 1)[1]) for c in rows.columns if c.startswith(prefix + "_L") and c.rsplit("_L", 1)[1].isdigit())
    return [float(rows[f"{prefix}_L{l}"].mean()) for l in layers]


def _per_layer(rows: pd.DataFrame, prefix: str) -> str:
    """Seed-mean of ``<prefix>_L<n>`` for each layer, as '1.10 1.05 ...'."""
    return " ".join(f"{v:.2f}" for v in _layer_means(rows, prefix))


# --------------------------------------------------------------------------- setup and scale
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


def setup_comparison(study_name: str, profile: Profile) -> pd.DataFrame:
    """The original's setup next to ours, one row per :data:`~moe_lib.originals.SETUP_ROWS`.

    The original's column is data from :mod:`moe_lib.originals` (its source in the last row); ours
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
        "optimizer": f"{_distinct(c.train.optimizer for c in configs)[0]}, lr {t.lr:g}, precision {t.precision}"
                     + ("; Muon's Newton-Schulz iteration in fp32 on CPU, bf16 on GPU (moe_lib.muon)" if t.optimizer == "muon" else ""),
    }
    table = pd.DataFrame(
        {"original": [originals.SETUPS[study_name][row] for row in originals.SETUP_ROWS],
         f"ours ({profile.name})": [ours[row] for row in originals.SETUP_ROWS]},
        index=list(originals.SETUP_ROWS),
    )
    table.loc["source"] = [originals.SETUP_SOURCES[study_name], f"moe_lib.studies.build_grid({study_name!r}, profile)"]
    return table


def scale_statement(profile: Profile) -> str:
    """How big the profile's model is and how far it trains: parameters, tokens seen, tokens per
    parameter and epochs over the training split, all computed from the profile's base config."""
    cfg = profile.base
    counts = _parameters(cfg.model)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    train_tokens = len(load_data(cfg.data).train)
    return (
        f"Profile {profile.name}: {counts.total:,} parameters ({_millions(counts.total)}), {counts.active:,} active per token; "
        f"training sees {cfg.train.steps:,} steps x {cfg.train.batch_size} x {cfg.train.seq_len} = {tokens:,} tokens, "
        f"{tokens / counts.total:.2f} tokens per parameter (Chinchilla's compute-optimal ratio is about 20) and "
        f"{tokens / train_tokens:.2f} epochs over the {train_tokens:,}-token training split."
    )


def results_vs_original(study: StudyResult) -> pd.DataFrame:
    """The original's reported numbers (:mod:`moe_lib.originals`) next to ours, per condition.

    Columns are (metric, "original" | "ours"). Ours are seed means ± std over ``seeds``; the
    original's are as reported (one seed for routing and z-loss, mean ± std of 3 seeds for the
    noise study). Only metrics both report are shown; levels differ with corpus, tokenizer and
    size (see :func:`setup_comparison`), so compare orderings and ratios, not levels.
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
                ("routing entropy per layer", "ours"): _per_layer(part, "val_entropy"),
                ("seeds", "ours"): len(part),
            }
    elif name == "noise_factorial":
        for _, orig in originals.NOISE.iterrows():
            part = r[(r.noise_std == orig.noise_std) & (r.load_balancing_weight == orig.load_balancing_weight)]
            rows[f"noise={orig.noise_std}, lb={orig.load_balancing_weight}"] = {
                ("best val PPL", "original"): format_mean_std(orig.best_val_perplexity_mean, orig.best_val_perplexity_std, 2),
                ("best val PPL", "ours"): mean_std_text(part.best_val_perplexity, 2),
                ("pooled usage CV", "original"): f"{orig.expert_usage_cv:.4f}", ("pooled usage CV", "ours"): mean_std_text(part.expert_usage_cv_pooled, 4),
                ("minutes per run", "original"): f"{orig.training_time_minutes:.1f}", ("minutes per run", "ours"): mean_std_text(part.training_time_minutes, 2),
                ("seeds", "ours"): len(part),
            }
    elif name == "zloss":
        paired = _paired(study, "test_perplexity", "baseline")
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


def routing_table(study: StudyResult) -> pd.DataFrame:
    """Per condition: test loss/PPL (mean ± std), top-3 accuracy, entropy and usage std per layer."""
    rows = []
    for condition in _conditions(study):
        part = study.results[study.results.condition == condition]
        rows.append({
            "condition": condition,
            "seeds": len(part),
            "test loss": mean_std_text(part.test_loss, 3),
            "test PPL": mean_std_text(part.test_perplexity, 2),
            "test top-3 acc. (%)": mean_std_text(100 * part.test_top3_accuracy, 2),
            "routing entropy per layer": _per_layer(part, "val_entropy"),
            "usage std per layer": _per_layer(part, "val_util_std"),
        })
    return pd.DataFrame(rows).set_index("condition")


def best_condition(study: StudyResult, metric: str = "test_loss") -> str:
    """The condition with the lowest seed-mean ``metric``."""
    return study.results.groupby("condition")[metric].mean().idxmin()


def _paired(study: StudyResult, metric: str, baseline: str) -> pd.DataFrame:
    return paired_comparison(study.results, baseline=baseline, metric=metric).set_index("condition")


def _ci_text(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    if pd.isna(low) or pd.isna(high):
        return "no 95% CI (fewer than 2 seeds)"
    return f"95% CI [{low:+.{digits}f}{unit}, {high:+.{digits}f}{unit}]"


def _interval_cell(low: float, high: float, digits: int, unit: str = "", sign: str = "") -> str:
    """``"[94.15, 106.85]"`` for a table cell, ``"–"`` when there is no interval (one seed)."""
    if pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{low:{sign}.{digits}f}{unit}, {high:{sign}.{digits}f}{unit}]"


def _p_text(p: float) -> str:
    """``"0.023"``, or ``"–"`` when the paired t-test has no value (fewer than 2 pairs, or no spread in the differences)."""
    return "–" if pd.isna(p) else f"{p:.3f}"


def _cv_ratio_phrase(off: float, on: float) -> str:
    """How many times lower the usage CV is with load balancing; words, never ``inf`` or ``nan``, when there is no ratio."""
    if pd.isna(off) or pd.isna(on):
        return "no value to compare."
    if on == 0:
        return "both are 0 (perfectly even usage), so there is no ratio." if off == 0 else "0 with it, so the ratio is unbounded."
    return f"{off / on:.1f}x lower with lb 0.01."


def _pair_series(study: StudyResult, metric: str, baseline: str, condition: str, column: str = "difference") -> pd.Series:
    """The per-seed paired ``column`` (``difference`` or ``improvement_pct``) of ``condition`` vs ``baseline``, indexed by seed."""
    pairs = paired_differences(study.results, baseline=baseline, metric=metric)
    part = pairs[pairs.condition == condition]
    return pd.Series(part[column].to_numpy(dtype=float), index=part.seed.to_numpy())


def _pair_values(study: StudyResult, metric: str, baseline: str, condition: str, column: str = "difference") -> np.ndarray:
    """:func:`_pair_series` as an array, in seed order."""
    return _pair_series(study, metric, baseline, condition, column).to_numpy()


def _inconclusive(differences, digits: int = 2, unit: str = "") -> str:
    """``"inconclusive at n = 3 (3/3 seeds point the same way; MDE 2.1 PPL at 80% power)"``.

    MDE: the smallest true mean difference a paired t-test on these n seeds would detect with 80%
    power at the observed paired SD (:func:`~moe_lib.statistics.minimum_detectable_effect`).
    """
    if differences is None:
        return "inconclusive"
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    mde = minimum_detectable_effect(float(d.std(ddof=1)) if n >= 2 else float("nan"), n)
    mde_text = f"MDE {mde:.{digits}f}{unit} at 80% power" if np.isfinite(mde) else "too few seeds for an MDE"
    return f"inconclusive at n = {n} ({sign_consistency(d)} point the same way; {mde_text})"


def _significance(low: float, high: float, differences=None, digits: int = 2, unit: str = "") -> str:
    """Whether the CI excludes 0; if not, "inconclusive at n = N" with sign consistency and MDE of ``differences``."""
    if pd.isna(low) or pd.isna(high):
        return "too few seeds for an interval"
    return "the CI excludes 0" if low > 0 or high < 0 else f"the CI includes 0: {_inconclusive(differences, digits, unit)}"


def _lower_is_better_phrase(subject: str, difference: float, low: float, high: float, differences=None, digits: int = 3, unit: str = " nats") -> str:
    """``subject`` vs its baseline for a lower-is-better metric, claiming a winner only when the CI excludes 0."""
    if pd.isna(low) or pd.isna(high):
        return f"{subject} has the {'lower' if difference < 0 else 'higher'} mean ({_significance(low, high)})"
    if high < 0:
        return f"{subject} is better (the CI excludes 0)"
    if low > 0:
        return f"{subject} is worse (the CI excludes 0)"
    return f"{subject} has the {'lower' if difference < 0 else 'higher'} mean, but the CI includes 0: {_inconclusive(differences, digits, unit)}"


def _depth_trend(values, tolerance: float = 0.01) -> str:
    """How ``values`` (one per layer) change with depth, in words: ``"rises with depth"`` or
    ``"falls with depth"`` only when every layer-to-layer step goes that way (steps within
    ``tolerance`` count as level), ``"is flat with depth"`` when all do, else where it is lowest and highest."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return "has one layer, so no trend"
    steps = np.diff(v)
    if (np.abs(steps) <= tolerance).all():
        return "is flat with depth"
    if (steps >= -tolerance).all():
        return "rises with depth"
    if (steps <= tolerance).all():
        return "falls with depth"
    return f"is not monotone in depth: lowest in layer {int(np.argmin(v))}, highest in layer {int(np.argmax(v))}"


def _trend_comparison(ours: str, theirs: str, lowest: int) -> str:
    """Our per-layer entropy trend against the original's, in words."""
    if ours == theirs:
        return "the same trend."
    if "falls" in theirs and ("rises" in ours or lowest == 0):
        return "the opposite of the original's \"later layers more confident\": our most confident layer is the first."
    return "a different trend."


def routing_verdicts(study: StudyResult) -> list[str]:
    """Plain-language comparisons computed from the routing study's results and the original's table."""
    means = study.results.groupby("condition").test_loss.mean()
    orig = originals.ROUTING
    loss = orig.test_loss
    lines = []
    for k in (1, 2):
        learned, random = f"top-{k}", f"top-{k} random"
        cmp = _paired(study, "test_loss", random).loc[learned]
        lines.append(
            f"Learned top-{k} vs random top-{k}: test loss {means[learned]:.3f} vs {means[random]:.3f}; "
            f"paired difference {cmp.mean_difference:+.3f} nats, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
            f"{_lower_is_better_phrase('learned routing', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high, _pair_values(study, 'test_loss', random, learned))}. "
            f"The original found learned better ({loss['top-1']:.2f}/{loss['top-2']:.2f} vs {loss['top-1 random']:.2f}), on one seed."
        )
    learned, random = "top-2 + shared", "top-2 random + shared"
    if {learned, random} <= set(study.results.condition):
        cmp = _paired(study, "test_loss", random).loc[learned]
        plain = _paired(study, "test_loss", "top-2 random").loc["top-2"]
        # Does the shared expert shrink learned routing's advantage? Per seed: advantage (random - learned) with it minus without it.
        with_shared = -_pair_series(study, "test_loss", random, learned)
        without = -_pair_series(study, "test_loss", "top-2 random", "top-2")
        change = (with_shared - without).dropna()  # < 0: the shared expert shrinks the advantage
        mean, _, _, low, high = mean_ci(change)
        effect = f"shrinks learned routing's advantage by {-mean:.3f} nats" if mean < 0 else f"grows learned routing's advantage by {mean:.3f} nats"
        lines.append(
            f"With one shared expert (as in every layer of the original): learned vs random top-2, paired difference "
            f"{cmp.mean_difference:+.3f} nats, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
            f"{_lower_is_better_phrase('learned routing', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high, _pair_values(study, 'test_loss', random, learned))}; "
            f"without it {plain.mean_difference:+.3f} nats. The original's explanation (a shared expert makes random routing "
            f"nearly as good) predicts a smaller advantage with it. Per seed, advantage (random - learned loss) with the shared "
            f"expert minus without: mean {mean:+.3f} nats, {_ci_text(low, high, 3)}, so the shared expert {effect} on average: "
            f"{'the CI excludes 0' if (low > 0 or high < 0) else _significance(low, high, change.to_numpy(), 3, ' nats')}"
            + (", and with it random routing has the lower mean loss." if cmp.mean_difference > 0 else ".")
        )
    cmp = _paired(study, "test_loss", "top-1").loc["top-2"]
    lines.append(
        f"Top-2 vs top-1 (learned): paired difference {cmp.mean_difference:+.3f} nats, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
        f"{_lower_is_better_phrase('top-2', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high, _pair_values(study, 'test_loss', 'top-1', 'top-2'))}. "
        f"The original found top-2 best ({loss['top-2']:.2f} vs {loss['top-1']:.2f}), on one seed."
    )
    best = best_condition(study)
    lines.append(f"Best condition by mean test loss: {best}. The original's best: {orig.model[loss.idxmin()]}.")
    random_entropy = study.results[study.results.router == "random"].router_entropy
    lines.append(
        f"Random routing entropy: {random_entropy.mean():.4f} nats (ln 4 = 1.3863), as it must be; the original's {orig.routing_entropy_per_layer['top-1 random'][0]:.2f} "
        "was the entropy of softmax([1,0,0,0]), not of the routing."
    )
    learned = study.results[study.results.router == "topk"]
    lines.append(f"Learned routers end below the uniform entropy (ln 4 = 1.3863): mean {learned.router_entropy.mean():.3f} nats.")
    for k in (1, 2):
        ours = _layer_means(study.results[study.results.condition == f"top-{k}"], "val_entropy")
        theirs = orig.routing_entropy_per_layer[f"top-{k}"]
        if not ours:
            continue
        ours_trend, their_trend = _depth_trend(ours), _depth_trend(theirs)
        lowest = int(np.argmin(ours))
        where = "" if "lowest" in ours_trend else f", lowest in layer {lowest}"
        lines.append(
            f"Top-{k} routing entropy per layer: ours {' '.join(f'{h:.2f}' for h in ours)} nats "
            f"({ours_trend}{where}); the original's {' '.join(f'{h:.2f}' for h in theirs)} ({their_trend}): "
            + _trend_comparison(ours_trend, their_trend, lowest)
        )
    return lines


def noise_condition_table(study: StudyResult) -> pd.DataFrame:
    """Best val PPL, usage CV and time per condition: mean ± std and the 95% CI of the mean."""
    metrics = ["best_val_perplexity", "expert_usage_cv", "training_time_minutes"]
    s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=metrics)
    table = pd.DataFrame({
        "noise_std": s.noise_std,
        "lb weight": s.load_balancing_weight,
        "n": s.best_val_perplexity_n,
        "best val PPL": [format_mean_std(m, d, 2) for m, d in zip(s.best_val_perplexity_mean, s.best_val_perplexity_std)],
        "PPL 95% CI": [_interval_cell(lo, hi, 2) for lo, hi in zip(s.best_val_perplexity_ci_low, s.best_val_perplexity_ci_high)],
        "usage CV": [format_mean_std(m, d, 4) for m, d in zip(s.expert_usage_cv_mean, s.expert_usage_cv_std)],
        "CV 95% CI": [_interval_cell(lo, hi, 4) for lo, hi in zip(s.expert_usage_cv_ci_low, s.expert_usage_cv_ci_high)],
        "time (min)": [format_mean_std(m, float("nan"), 2) for m in s.training_time_minutes_mean],
    })
    return table.reset_index(drop=True)


def per_seed_table(study: StudyResult, metrics: list[str]) -> pd.DataFrame:
    """Rows: conditions; columns: (metric, seed)."""
    table = study.results.pivot_table(index="condition", columns="seed", values=metrics, sort=False)
    return table.reindex(_conditions(study)).round(4)


def _original_noise() -> pd.DataFrame:
    """The original's noise table, one row per noise level: PPL cost of noise vs noise 0 and of lb 0 vs 0.01, and the CV ratio."""
    t = originals.NOISE.set_index(["noise_std", "load_balancing_weight"])
    ppl, cv = t.best_val_perplexity_mean, t.expert_usage_cv
    rows = []
    for noise in NOISE_LEVELS:
        cost = [ppl[noise, lb] - ppl[0.0, lb] for lb in LB_WEIGHTS]
        rows.append({
            "noise_std": noise,
            "noise_cost_ppl": np.mean(cost),
            "noise_cost_pct": np.mean([100 * c / ppl[0.0, lb] for c, lb in zip(cost, LB_WEIGHTS)]),
            "lb_edge_ppl": ppl[noise, 0.0] - ppl[noise, 0.01],
            "cv_ratio": cv[noise, 0.0] / cv[noise, 0.01],
        })
    return pd.DataFrame(rows).set_index("noise_std")


def _ppl_line(study: StudyResult, baseline: str, condition: str, label: str, metric: str = "best_val_perplexity") -> str:
    """``condition`` vs ``baseline`` on ``metric`` (PPL), seed-paired: % and PPL change, CI, p, verdict."""
    cmp = _paired(study, metric, baseline).loc[condition]
    if cmp.n_pairs == 0:
        return f"{label}: no seed has a {metric} for both, so no comparison."
    return (
        f"{label}: {-cmp.improvement_pct:+.1f}% {metric.replace('_', ' ')} "
        f"({cmp.mean_difference:+.2f} PPL, {_ci_text(-cmp.improvement_pct_ci_high, -cmp.improvement_pct_ci_low, 1, '%')}, "
        f"paired t-test p = {_p_text(cmp.p_value)}): "
        f"{_significance(cmp.difference_ci_low, cmp.difference_ci_high, _pair_values(study, metric, baseline, condition), 1, ' PPL')}."
    )


def noise_verdicts(study: StudyResult) -> list[str]:
    """Noise and load-balancing effects (seed-paired, with CIs), each followed by what the original reported."""
    r = study.results
    orig = _original_noise()
    lines = []
    for lb in LB_WEIGHTS:
        for noise in NOISE_LEVELS[1:]:
            lines.append(_ppl_line(study, f"noise=0.0, lb={lb}", f"noise={noise}, lb={lb}", f"noise {noise} vs 0 (lb {lb})"))
    high, low = orig.loc[NOISE_LEVELS[2]], orig.loc[NOISE_LEVELS[1]]
    lines.append(
        f"Original: noise {NOISE_LEVELS[2]} cost about {high.noise_cost_ppl:+.0f} PPL ({high.noise_cost_pct:+.0f}%) at both lb settings; "
        f"noise {NOISE_LEVELS[1]} about {low.noise_cost_ppl:+.0f} PPL ({low.noise_cost_pct:+.1f}%)."
    )
    for noise in NOISE_LEVELS:
        for column, name in (("expert_usage_cv", "usage CV (per layer, mean over layers)"), ("expert_usage_cv_pooled", "pooled usage CV (the original's)")):
            if column not in r.columns:
                continue
            on = r[(r.noise_std == noise) & (r.load_balancing_weight == 0.01)][column].mean()
            off = r[(r.noise_std == noise) & (r.load_balancing_weight == 0.0)][column].mean()
            cv_off, cv_on = format_mean_std(off, float("nan"), 4), format_mean_std(on, float("nan"), 4)
            lines.append(f"noise {noise}: {name} {cv_off} without load balancing vs {cv_on} with it: {_cv_ratio_phrase(off, on)}")
    ratios = ", ".join(f"{x:.1f}x" for x in orig.cv_ratio.iloc[:-1]) + f" and {orig.cv_ratio.iloc[-1]:.1f}x"
    levels = ", ".join(f"{n:g}" for n in NOISE_LEVELS[:-1]) + f" and {NOISE_LEVELS[-1]:g}"
    lines.append(f"Original (pooled CV): lb 0.01 cut the CV {ratios} at noise {levels}.")
    for noise in NOISE_LEVELS:
        lines.append(_ppl_line(study, f"noise={noise}, lb=0.01", f"noise={noise}, lb=0.0", f"lb 0 vs 0.01 at noise {noise}"))
    lines.append(
        f"Original: lb 0.01 gave at most a {orig.lb_edge_ppl.max():.1f} PPL edge, inside its seed spread "
        f"(std about {originals.NOISE.best_val_perplexity_std.mean():.0f} PPL)."
    )
    return lines


FACTORS = ("noise_std", "load_balancing_weight")


def noise_factorial_analysis(study: StudyResult, metric: str = "best_val_perplexity") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The noise study analysed as the 3 x 2 factorial it is, on log ``metric`` with the seed as a block.

    Returns ``(anova, contrasts)``: :func:`~moe_lib.statistics.factorial_anova` (main effects of noise
    and lb, their interaction, the seed block, partial eta squared) and the effect sizes of
    :func:`~moe_lib.statistics.factorial_contrasts` for both factors (noise vs 0; lb 0 vs 0.01), each
    main effect and interaction contrast with its seed-paired t interval, as % change in ``metric``.
    """
    r = study.results
    anova = factorial_anova(r, metric, list(FACTORS), block="seed", log=True)
    contrasts = pd.concat([
        factorial_contrasts(r, metric, "noise_std", "load_balancing_weight", baseline=NOISE_LEVELS[0]),
        factorial_contrasts(r, metric, "load_balancing_weight", "noise_std", baseline=LB_WEIGHTS[0]),
    ], ignore_index=True)
    return anova, contrasts


def _contrast_mde_pct(row: pd.Series, confidence: float = 0.95) -> float:
    """The MDE (80% power) of a contrast in %, from the per-seed SD its t interval implies:
    ``sd = (high - low) / 2 * sqrt(n) / t_{(1+confidence)/2, n-1}`` on the log scale."""
    if row.n < 2 or pd.isna(row.ci_low):
        return float("nan")
    sd = (row.ci_high - row.ci_low) / 2 * np.sqrt(row.n) / stats.t.ppf((1 + confidence) / 2, row.n - 1)
    return 100 * (np.exp(minimum_detectable_effect(float(sd), int(row.n))) - 1)


def _contrast_text(row: pd.Series) -> str:
    """``+8.1% (95% CI [+2.0%, +14.6%], 3/3 seeds)`` and what the interval says."""
    head = f"{row.pct:+.1f}% ({_ci_text(row.pct_ci_low, row.pct_ci_high, 1, '%')}, {row.signs})"
    if pd.isna(row.ci_low):
        return f"{head}: too few seeds for an interval"
    if row.ci_low > 0 or row.ci_high < 0:
        return f"{head}: the CI excludes 0"
    mde = _contrast_mde_pct(row)
    mde_text = f"MDE {mde:.1f}% at 80% power" if np.isfinite(mde) else "too few seeds for an MDE"
    return f"{head}: the CI includes 0: inconclusive at n = {int(row.n)} ({row.signs} point the same way; {mde_text})"


def _anova_lines(anova: pd.DataFrame, metric: str) -> list[str]:
    """One sentence per main effect and interaction of a :func:`~moe_lib.statistics.factorial_anova` table."""
    lines = []
    for term in anova.index.drop(["Residual", "seed"], errors="ignore"):
        row = anova.loc[term]
        p = "–" if pd.isna(row["PR(>F)"]) else "< 0.001" if row["PR(>F)"] < 0.001 else f"= {row['PR(>F)']:.3f}"
        lines.append(f"ANOVA on log {metric}, {term.replace(':', ' x ')}: F = {row.F:.2f}, p {p}, partial eta squared {row.partial_eta_sq:.2f}.")
    return lines


def noise_factorial_verdicts(study: StudyResult, metric: str = "best_val_perplexity") -> list[str]:
    """Main effects and the noise x lb interaction, from :func:`noise_factorial_analysis`, in words."""
    anova, contrasts = noise_factorial_analysis(study, metric)
    lines = _anova_lines(anova, metric)
    for _, row in contrasts.iterrows():
        if row.effect == "noise_std main effect":
            lines.append(f"Noise {row.level:g} vs 0, averaged over lb: {_contrast_text(row)}.")
        elif row.effect == "load_balancing_weight main effect":
            lines.append(f"lb {row.level:g} vs {LB_WEIGHTS[0]:g}, averaged over noise: {_contrast_text(row)}.")
    for _, row in contrasts[contrasts.effect.str.startswith("noise_std x")].iterrows():
        bounded = pd.notna(row.pct_ci_low)
        claim = (
            "no interval, so the seed's claim of a limited interaction is untested here" if not bounded else
            f"no evidence of an interaction, consistent with the seed's claim that it is limited, but only to the CI's "
            f"resolution: interactions from {row.pct_ci_low:+.1f}% to {row.pct_ci_high:+.1f}% remain possible" if row.ci_low <= 0 <= row.ci_high else
            "the interaction is real here, against the seed's claim that it is limited"
        )
        lines.append(
            f"Noise x lb interaction at noise {row.level:g} (the noise effect with lb {LB_WEIGHTS[0]:g} minus with lb {LB_WEIGHTS[1]:g}): "
            f"{_contrast_text(row)}; {claim}."
        )
    return lines


def zloss_table(study: StudyResult) -> pd.DataFrame:
    """Test PPL, paired improvement vs baseline with its CI and p-value, ms/step, router entropy and logsumexp."""
    paired = _paired(study, "test_perplexity", study.grid.baseline)
    rows = []
    for condition in _conditions(study):
        part = study.results[study.results.condition == condition]
        row = {
            "condition": condition,
            "seeds": len(part),
            "test PPL": mean_std_text(part.test_perplexity, 2),
            "improvement vs baseline": "–",
            "improvement 95% CI": "–",
            "p (paired t)": "–",
            "ms/step": f"{part.ms_per_step.mean():.0f}",
            "router entropy": mean_std_text(part.router_entropy, 3),
            "router logsumexp": mean_std_text(part.router_logsumexp, 3),
        }
        if condition in paired.index:
            c = paired.loc[condition]
            row.update({
                "improvement vs baseline": f"{c.improvement_pct:+.2f}%",
                "improvement 95% CI": _interval_cell(c.improvement_pct_ci_low, c.improvement_pct_ci_high, 2, "%", "+"),
                "p (paired t)": _p_text(c.p_value),
            })
        rows.append(row)
    return pd.DataFrame(rows).set_index("condition")


def _versus_reported(inside: bool, below: bool, improvement: float) -> str:
    if inside:
        return ": our runs are consistent with it."
    if not below:
        return ": at this scale z=0.01 helped more than reported."
    mean = f"mean improvement {improvement:+.2f}%" if improvement >= 0 else f"mean {-improvement:.2f}% worse than the baseline"
    return f": at this scale z=0.01 helped less than reported ({mean})."


def zloss_verdicts(study: StudyResult) -> list[str]:
    paired = _paired(study, "test_perplexity", study.grid.baseline)
    r = study.results
    base_lse = r[r.condition == study.grid.baseline].router_logsumexp.mean()
    base_h = r[r.condition == study.grid.baseline].router_entropy.mean()
    lines = []
    for condition, c in paired.iterrows():
        part = r[r.condition == condition]
        lines.append(
            f"{condition}: test PPL {abs(c.improvement_pct):.2f}% {'lower' if c.improvement_pct > 0 else 'higher'} than the baseline's "
            f"(improvement {c.improvement_pct:+.2f}%, {_ci_text(c.improvement_pct_ci_low, c.improvement_pct_ci_high, 2, '%')}, "
            f"p = {_p_text(c.p_value)}, {int(c.n_pairs)} paired seeds): "
            f"{_significance(c.improvement_pct_ci_low, c.improvement_pct_ci_high, _pair_values(study, 'test_perplexity', study.grid.baseline, condition, 'improvement_pct'), 2, '%')}. Router logsumexp {part.router_logsumexp.mean():.3f} "
            f"vs baseline {base_lse:.3f}; entropy {part.router_entropy.mean():.3f} vs {base_h:.3f} nats."
        )
    # "Confidence": does z-loss lower the routing entropy (the seed's claim) or raise it (the gradient's direction)?
    entropy = _paired(study, "router_entropy", study.grid.baseline)
    for condition, c in entropy.iterrows():
        diffs = _pair_values(study, "router_entropy", study.grid.baseline, condition)
        if c.difference_ci_high < 0:
            reading = "more confident routing, as the seed claimed"
        elif c.difference_ci_low > 0:
            reading = "less confident routing, the direction the gradient 2 LSE p_i predicts"
        else:
            reading = _significance(c.difference_ci_low, c.difference_ci_high, diffs, 3, " nats")
        lines.append(
            f"{condition}: routing entropy {c.mean_difference:+.3f} nats vs the baseline (seed-paired, "
            f"{_ci_text(c.difference_ci_low, c.difference_ci_high, 3)}): {reading}."
        )
    c = paired.loc["z=0.01"]
    reported = originals.ZLOSS.improvement_pct["z=0.01"]
    inside = c.improvement_pct_ci_low <= reported <= c.improvement_pct_ci_high
    if pd.isna(c.improvement_pct_ci_low) or pd.isna(c.improvement_pct_ci_high):
        lines.append(
            f"The original reported a {reported:.1f}% lower test PPL at z=0.01 (improvement {reported:+.1f}%, one seed). "
            f"Ours is {c.improvement_pct:+.2f}% on {int(c.n_pairs)} paired seed(s): too few for an interval, so no comparison."
        )
        return lines
    lines.append(
        f"The original reported a {reported:.1f}% lower test PPL at z=0.01 (improvement {reported:+.1f}%, one seed). "
        f"That is {'inside' if inside else 'outside'} "
        f"our 95% CI for the improvement, [{c.improvement_pct_ci_low:+.2f}%, {c.improvement_pct_ci_high:+.2f}%]"
        + _versus_reported(inside, c.improvement_pct_ci_high < reported, c.improvement_pct)
    )
    return lines


# --------------------------------------------------------------------------- specialization (notebook 05)
def _interval(mean: float, low: float, high: float, digits: int = 4) -> str:
    if pd.isna(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _seed_interval(values: pd.Series, digits: int = 4) -> str:
    """Seed mean with its 95% t-interval, as "mean [low, high]"."""
    mean, _, _, low, high = mean_ci(values)
    return _interval(mean, low, high, digits)


def mi_comparison(analysis: SpecializationAnalysis, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """Per (variable, layer): learned and random-router MI (seed mean and 95% CI), their ratio, and the
    seed-paired difference with its 95% CI and paired t-test p-value (numbers, for verdicts)."""
    rows = []
    for (variable, layer), part in analysis.mi.groupby(["variable", "layer"], sort=False):
        a, b = mean_ci(part[part.condition == learned].mi_bits), mean_ci(part[part.condition == control].mi_bits)
        cmp = paired_comparison(part, baseline=control, metric="mi_bits", lower_is_better=False).set_index("condition").loc[learned]
        rows.append({
            "variable": variable, "layer": layer,
            "learned_mean": a[0], "learned_ci_low": a[3], "learned_ci_high": a[4],
            "random_mean": b[0], "random_ci_low": b[3], "random_ci_high": b[4],
            "ratio": a[0] / b[0] if b[0] > 0 else float("inf"),
            "difference": cmp.mean_difference, "difference_ci_low": cmp.difference_ci_low, "difference_ci_high": cmp.difference_ci_high,
            "p_value": cmp.p_value, "n_pairs": int(cmp.n_pairs),
            "learned_fraction": part[part.condition == learned].mi_fraction.mean(),
            "label_entropy_bits": part.label_entropy_bits.iloc[0],
            "miller_madow_bits": part.miller_madow_bits.iloc[0],
        })
    return pd.DataFrame(rows)


def mi_table(analysis: SpecializationAnalysis, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """:func:`mi_comparison` for display: MI in bits as "mean [95% CI]" over seeds."""
    c = mi_comparison(analysis, learned, control)
    table = pd.DataFrame({
        "variable": c.variable,
        "layer": c.layer,
        f"{learned} (bits)": [_interval(m, lo, hi) for m, lo, hi in zip(c.learned_mean, c.learned_ci_low, c.learned_ci_high)],
        f"{control} (bits)": [_interval(m, lo, hi) for m, lo, hi in zip(c.random_mean, c.random_ci_low, c.random_ci_high)],
        "x chance": [f"{r:.1f}" for r in c.ratio],
        "paired difference [95% CI]": [_interval(m, lo, hi) for m, lo, hi in zip(c.difference, c.difference_ci_low, c.difference_ci_high)],
        "p (paired t)": [f"{p:.3f}" if pd.notna(p) else "–" for p in c.p_value],
        "share of H(label)": [f"{100 * f:.2f}%" for f in c.learned_fraction],
        "Miller-Madow bias": [f"{b:.5f}" for b in c.miller_madow_bits],
    })
    return table.set_index(["variable", "layer"])


def _mi_differences(analysis: SpecializationAnalysis, variable: str, layer: int, learned: str, control: str) -> np.ndarray:
    """Per-seed learned - control MI (bits) of ``variable`` at ``layer``."""
    part = analysis.mi[(analysis.mi.variable == variable) & (analysis.mi.layer == layer)]
    pairs = paired_differences(part, baseline=control, metric="mi_bits", lower_is_better=False)
    return pairs.loc[pairs.condition == learned, "difference"].to_numpy(dtype=float)


def genre_controls(
    analysis: SpecializationAnalysis, label: str = "genre", unit: str = "play", permutations: int = 200
) -> pd.DataFrame:
    """Two controls for a document-level label, per (condition, seed, layer).

    Genre is a property of a whole play, so its tokens are not independent draws, and plays of
    one genre share words. ``mi_bits`` is tested against a null that shuffles genres across
    plays (:func:`~moe_lib.specialization.label_permutation_test`: ``null_q95_bits``,
    ``p_value``), and ``cmi_given_token_bits`` is ``I(E; genre | token)``, what the expert choice
    says about the genre beyond the token itself (plug-in, so biased upwards: read it against
    the random router's).
    """
    rows = []
    for (condition, seed), trace in analysis.traces.items():
        labels, tokens = trace.labels(label), trace.labels("token")
        for layer in range(trace.num_layers):
            test = spec.label_permutation_test(trace, layer, label=label, unit=unit, permutations=permutations, seed=seed)
            cmi = spec.conditional_mutual_information(
                trace.experts[layer].ravel(), np.repeat(labels, trace.top_k), np.repeat(tokens, trace.top_k))
            rows.append({"condition": condition, "seed": seed, "layer": layer, **test, "cmi_given_token_bits": cmi})
    return pd.DataFrame(rows)


def genre_control_table(controls: pd.DataFrame, learned: str = "learned top-2", control: str = "random top-2") -> pd.DataFrame:
    """:func:`genre_controls` per layer: seeds whose MI beats the play-shuffled null at the 5% level,
    for each router, and ``I(E; genre | token)`` learned vs random, seed-paired with a 95% CI."""
    rows = []
    for layer, part in controls.groupby("layer"):
        cmp = paired_comparison(part, baseline=control, metric="cmi_given_token_bits", lower_is_better=False).set_index("condition").loc[learned]
        rows.append({
            "layer": layer,
            f"{learned}: seeds p < 0.05": f"{int((part[part.condition == learned].p_value < 0.05).sum())}/{int((part.condition == learned).sum())}",
            f"{control}: seeds p < 0.05": f"{int((part[part.condition == control].p_value < 0.05).sum())}/{int((part.condition == control).sum())}",
            f"I(E; genre | token), {learned} (bits)": _seed_interval(part[part.condition == learned].cmi_given_token_bits),
            f"I(E; genre | token), {control} (bits)": _seed_interval(part[part.condition == control].cmi_given_token_bits),
            "paired difference [95% CI]": _interval(cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high),
        })
    return pd.DataFrame(rows).set_index("layer")


def genre_control_verdicts(controls: pd.DataFrame, learned: str = "learned top-2", control: str = "random top-2") -> list[str]:
    """What survives the two genre controls, in words."""
    units = int(controls.units.iloc[0])
    lines = []
    for condition in (learned, control):
        part = controls[controls.condition == condition]
        lines.append(
            f"{condition}: I(expert; genre) beats the play-shuffled null (p < 0.05, {units} plays) in "
            f"{int((part.p_value < 0.05).sum())} of {len(part)} layer-seed pairs (about 5% would by chance)."
        )
    beyond = 0
    layers = sorted(controls.layer.unique())
    for layer in layers:
        part = controls[controls.layer == layer]
        cmp = paired_comparison(part, baseline=control, metric="cmi_given_token_bits", lower_is_better=False).set_index("condition").loc[learned]
        beyond += int(cmp.difference_ci_low > 0)
    lines.append(
        f"Given the token, I(expert; genre | token) is above the random router's in {beyond} of {len(layers)} layers "
        "(seed-paired 95% CI above 0). "
        + ("So beyond what the token itself says, the learned experts carry genre information in those layers."
           if beyond else "So what genre information the learned experts carry is explained by which tokens they take.")
    )
    return lines


def specialization_verdicts(analysis: SpecializationAnalysis, learned: str = "learned top-2", control: str = "random top-2") -> list[str]:
    """Plain-language findings computed from the traces: MI beyond chance, the strongest
    class preferences and co-activations, each against the random router's chance level."""
    c = mi_comparison(analysis, learned, control)
    n_seeds = int(c.n_pairs.max()) if len(c) else 0
    lines = []
    for variable, part in c.groupby("variable", sort=False):
        beyond = part[part.difference_ci_low > 0]
        best = part.loc[part.difference.idxmax()]
        lines.append(
            f"I(expert; {variable}): the learned router beats the random-router control in {len(beyond)} of {len(part)} layers "
            f"(counting a layer when the seed-paired 95% CI of the difference, {n_seeds} seeds, lies above 0). "
            f"Largest difference at layer {int(best.layer)}: {best.learned_mean:.4f} bits "
            f"vs {best.random_mean:.4f} by chance ({best.ratio:.1f}x), i.e. {100 * best.learned_fraction:.2f}% of "
            f"H({variable}) = {best.label_entropy_bits:.3f} bits; "
            f"{_significance(best.difference_ci_low, best.difference_ci_high, _mi_differences(analysis, variable, best.layer, learned, control), 4, ' bits')}."
            + (" For genre this control corrects the estimator's bias only: genre belongs to whole plays, whose words differ, "
               "so only the play-level controls (genre_controls) can say whether the experts track genre." if variable == "genre" else "")
        )
    mm = c.miller_madow_bits.mean()
    rnd = c.random_mean.mean()
    lines.append(
        f"Estimator bias: the random router's plug-in MI averages {rnd:.5f} bits against a Miller-Madow expectation of {mm:.5f} "
        f"bits for independent variables ({rnd / mm:.1f}x): {'the control MI is' if rnd / mm < 3 else 'the control MI is NOT'} "
        f"of the size sampling noise alone predicts."
    )
    # Chance threshold: the largest value the random router produced over all its layers, experts
    # (or pairs) and seeds, the maximum statistic of the control.
    for label, kind in (("token_class", "token class"), ("genre", "genre")):
        if label not in set(analysis.mi.variable):
            continue
        best = {}
        for condition in (learned, control):
            rows = []
            for trace in analysis.traces_of(condition):
                table = spec.label_utilization(trace, trace.labels(label), label)
                rows.append(table.loc[table.lift.idxmax()])
            best[condition] = rows
        top = max(best[learned], key=lambda r: r.lift)
        chance = max(r.lift for r in best[control])
        lines.append(
            f"Strongest {kind} preference (learned, any seed): layer {int(top.layer)} expert {int(top.expert)} takes "
            f"{100 * top.share:.1f}% of the {top[label]} slots, {top.lift:.2f}x its overall share. The random router's largest "
            f"such lift (any layer, expert, seed) is {chance:.2f}x, so this is "
            f"{'beyond' if top.lift > chance else 'within'} what chance produced."
        )
    if analysis.trace(learned).top_k >= 2:
        maxima = {}
        for condition in (learned, control):
            maxima[condition] = [float(np.nanmax(lift)) for trace in analysis.traces_of(condition) for lift in spec.coactivation(trace)[1]]
        chance = max(maxima[control])
        above = sum(m > chance for m in maxima[learned])
        lines.append(
            f"Co-activation: the most over-represented expert pair of a layer has lift {np.mean(maxima[learned]):.2f} on average "
            f"for the learned router (over layers and seeds) and at most {chance:.2f} for the random router; "
            f"{above} of {len(maxima[learned])} learned layer-seed maxima exceed that chance maximum."
        )
    return lines


# --------------------------------------------------------------------------- capacity (notebook 05)
def capacity_table(study: StudyResult) -> pd.DataFrame:
    """Per condition: dropped slots (in training at the run's capacity factor, mean over steps; mean over
    layers and per layer), the floor ``1 - cf`` that any routing must drop when cf < 1, validation
    perplexity (at the evaluation capacity, ``ModelConfig.capacity_factor_eval``) and its change vs
    dropless at the same lb."""
    r = study.results.copy()
    rows = []
    for condition in _conditions(study):
        part = r[r.condition == condition]
        cf, lb = part.capacity_factor.iloc[0], part.load_balancing_weight.iloc[0]
        dropless = r[(r.capacity_factor.isna()) & (r.load_balancing_weight == lb)]
        layer_cols = sorted((c for c in r.columns if c.startswith("train_dropped_L")), key=lambda c: int(c.rsplit("L", 1)[1]))
        rows.append({
            "capacity factor": capacity_label(cf),
            "lb weight": lb,
            "seeds": len(part),
            "dropped (%)": f"{100 * part.train_dropped_fraction.mean():.2f}",
            "dropped per layer (%)": " ".join(f"{100 * part[c].mean():.1f}" for c in layer_cols),
            "floor 1 - cf (%)": f"{100 * max(0.0, 1 - cf):.0f}" if pd.notna(cf) else "0",
            "val PPL": mean_std_text(part.val_perplexity, 2),
            "vs dropless": f"{100 * (part.val_perplexity.mean() / dropless.val_perplexity.mean() - 1):+.1f}%" if len(dropless) else "–",
            "ms/step": f"{part.ms_per_step.mean():.0f}",
        })
    return pd.DataFrame(rows).set_index(["capacity factor", "lb weight"])


def capacity_verdicts(study: StudyResult, seed_std: float | None = None, threshold: float = 0.01) -> list[str]:
    """Findings computed from the capacity sweep, seed means with seed-paired 95% CIs where there are seeds.

    ``seed_std``: with one seed only, the seed-to-seed std of validation perplexity of the dropless
    lb 0.01 configuration (from a multi-seed study), the yardstick for a one-seed difference.
    """
    r = study.results.copy()
    r["cf"] = r.capacity_factor.map(capacity_label)
    n_seeds = r.seed.nunique()
    lines = []
    for (cf, lb), part in r[r.capacity_factor < 1].groupby(["capacity_factor", "load_balancing_weight"], sort=False):
        floor = 1 - cf
        lines.append(
            f"cf={capacity_label(cf)}, lb={lb}: {100 * part.train_dropped_fraction.mean():.1f}% of slots dropped (mean of {len(part)} seed(s)); "
            f"the experts hold at most ceil(cf N k / E) x E ~ {100 * cf:.0f}% of the routed slots, so at least "
            f"{100 * floor:.0f}% must drop: {'consistent' if (part.train_dropped_fraction >= floor - 1e-6).all() else 'INCONSISTENT'} with the formula."
        )
    for lb, part in r.groupby("load_balancing_weight", sort=False):
        means = part.dropna(subset=["capacity_factor"]).groupby("capacity_factor").train_dropped_fraction.mean().sort_index()
        if means.empty:
            continue
        ok = means[means < threshold]
        if len(ok):
            lines.append(f"lb={lb}: the smallest capacity factor in the sweep that drops fewer than {100 * threshold:.0f}% of slots (seed mean) is cf={capacity_label(ok.index[0])}.")
        else:
            least = means.idxmin()
            lines.append(
                f"lb={lb}: every finite capacity factor in the sweep drops {100 * threshold:.0f}% of slots or more (seed mean); "
                f"the fewest, {100 * means[least]:.1f}%, at cf={capacity_label(least)}."
            )
    for cf in [*sorted(r.capacity_factor.dropna().unique()), None]:
        at = r[r.capacity_factor.isna() if cf is None else r.capacity_factor == cf]
        at = at.assign(condition=lambda d: "lb=" + d.load_balancing_weight.astype(str))
        if set(at.condition) != {"lb=0.01", "lb=0.0"}:
            continue
        metrics = (("train_dropped_fraction", "dropped slots", 100, " points", 1), ("val_perplexity", "val PPL", 1, " PPL", 2))
        for metric, name, scale, unit, digits in metrics[1:] if cf is None else metrics:  # dropless drops nothing
            cmp = paired_comparison(at, baseline="lb=0.0", metric=metric).set_index("condition").loc["lb=0.01"]
            diffs = scale * paired_differences(at, baseline="lb=0.0", metric=metric).difference.to_numpy(dtype=float)
            lines.append(
                f"cf={capacity_label(cf)}, lb 0.01 vs 0: {name} {scale * cmp.baseline_mean:.{digits}f} without load balancing vs "
                f"{scale * cmp.treatment_mean:.{digits}f} with it, paired difference {scale * cmp.mean_difference:+.{digits}f}{unit}, "
                f"{_ci_text(scale * cmp.difference_ci_low, scale * cmp.difference_ci_high, digits, unit)}: "
                f"{_significance(cmp.difference_ci_low, cmp.difference_ci_high, diffs, digits, unit)}."
            )
    for lb, part in r.groupby("load_balancing_weight", sort=False):
        part = part.assign(condition=part.cf)
        if "dropless" not in set(part.condition):
            continue
        for cf in sorted(part.capacity_factor.dropna().unique()):
            label = capacity_label(cf)
            if n_seeds >= 2:
                cmp = paired_comparison(part, baseline="dropless", metric="val_perplexity").set_index("condition").loc[label]
                diffs = paired_differences(part, baseline="dropless", metric="val_perplexity")
                diffs = diffs[diffs.condition == label].difference.to_numpy(dtype=float)
                lines.append(
                    f"lb={lb}, cf={label} vs dropless: val PPL {cmp.treatment_mean:.2f} vs {cmp.baseline_mean:.2f}, paired difference "
                    f"{cmp.mean_difference:+.2f} PPL, {_ci_text(cmp.difference_ci_low, cmp.difference_ci_high)}: "
                    f"{_significance(cmp.difference_ci_low, cmp.difference_ci_high, diffs, 2, ' PPL')}."
                )
                continue
            base = part[part.condition == "dropless"].val_perplexity.mean()
            value = part[part.condition == label].val_perplexity.mean()
            diff = value - base
            noise = ""
            if seed_std is not None and pd.notna(seed_std):
                noise = f"; {'more' if abs(diff) > 2 * seed_std else 'less'} than 2 seed-std ({2 * seed_std:.2f} PPL) of the dropless model"
            lines.append(f"lb={lb}, cf={label}: val PPL {value:.2f} vs dropless {base:.2f} ({diff:+.2f}, {100 * diff / base:+.1f}%{noise}).")
    if n_seeds >= 2 and r.cf.nunique() >= 2 and r.load_balancing_weight.nunique() >= 2:
        anova = factorial_anova(r, "val_perplexity", ["cf", "load_balancing_weight"], block="seed", log=True)
        lines += _anova_lines(anova.rename(index=lambda term: term.replace("cf", "capacity factor")), "val_perplexity")
    fast = r[r.capacity_factor == r.capacity_factor.min()].ms_per_step.mean()
    slow = r[r.capacity_factor.isna()].ms_per_step.mean()
    if pd.notna(fast) and pd.notna(slow):
        lines.append(
            f"Time per step: {fast:.0f} ms at cf={capacity_label(r.capacity_factor.min())} vs {slow:.0f} ms dropless "
            "(wall-clock on this machine; on shared CPUs a rough guide only)."
        )
    return lines


# --------------------------------------------------------------------------- dispatch (notebook 06)
def dispatch_table(study: StudyResult) -> pd.DataFrame:
    """Per dispatch: ms/step, tokens/s, test loss, and the largest gap in logged training loss to
    the other dispatch on the same seed (the two compute the same function; float rounding differs)."""
    h = study.histories
    rows = []
    for condition in _conditions(study):
        part = study.results[study.results.condition == condition]
        gaps = []
        for seed in part.seed:
            mine = h[(h.condition == condition) & (h.seed == seed)].set_index("step").lm_loss
            other = h[(h.condition != condition) & (h.seed == seed)].set_index("step").lm_loss
            if len(other):
                gaps.append((mine - other).abs().max())
        rows.append({
            "dispatch": condition,
            "seeds": len(part),
            "ms/step": f"{part.ms_per_step.mean():.0f}",
            "tokens/s": f"{part.tokens_per_second.mean():,.0f}",
            "test loss": f"{part.test_loss.mean():.4f}",
            "max |train loss gap|": f"{max(gaps):.2e}" if gaps else "–",
        })
    return pd.DataFrame(rows).set_index("dispatch")


@dataclass
class StudyReport:
    summary: pd.DataFrame
    figure_paths: list[Path]


def report_study(study: StudyResult, show: bool = False) -> StudyReport:
    """The study's main table and figures (saved under images/ except in the smoke profile)."""
    name, h = study.grid.name, study.histories
    num_experts = study.grid.runs[0].config.model.num_experts
    figures = {
        f"{name}_loss": plots.plot_loss_curves(h, title=f"{name}: LM loss"),
        f"{name}_routing_entropy": plots.plot_routing_entropy(h, num_experts=num_experts),
    }
    if name == "noise_factorial":
        summary = noise_condition_table(study)
        s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=["best_val_perplexity"])
        figures[f"{name}_interaction"] = plots.plot_interaction(
            s, "noise_std", "load_balancing_weight", "best_val_perplexity", "best validation perplexity", "Noise x load balancing"
        )
    elif name == "zloss":
        summary = zloss_table(study)
        figures[f"{name}_logit_magnitude"] = plots.plot_layer_metric(h, "logsumexp", "mean logsumexp", "Router logit magnitude")
    elif name == "dispatch":
        summary = dispatch_table(study)
    elif name == "capacity":
        summary = capacity_table(study)
        figures[f"{name}_sweep"] = plots.plot_capacity_sweep(study.results, title="Capacity factor: dropped slots and validation perplexity")
    else:
        summary = routing_table(study)
    paths = [plots.save_figure(f, n, study.profile) for n, f in figures.items()]  # a temp folder under smoke
    if not show:
        for fig in figures.values():
            plt.close(fig)
    return StudyReport(summary, paths)
