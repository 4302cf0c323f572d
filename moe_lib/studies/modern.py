"""Notebook 08's study: what modern MoE changes, each variant against the classic one. Its grid, tables,
verdicts and figures (loss per token, FLOP and second; router saturation; the expert-choice leak).

One grid, so the shared baseline is trained once per seed and every comparison is paired
by seed. Conditions (all from the profile's base model, 8 experts top-2 on the cpu profile):

* ``classic`` - token-choice top-2, softmax, load-balancing loss 0.01: the baseline.
* ``dense (same active)`` - one SwiGLU of width ``k d_ff``: the same FLOPs per token,
  less the router's (``ffn="dense"``, see :class:`~moe_lib.config.ModelConfig`).
* ``dense (same total)`` - one SwiGLU of width ``E d_ff``: the same FFN parameters as all
  E experts, so E/k times the FFN FLOPs.
* ``fine-grained + shared`` - DeepSeekMoE: granularity m = 4 (:func:`~moe_lib.config.fine_grained`),
  one fine expert made shared and the routed top-k cut by one, and one routed expert
  fewer: ``(E m - 1)`` routed, top ``(k m - 1)``, 1 shared of width ``d_ff / m``. Active
  and total expert parameters equal the classic model's.
* ``sigmoid`` - DeepSeek-V3's scoring, everything else classic.
* ``aux-loss-free`` - no load-balancing loss; the selection bias with u = 1e-3 (Wang et al.).
* ``no balancing`` - neither the loss nor the bias: the control for both, so that notebook 08
  can say what each mechanism buys over doing nothing.
* ``expert choice`` - each expert takes its top C = N k / E tokens. Its validation loss is
  computed in batches like every other, so it benefits from the future tokens it can see:
  read it as a leak, not a win.

Router saturation (OLMoE) needs checkpoints from inside a run: notebook 08 trains those runs
with ``TrainConfig.checkpoint_steps``, outside this grid.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from ..config import RunConfig, fine_grained
from ..runs import Grid, Run
from ..metrics import router_saturation
from ..moe.model import MoETransformer, flops_per_token
from ..profiles import Profile
from ..stats import condition_differences, holm_adjusted, mean_ci, mean_std_text, paired_comparison, sign_consistency
from .verdicts import VERDICT_METRIC, ci_side, inconclusive, seeds_text

GRANULARITY = 4
BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's u
MODERN_BASELINE = "classic"


def modern_conditions(base: RunConfig) -> dict[str, RunConfig]:
    """Label -> config of every condition, built from ``base`` as the module docstring says."""
    m = base.model.replace(
        ffn="moe", router="topk", score_func="softmax", load_balancing_weight=0.01, bias_update_rate=0.0,
        noise_std=0.0, z_loss_weight=0.0, capacity_factor=None, num_shared_experts=0,
    )
    fine = fine_grained(m, GRANULARITY)
    models = {
        MODERN_BASELINE: m,
        "dense (same active)": m.replace(ffn="dense"),
        "dense (same total)": m.replace(ffn="dense", top_k=1, d_ff=m.num_experts * m.d_ff),
        "fine-grained + shared": fine.replace(num_experts=fine.num_experts - 1, top_k=fine.top_k - 1, num_shared_experts=1),
        "sigmoid": m.replace(score_func="sigmoid"),
        "aux-loss-free": m.replace(load_balancing_weight=0.0, bias_update_rate=BIAS_UPDATE_RATE),
        "no balancing": m.replace(load_balancing_weight=0.0),
        "expert choice": m.replace(router="expert_choice"),
    }
    return {label: RunConfig(model=model, data=base.data, train=base.train) for label, model in models.items()}


def variant_slug(label: str) -> str:
    """``"dense (same active)"`` -> ``"dense-same-active"``: the run id's factor level."""
    return "-".join(label.replace("(", " ").replace(")", " ").replace("+", " ").split())


# The default grid: every condition (8 conditions x 3 seeds on the cpu profile).
MODERN_GRID_CONDITIONS = (
    MODERN_BASELINE, "dense (same active)", "dense (same total)", "fine-grained + shared", "sigmoid", "aux-loss-free", "no balancing",
    "expert choice",
)


# Validations per run: the loss-vs-compute figure draws each curve from them (the profiles' every-100-steps gives 3-4).
MODERN_VALIDATIONS = 12


def modern_grid(profile: Profile, seeds=None, conditions: tuple[str, ...] = MODERN_GRID_CONDITIONS) -> Grid:
    """The ``conditions`` of :func:`modern_conditions` on the profile's seeds, paired against ``classic``,
    validated :data:`MODERN_VALIDATIONS` times per run so the curves per token, FLOP and second have a shape."""
    steps = profile.base.train.steps
    available = modern_conditions(profile.base.with_train(eval_every=max(1, steps // MODERN_VALIDATIONS)))
    unknown = [c for c in conditions if c not in available]
    if unknown or MODERN_BASELINE not in conditions:
        raise ValueError(f"modern_grid conditions {list(conditions)!r} must include {MODERN_BASELINE!r} and come from {list(available)}")
    runs: list[Run] = []
    for label in conditions:
        config = available[label]
        factors: dict[str, Any] = {"variant": variant_slug(label)}
        runs.extend(Run(condition=label, factors=factors, seed=seed, config=config) for seed in seeds or profile.seeds)
    return Grid(name="modern", runs=runs, factors=("variant",), baseline=MODERN_BASELINE, compares_time=True)  # per-second verdicts


# Merged into moe_lib.studies.STUDIES: ``run_study("modern")``.
MODERN_STUDIES = {"modern": modern_grid}


BASELINE = MODERN_BASELINE
DENSE_BASELINES = ("dense (same active)", "dense (same total)")


def condition_order(results: pd.DataFrame) -> list[str]:
    """The conditions in the order their first row appears in ``results``."""
    return list(dict.fromkeys(results["condition"]))


def flops_by_condition(configs: Mapping[str, RunConfig], vocab_size: int) -> dict[str, int]:
    """Training FLOPs per token of each condition (:func:`~moe_lib.moe.model.flops_per_token`) at the corpus's vocabulary."""
    return {c: flops_per_token(cfg.model.replace(vocab_size=vocab_size), cfg.train.seq_len) for c, cfg in configs.items()}


def condition_table(results: pd.DataFrame, flops: Mapping[str, int]) -> pd.DataFrame:
    """Per condition: val/test PPL (mean ± std over seeds), parameters, FLOPs/token, ms/step, usage CV and MaxVio.

    Usage CV and MaxVio (``max load / mean load - 1``) are the final model's on the validation
    set, averaged over layers; both are 0 for a dense model, which has nothing to balance.
    """
    rows = []
    for condition in condition_order(results):
        part = results[results.condition == condition]
        rows.append({
            "condition": condition,
            "seeds": len(part),
            "val PPL": mean_std_text(part.val_perplexity, 2),
            "test PPL": mean_std_text(part.test_perplexity, 2),
            "active params (M)": f"{part.active_params.iloc[0] / 1e6:.2f}",
            "total params (M)": f"{part.total_params.iloc[0] / 1e6:.2f}",
            "MFLOPs/token": f"{flops[condition] / 1e6:.1f}" if condition in flops else "–",
            "ms/step": mean_std_text(part.ms_per_step, 0),
            "usage CV": mean_std_text(part.expert_usage_cv.fillna(0.0), 3),
            "MaxVio": mean_std_text(part.expert_maxvio.fillna(0.0), 3),
        })
    return pd.DataFrame(rows).set_index("condition")


def per_layer_balance(results: pd.DataFrame, conditions: Sequence[str]) -> pd.DataFrame:
    """Seed-mean usage CV and MaxVio of every layer (columns ``CV L0``, ..., ``MaxVio L0``, ...), one row per condition."""
    layers = sorted(int(c.rsplit("_L", 1)[1]) for c in results.columns if c.startswith("val_cv_L"))
    rows = []
    for condition in conditions:
        part = results[results.condition == condition]
        row = {"condition": condition}
        row.update({f"CV L{l}": round(part[f"val_cv_L{l}"].mean(), 3) for l in layers})
        row.update({f"MaxVio L{l}": round(part[f"val_maxvio_L{l}"].mean(), 3) for l in layers})
        rows.append(row)
    return pd.DataFrame(rows).set_index("condition")


def comparison_table(results: pd.DataFrame, metric: str = VERDICT_METRIC, baseline: str = BASELINE) -> pd.DataFrame:
    """Every condition against ``baseline``, paired by seed: mean difference, its 95% t interval,
    the % change (positive = better) and "k/n seeds" in which the condition is better."""
    cmp = paired_comparison(results, baseline=baseline, metric=metric)
    rows = []
    for _, c in cmp.iterrows():
        k, n = sign_consistency(condition_differences(results, baseline, c.condition, metric), favours="lower")
        rows.append({
            "condition": c.condition,
            "pairs": c.n_pairs,
            f"Δ {metric}": "–" if pd.isna(c.mean_difference) else f"{c.mean_difference:+.2f}",
            "95% CI": "–" if pd.isna(c.difference_ci_low) else f"[{c.difference_ci_low:+.2f}, {c.difference_ci_high:+.2f}]",
            "better (%)": "–" if pd.isna(c.improvement_pct) else f"{c.improvement_pct:+.1f}",
            "better in": seeds_text(k, n),
        })
    return pd.DataFrame(rows).set_index("condition")


def verdict(results: pd.DataFrame, condition: str, baseline: str = BASELINE, metric: str = VERDICT_METRIC,
            what: str = "test perplexity") -> str:
    """One sentence on ``condition`` vs ``baseline`` (lower ``metric`` is better), computed from the paired seeds."""
    row = paired_comparison(results, baseline=baseline, metric=metric).set_index("condition")
    if condition not in row.index:
        raise ValueError(f"unknown condition {condition!r}: valid conditions are {list(row.index)}")
    c = row.loc[condition]
    differences = condition_differences(results, baseline, condition, metric)
    k, n = sign_consistency(differences, favours="lower")
    subject = f"{condition} vs {baseline}, {what}"
    if n == 0:
        return f"{subject}: no seed has both runs, so there is nothing to compare."
    pct = f"{abs(c.improvement_pct):.1f}% {'better' if c.improvement_pct >= 0 else 'worse'}"
    head = f"{subject}: {c.mean_difference:+.2f} on average ({pct}), lower in {seeds_text(k, n)}"
    if pd.isna(c.difference_ci_low):
        return f"{head}; no 95% CI with {n} pair, so {inconclusive(differences)}."
    ci = f"95% CI [{c.difference_ci_low:+.2f}, {c.difference_ci_high:+.2f}]"
    side = ci_side(c)
    if side == "inconclusive":
        return f"{head}; {ci} includes 0: {inconclusive(differences)}."
    return f"{head}; {ci} excludes 0: {condition} is {'better' if side == 'lower' else 'worse'}."


def ratio_phrase(results: pd.DataFrame, condition: str, baseline: str = BASELINE, metric: str = "ms_per_step", what: str = "ms/step") -> str:
    """``"dense (same active) takes 0.62x the ms/step of classic"`` from the seed means; words when there is no ratio."""
    means = results.groupby("condition", sort=False)[metric].mean()
    if pd.isna(means.get(condition)) or pd.isna(means.get(baseline)) or means[baseline] == 0:
        return f"{condition} vs {baseline}: no {what} to compare."
    return f"{condition} takes {means[condition] / means[baseline]:.2f}x the {what} of {baseline} (seed means)."


def moe_vs_dense_summary(results: pd.DataFrame, flops: Mapping[str, int], condition: str = BASELINE) -> list[str]:
    """Section 1's conclusion, one sentence per dense baseline: the perplexity verdict (paired 95% CI),
    the FLOPs per token and the time per step of ``condition`` against it, and what they make of
    "per FLOP" and "per second". Every word is chosen from the numbers."""
    ms = results.groupby("condition").ms_per_step.mean()
    n = results[results.condition == condition].seed.nunique()
    lines = []
    for dense in DENSE_BASELINES:
        if dense not in ms.index or condition not in ms.index:
            continue
        state = ci_side(paired_comparison(results, baseline=dense, metric=VERDICT_METRIC).set_index("condition").loc[condition])
        flop_ratio, time_ratio = flops[condition] / flops[dense], ms[condition] / ms[dense]
        ppl = {"lower": "lower test perplexity (the CI excludes 0)", "higher": "higher test perplexity (the CI excludes 0)",
               "inconclusive": f"a test perplexity that cannot be told apart from it at n = {n}"}[state]
        head = (f"Against {dense}, {condition} reaches {ppl} on the same tokens, with {flop_ratio:.2f}x its FLOPs per token "
                f"and {time_ratio:.2f}x its time per step on this machine")
        if state == "lower" and time_ratio <= 1:
            tail = "so it is ahead per token, per FLOP and per second."
        elif state == "lower":
            tail = (f"so it is ahead per token{' and per FLOP' if flop_ratio <= 1 else ''}; per second it pays {time_ratio:.2f}x "
                    "per step, and the right-hand panel shows whether the lower loss makes up for it.")
        elif state == "higher" and time_ratio >= 1:
            tail = "so it is behind per token and per second."
        elif state == "higher":
            tail = (f"so it is behind per token, at {flop_ratio:.2f}x the FLOPs and {time_ratio:.2f}x the time: a cheaper model "
                    "that learns less per token.")
        elif time_ratio > 1:
            tail = f"so nothing here shows a gain per token or per FLOP, and the same tokens cost it {time_ratio:.2f}x the time."
        else:
            tail = (f"so it costs {time_ratio:.2f}x the time and {flop_ratio:.2f}x the FLOPs for a perplexity not shown to differ: "
                    f"a gain per second only if the true gap is small, which n = {n} cannot settle.")
        lines.append(f"{head}: {tail}")
    return lines


# --------------------------------------------------------------------------- curves: loss vs tokens, FLOPs, wall-clock
def with_compute_axes(histories: pd.DataFrame, results: pd.DataFrame, flops: Mapping[str, int]) -> pd.DataFrame:
    """The validation rows of ``histories`` with ``train_flops = tokens x FLOPs/token`` and
    ``train_seconds = step x the run's mean ms/step`` (optimizer steps only, evaluation excluded)."""
    val = histories.dropna(subset=["val_loss"]).copy()
    val["train_flops"] = val.tokens * val.condition.map(flops)
    ms = results.set_index("run_id").ms_per_step
    val["train_seconds"] = val.step * val.run_id.map(ms) / 1000
    return val


def plot_loss_vs_compute(histories: pd.DataFrame, results: pd.DataFrame, flops: Mapping[str, int],
                         conditions: Sequence[str] = (BASELINE, *DENSE_BASELINES)) -> plt.Figure:
    """Validation loss (mean over seeds) against training tokens, training FLOPs and wall-clock seconds (means over seeds too).

    Where a step has two or more seeds, a shaded band spans the 95% Student-t interval of the loss over
    seeds (:func:`~moe_lib.stats.mean_ci`, the course's one interval), drawn at the seeds' mean x."""
    val = with_compute_axes(histories[histories.condition.isin(conditions)], results, flops)
    # Seeds differ in seconds per step: average x and loss per (condition, step) so each curve is one line.
    means = val.groupby(["condition", "step"], as_index=False)[["tokens", "train_flops", "train_seconds", "val_loss"]].mean()
    intervals = [(c, step, *mean_ci(part.val_loss.to_numpy())[2:]) for (c, step), part in val.groupby(["condition", "step"])]
    bands = means.merge(pd.DataFrame(intervals, columns=["condition", "step", "n", "low", "high"]), on=["condition", "step"])
    bands = bands[bands.n >= 2].sort_values("step")
    palette = dict(zip(conditions, sns.color_palette(n_colors=len(conditions))))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, (x, label) in zip(axes, [("tokens", "training tokens"), ("train_flops", "training FLOPs"), ("train_seconds", "training seconds (this machine)")]):
        sns.lineplot(data=means, x=x, y="val_loss", hue="condition", hue_order=list(conditions), palette=palette, marker="o", errorbar=None,
                     sort=False, ax=ax, legend=ax is axes[0])
        for condition, band in bands.groupby("condition"):
            ax.fill_between(band[x], band.low, band.high, color=palette[condition], alpha=0.2, linewidth=0)
        ax.set(xlabel=label, ylabel="validation loss (nats/token)")
    seeds = "shaded: 95% t interval over seeds" if len(bands) else "one seed: no interval"
    fig.suptitle(f"MoE vs dense: validation loss per token, per FLOP and per second ({seeds})")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- router saturation and the causality leak
def saturation_curve(snapshots: Mapping[int, dict[str, torch.Tensor]], final_model: MoETransformer, batches) -> pd.DataFrame:
    """OLMoE's router saturation of each snapshot (step -> state dict) against ``final_model``: one row per (step, layer)."""
    batches = list(batches)
    model = MoETransformer(final_model.cfg).to(next(final_model.parameters()).device)
    rows = []
    for step in sorted(snapshots):
        model.load_state_dict(snapshots[step])
        rows += [{"step": step, "layer": l, "saturation": s} for l, s in enumerate(router_saturation(model, final_model, batches))]
    return pd.DataFrame(rows, columns=["step", "layer", "saturation"])


def plot_saturation(curves: pd.DataFrame, chance: Mapping[str, float] | None = None,
                    title: str = "Router saturation: share of top-k experts shared with the final model") -> plt.Figure:
    """Saturation against step: a line style per layer, a colour per ``condition`` when ``curves`` has that column,
    and ``chance[condition]`` (k/E) as a dotted level line in the condition's colour."""
    fig, ax = plt.subplots(figsize=(9, 4))
    hue = "condition" if "condition" in curves else None
    conditions = list(dict.fromkeys(curves["condition"])) if hue else []
    palette = dict(zip(conditions, sns.color_palette(n_colors=len(conditions))))
    sns.lineplot(data=curves, x="step", y="saturation", hue=hue, palette=palette or None, style="layer", marker="o", ax=ax)
    for i, (condition, level) in enumerate((chance or {}).items()):  # labels alternate above and below their line
        ax.axhline(level, color=palette.get(condition, "grey"), linestyle=":", linewidth=1.2)
        middle = (curves.step.min() + curves.step.max()) / 2  # where the curves are well above chance
        ax.annotate(f"chance, {condition} (k/E = {level:.2f})", (middle, level), xytext=(0, 3 if i % 2 == 0 else -3),
                    textcoords="offset points", ha="center", va="bottom" if i % 2 == 0 else "top", fontsize=9,
                    color=palette.get(condition, "grey"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set(ylim=(0, 1.02), xlabel="optimizer step of the checkpoint", ylabel="router saturation", title=title)
    fig.tight_layout()
    return fig


def saturation_summary(curves: pd.DataFrame, chance: Mapping[str, float]) -> list[str]:
    """Per condition: the saturation (mean over layers) of each checkpoint before the last, against the
    chance level ``chance[condition]`` (k/E: a router that shares nothing but luck with the final one)."""
    lines = []
    final = curves.step.max()
    for condition, part in curves.groupby("condition", sort=False):
        means = part[part.step < final].groupby("step").saturation.mean()
        if means.empty:
            continue
        steps = ", ".join(f"{v:.2f} at step {step}" for step, v in means.items())
        first = means.iloc[0]
        lines.append(
            f"{condition}: {steps} (mean over layers; chance {chance[condition]:.2f}, the final model 1). The first checkpoint is "
            f"{first / chance[condition]:.1f}x chance, and the last one before the end still routes "
            f"{100 * (1 - means.iloc[-1]):.0f}% of top-k choices differently from the final model."
        )
    return lines


@torch.no_grad()
def earlier_output_change(model: MoETransformer, x: torch.Tensor, replacements: Sequence[int] = (1, 2, 3, 5, 8)) -> float:
    """Largest change of sequence 0's logits at positions ``0..T-2`` when only its LAST token is replaced
    by ``(token + v) mod V`` for each ``v``: 0 for a causal model, whatever the weights."""
    was_training = model.training
    model.eval()
    base = model(x).logits[0, :-1]
    change = 0.0
    for v in replacements:
        changed = x.clone()
        changed[0, -1] = (x[0, -1] + v) % model.cfg.vocab_size
        change = max(change, (model(changed).logits[0, :-1] - base).abs().max().item())
    model.train(was_training)
    return change


# --------------------------------------------------------------------------- what we found
def effect_phrase(results: pd.DataFrame, condition: str, baseline: str = BASELINE, metric: str = VERDICT_METRIC,
                  what: str = "test perplexity") -> str:
    """``"3.8% lower test perplexity than classic (95% CI of the difference [-9.41, +1.68] includes 0: inconclusive at n = 3)"``."""
    c = paired_comparison(results, baseline=baseline, metric=metric).set_index("condition").loc[condition]
    if c.n_pairs == 0:
        return f"no seed with both {condition} and {baseline}"
    change = f"{abs(c.improvement_pct):.1f}% {'lower' if c.improvement_pct >= 0 else 'higher'} {what} than {baseline}"
    if pd.isna(c.difference_ci_low):
        return f"{change} (one pair: no interval)"
    side = ci_side(c)
    state = "includes 0: inconclusive" if side == "inconclusive" else "excludes 0"
    return f"{change} (95% CI of the difference [{c.difference_ci_low:+.2f}, {c.difference_ci_high:+.2f}] {state} at n = {int(c.n_pairs)})"


# Every test notebook 08's verdicts make, once each: (condition, baseline, metric). A sentence that repeats a table
# row (classic vs a dense model, or vs no balancing, on test perplexity) is the same test with the roles swapped.
VERDICT_TESTS = (
    *((c, BASELINE, VERDICT_METRIC) for c in MODERN_GRID_CONDITIONS if c != BASELINE),
    ("aux-loss-free", BASELINE, "expert_maxvio"), ("aux-loss-free", BASELINE, "expert_usage_cv"),
    ("aux-loss-free", "no balancing", VERDICT_METRIC), ("aux-loss-free", "no balancing", "expert_maxvio"),
    (BASELINE, "no balancing", "expert_maxvio"), ("sigmoid", BASELINE, "expert_maxvio"),
)
FAMILY_MEASURES = {VERDICT_METRIC: "test perplexity", "expert_maxvio": "MaxVio", "expert_usage_cv": "usage CV"}


def verdict_family(results: pd.DataFrame) -> list[tuple[str, float]]:
    """``(label, p)`` of every :data:`VERDICT_TESTS` test whose conditions and metric ``results`` has, for
    :func:`~moe_lib.studies.verdicts.family_table` (Holm): the seed-paired t-test of :func:`~moe_lib.stats.paired_comparison`."""
    present, family = set(results.condition), []
    for condition, baseline, metric in VERDICT_TESTS:
        if {condition, baseline} <= present and metric in results:
            p = paired_comparison(results, baseline=baseline, metric=metric).set_index("condition").loc[condition, "p_value"]
            family.append((f"{condition} vs {baseline}, {FAMILY_MEASURES[metric]}", float(p)))
    return family


def findings(results: pd.DataFrame, scale: str = "", load_balancing_weight: float = 0.01) -> list[str]:
    """Notebook 08's conclusions in at most 6 sentences, each with its numbers, from the grid's results table
    (paired by seed against ``classic`` unless said otherwise); conditions the table lacks are left out. The last
    sentence names the tests of :func:`verdict_family` that survive Holm's correction.
    ``scale`` (e.g. ``"cpu profile"``) opens every sentence; ``load_balancing_weight`` is classic's auxiliary-loss weight."""
    present = set(results.condition)
    ms = results.groupby("condition").ms_per_step.mean()
    lead = f"{scale}: " if scale else ""
    family = verdict_family(results)
    holm_by_label = dict(zip((label for label, _ in family), holm_adjusted([p for _, p in family])))
    lines = []
    for dense in (d for d in DENSE_BASELINES if {BASELINE, d} <= present):
        lines.append(f"{lead}The classic MoE reached {effect_phrase(results, BASELINE, dense)}, "
                     f"at {ms[BASELINE] / ms[dense]:.2f}x its time per step.")
    if {"fine-grained + shared", BASELINE} <= present:
        lines.append(f"{lead}Fine-grained + shared experts reached {effect_phrase(results, 'fine-grained + shared')}, "
                     f"at {ms['fine-grained + shared'] / ms[BASELINE]:.2f}x its time per step.")
    if {"aux-loss-free", "no balancing", BASELINE} <= present:
        vs_control = paired_comparison(results, baseline="no balancing", metric=VERDICT_METRIC).set_index("condition")
        balance = paired_comparison(results, baseline="no balancing", metric="expert_maxvio").set_index("condition")
        ppl_side, balance_side = ci_side(vs_control.loc["aux-loss-free"]), ci_side(balance.loc["aux-loss-free"])
        balance_holm = holm_by_label.get("aux-loss-free vs no balancing, MaxVio", float("nan"))
        reading = ("so these runs do not separate what removing the loss and adding the bias each buy"
                   if not (ppl_side == "inconclusive" and balance_side == "lower") else
                   f"so the perplexity gain comes from removing the {load_balancing_weight:g} auxiliary loss, and what the bias buys is "
                   "balance, not perplexity" + ("" if balance_holm < 0.05 else
                                                f" (a lead: the balance gain is significant only uncorrected, Holm p = {balance_holm:.2f})"))
        lines.append(f"{lead}Auxiliary-loss-free balancing reached {effect_phrase(results, 'aux-loss-free')}, and no balancing at all "
                     f"{effect_phrase(results, 'no balancing')}; against no balancing, the bias gave "
                     f"{effect_phrase(results, 'aux-loss-free', 'no balancing')} but "
                     f"{effect_phrase(results, 'aux-loss-free', 'no balancing', 'expert_maxvio', 'MaxVio')}: {reading}.")
    other = [c for c in ("sigmoid", "expert choice") if {c, BASELINE} <= present]
    if other:
        lines.append(f"{lead}" + "; ".join(f"{c.capitalize() if i == 0 else c} reached {effect_phrase(results, c)}"
                                           for i, c in enumerate(other))
                     + ("; expert choice's evaluation sees later tokens of its batch, a leak, not a gain." if "expert choice" in other else "."))
    if family and lines:
        kept = [label for label, q in holm_by_label.items() if q < 0.05]
        lines.append(f"{lead}Of the {len(family)} tests above, {len(kept)} stay significant after Holm's correction"
                     + (f" ({'; '.join(kept)})" if kept else "") + "; read every other CI that excludes 0 as a lead, not a finding.")
    return lines
