"""Figures for the notebooks: training curves, routing per layer, expert usage, grid summaries,
the specialization figures of notebook 05 and the capacity figures of notebook 06.

Every function takes tidy pandas data (histories with ``condition``, ``seed`` and ``step``
columns, or a results table with one row per run), draws on matplotlib axes with seaborn
styling, labels axes with units, and returns the figure. :func:`save_figure` writes PNGs
to ``images/`` except in the smoke profile.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm
import numpy as np
import pandas as pd
import seaborn as sns

from .profiles import Profile, output_paths
from .stats import capacity_label, mean_ci, t_errorbar

sns.set_theme(style="whitegrid", context="notebook")


def layers_in(history: pd.DataFrame, prefix: str = "entropy") -> list[int]:
    """Layer numbers that have a ``<prefix>_L<n>`` column."""
    pattern = re.compile(rf"^{prefix}_L(\d+)$")
    return sorted(int(m.group(1)) for c in history.columns if (m := pattern.match(c)))


def experts_in(history: pd.DataFrame, layer: int) -> list[int]:
    pattern = re.compile(rf"^util_L{layer}_E(\d+)$")
    return sorted(int(m.group(1)) for c in history.columns if (m := pattern.match(c)))


def _hue(history: pd.DataFrame) -> str | None:
    return "condition" if "condition" in history.columns and history["condition"].nunique() > 1 else None


# Readable names of the results' columns, for axes and legends (any other column: its underscores become spaces).
COLUMN_LABELS = {"noise_std": "router noise std", "load_balancing_weight": "load-balancing weight",
                 "test_perplexity": "test perplexity", "val_perplexity": "validation perplexity",
                 "best_val_perplexity": "best validation perplexity (10 batches)", "capacity_factor": "capacity factor"}


def column_label(column: str) -> str:
    """``"noise_std"`` -> ``"router noise std"``: the words a figure shows for a results column."""
    return COLUMN_LABELS.get(column, column.replace("_", " "))


def coinciding_conditions(history: pd.DataFrame, columns: Sequence[str], tolerance: float = 1e-3) -> dict[str, str]:
    """Condition -> legend label. Conditions whose seed-mean curves agree within ``tolerance`` at every step of every
    column share one label, ``"a = b (coincide)"``, and one line: drawn separately, the last would hide the others
    (random routers all sit at entropy ln E)."""
    means = history.groupby(["condition", "step"], sort=False)[list(columns)].mean()
    groups: list[list[str]] = []
    for condition in dict.fromkeys(history["condition"]):
        curve = means.loc[condition]
        for group in groups:
            first = means.loc[group[0]]
            if first.index.equals(curve.index) and np.allclose(first.to_numpy(float), curve.to_numpy(float), atol=tolerance, rtol=0, equal_nan=True):
                group.append(condition)
                break
        else:
            groups.append([condition])
    return {c: " = ".join(group) + (" (coincide)" if len(group) > 1 else "") for group in groups for c in group}


def plot_loss_curves(history: pd.DataFrame, title: str = "Language-model loss") -> plt.Figure:
    """Training LM loss (lines, mean and 95% t-interval band over seeds) and validation loss (markers)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    hue = _hue(history)
    sns.lineplot(data=history, x="step", y="lm_loss", hue=hue, errorbar=t_errorbar(), ax=ax)
    if "val_loss" in history.columns and history["val_loss"].notna().any():
        val = history.dropna(subset=["val_loss"])
        sns.lineplot(data=val, x="step", y="val_loss", hue=hue, errorbar=None, ax=ax, marker="o", linestyle="--", legend=False)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=f"{title}  (solid: train, dashed: validation)")
    fig.tight_layout()
    return fig


def plot_layer_metric(
    history: pd.DataFrame,
    prefix: str,
    ylabel: str,
    title: str,
    reference: float | None = None,
    reference_label: str | None = None,
) -> plt.Figure:
    """One panel per layer: ``<prefix>_L<n>`` vs step, one line per condition (mean over seeds)."""
    layers = layers_in(history, prefix)
    if not layers:
        raise ValueError(f"history has no '{prefix}_L<n>' columns; columns are {sorted(history.columns)[:20]}...")
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.6), sharey=True, squeeze=False)
    hue = _hue(history)
    if hue:  # one line, one legend entry, per group of conditions whose curves coincide
        labels = coinciding_conditions(history, [f"{prefix}_L{layer}" for layer in layers])
        shown = {label: condition for condition, label in reversed(labels.items())}.values()
        history = history[history.condition.isin(shown)].assign(condition=lambda h: h.condition.map(labels))
    for ax, layer in zip(axes[0], layers):
        sns.lineplot(data=history, x="step", y=f"{prefix}_L{layer}", hue=hue, errorbar=None, ax=ax, legend=ax is axes[0][-1])
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle=":", label=reference_label)
        ax.set(title=f"layer {layer}", xlabel="optimizer step", ylabel=ylabel)
    if hue or reference is not None:
        axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_routing_entropy(history: pd.DataFrame, num_experts: int, title: str = "Routing entropy per layer") -> plt.Figure:
    return plot_layer_metric(
        history, "entropy", "entropy (nats)", title, reference=float(np.log(num_experts)), reference_label=f"uniform: ln {num_experts}"
    )


def _log_spread(values: np.ndarray, least: float = 1.01) -> float:
    """``s`` such that ``[1/s, s]`` covers every positive finite ratio in ``values`` on a log scale centred on 1."""
    positive = values[np.isfinite(values) & (values > 0)]
    return max(float(np.exp(np.max(np.abs(np.log(positive))))) if positive.size else 2.0, least)


def _ratio_ticks(colorbar, spread: float) -> None:
    """Label a log colour bar centred on 1 with plain ratios (1/8 ... 8) instead of powers of ten."""
    ticks = [t for t in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, 16.0) if 1 / spread <= t <= spread]
    colorbar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    colorbar.minorticks_off()


UTILIZATION_MAX_RATIO = 4.0  # colour scale of plot_expert_utilization: 1/4 to 4 times the uniform share


def plot_expert_utilization(history: pd.DataFrame, title: str = "Expert utilization per layer") -> plt.Figure:
    """One heatmap per layer (small multiples): experts x step, coloured by the expert's share of routed
    slots relative to uniform (``share * E``; 1 = its fair share), on a log scale centred on 1.
    One run, or the mean over the runs (seeds) in ``history``."""
    layers = layers_in(history, "util_std")
    mean = history.groupby("step").mean(numeric_only=True)
    ratios = {layer: mean[[f"util_L{layer}_E{e}" for e in experts_in(history, layer)]].T * len(experts_in(history, layer)) for layer in layers}
    # Capped at 4x either way: a share of 0 in the first steps would otherwise wash out the rest of the scale.
    spread = min(_log_spread(np.concatenate([r.to_numpy(dtype=float).ravel() for r in ratios.values()])), UTILIZATION_MAX_RATIO)
    norm = LogNorm(vmin=1 / spread, vmax=spread)
    num_experts = max(len(r) for r in ratios.values())
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers) + 1.0, 0.32 * num_experts + 2.0), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, layer in zip(axes[0], layers):
        grid = ratios[layer].clip(lower=1 / spread, upper=spread)
        grid.index = [f"E{e}" for e in experts_in(history, layer)]
        mesh = ax.pcolormesh(grid.columns.to_numpy(dtype=float), np.arange(len(grid)), grid.to_numpy(), cmap="vlag", norm=norm, shading="nearest")
        ax.set_yticks(np.arange(len(grid)), grid.index)
        ax.set(title=f"layer {layer}", xlabel="optimizer step")
    axes[0][0].set_ylabel("expert")
    axes[0][0].invert_yaxis()
    _ratio_ticks(fig.colorbar(mesh, ax=axes[0].tolist(), extend="both", label="share / uniform share (log)"), spread)
    fig.suptitle(title)
    return fig


def plot_interaction(
    summary: pd.DataFrame, x: str, hue: str, metric: str, ylabel: str, title: str
) -> plt.Figure:
    """Mean of ``metric`` vs factor ``x``, one line per level of ``hue``, with 95% CI bars.

    ``summary`` has one row per condition with ``x``, ``hue`` and ``<metric>_mean``,
    ``<metric>_ci_low``, ``<metric>_ci_high`` columns (see ``experiments.summarize``).
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for level, part in summary.groupby(hue, sort=False):
        part = part.sort_values(x)
        mean = part[f"{metric}_mean"].to_numpy(dtype=float)
        low = np.nan_to_num(mean - part[f"{metric}_ci_low"].to_numpy(dtype=float))
        high = np.nan_to_num(part[f"{metric}_ci_high"].to_numpy(dtype=float) - mean)
        ax.errorbar(part[x].astype(str), mean, yerr=[low, high], marker="o", capsize=4, label=f"{level:g}" if isinstance(level, (int, float, np.number)) else str(level))
    ax.set(xlabel=column_label(x), ylabel=ylabel, title=title)
    ax.legend(title=column_label(hue))
    fig.tight_layout()
    return fig


def plot_metric_by_condition(results: pd.DataFrame, metric: str, ylabel: str, title: str, order: Sequence[str] | None = None) -> plt.Figure:
    """Bar of the mean per condition with its 95% t-interval (the tables' interval) and every seed's value as a dot."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * results["condition"].nunique()), 4.2))
    order = list(order) if order is not None else list(dict.fromkeys(results["condition"]))
    sns.barplot(data=results, x="condition", y=metric, order=order, errorbar=t_errorbar(), ax=ax, color="C0", alpha=0.55)
    sns.stripplot(data=results, x="condition", y=metric, order=order, ax=ax, color="black", size=5)
    ax.set(xlabel="", ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig


def _mean_and_ci_bars(samples: Sequence, floor: float | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Means of ``samples`` (one array of seed values per point) and their 95% t-interval as
    ``errorbar`` ``yerr``; a missing interval (one seed) draws no bar. ``floor`` (log axes) lifts
    means and interval ends below it up to it."""
    stats_ = [mean_ci(values) for values in samples]
    mean = np.array([s[0] for s in stats_])
    low_end = np.array([s[3] for s in stats_])
    high_end = np.array([s[4] for s in stats_])
    if floor is not None:
        mean, low_end, high_end = np.maximum(mean, floor), np.clip(low_end, floor, None), np.maximum(high_end, floor)
    return mean, [np.nan_to_num(mean - low_end), np.nan_to_num(high_end - mean)]


# --------------------------------------------------------------------------- specialization (notebook 05)
def _layer_panels(n_layers: int, width: float = 3.4, height: float = 3.2):
    fig, axes = plt.subplots(1, n_layers, figsize=(width * n_layers, height), squeeze=False)
    return fig, axes[0]


def plot_label_expert_heatmap(table: pd.DataFrame, label: str, value: str = "share", title: str = "") -> plt.Figure:
    """One heatmap per layer: rows the values of ``label`` (e.g. genre), columns the experts.

    ``table`` is :func:`moe_lib.studies.trace_counts.label_utilization`'s long format. ``value="share"``
    colours each row's share of slots per expert around the uniform ``1/E``; ``"lift"`` colours the
    ratio to the expert's overall share around 1. One colour scale for all layers.
    """
    layers = sorted(table["layer"].unique())
    num_experts = table["expert"].nunique()
    values = table[value].to_numpy(dtype=float)
    if value == "share":
        center = 1.0 / num_experts
        spread = float(np.nanmax(np.abs(values - center))) or 1e-9
        scale = {"center": center, "vmin": center - spread, "vmax": center + spread}
    else:  # a lift is >= 0 and multiplicative: a log scale centred on 1, 0.5 and 2 equally far from it
        spread = _log_spread(values)
        scale = {"norm": LogNorm(vmin=1 / spread, vmax=spread)}
    n_rows = table[label].nunique()
    fig, axes = _layer_panels(len(layers), width=0.6 * num_experts + 1.5, height=0.55 * n_rows + 1.9)
    for ax, layer in zip(axes, layers):
        grid = table[table.layer == layer].pivot(index=label, columns="expert", values=value)
        annot = (100 * grid).round(0).astype(int).astype(str) if value == "share" else grid.round(2).astype(str)
        shown = grid if value == "share" else grid.clip(lower=1 / spread)  # a lift of 0 sits at the bottom of the log scale
        sns.heatmap(shown, ax=ax, cmap="vlag", annot=annot, fmt="", annot_kws={"fontsize": 9}, cbar=ax is axes[-1], linewidths=0.3,
                    cbar_kws={"label": "share of slots" if value == "share" else "lift (log scale, 1 = chance)"} if ax is axes[-1] else None,
                    **scale)
        ax.set(title=f"layer {layer}", xlabel="expert", ylabel=label if ax is axes[0] else "")
        ax.tick_params(axis="y", labelrotation=0)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    if value != "share":
        _ratio_ticks(axes[-1].collections[0].colorbar, spread)
    unit = "share of the row's slots (%), centre = uniform 1/E" if value == "share" else "lift: share / expert's overall share"
    fig.suptitle(f"{title}  ({unit})" if title else unit)
    fig.tight_layout()
    return fig


def plot_mi_by_layer(mi: pd.DataFrame, title: str = "Mutual information between expert choice and label", floor: float = 1e-6) -> plt.Figure:
    """``mi`` has one row per (condition, seed, variable, layer) with ``mi_bits``: one panel per
    variable, one line per condition, the seed mean with its 95% t-interval, seeds as dots.

    The y axis is logarithmic, because a random router's MI is orders of magnitude below a
    learned one's; an interval that reaches 0 or below is cut at ``floor``.
    """
    variables = list(dict.fromkeys(mi["variable"]))
    fig, axes = plt.subplots(1, len(variables), figsize=(5.2 * len(variables), 3.8), squeeze=False)
    for ax, variable in zip(axes[0], variables):
        part = mi[mi.variable == variable]
        for i, (condition, rows) in enumerate(part.groupby("condition", sort=False)):
            layers = sorted(rows.layer.unique())
            mean, yerr = _mean_and_ci_bars([rows[rows.layer == l].mi_bits for l in layers], floor=floor)
            x = np.array(layers) + (i - 0.5) * 0.08
            ax.errorbar(x, mean, yerr=yerr, marker="o", capsize=4, label=condition, color=f"C{i}")
            ax.scatter(rows.layer + (i - 0.5) * 0.08, np.maximum(rows.mi_bits, floor), s=10, color=f"C{i}", alpha=0.4)
        ax.set(title=variable, xlabel="layer", ylabel="I(expert; label) (bits, log scale)", xticks=sorted(part.layer.unique()))
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} (mean and 95% CI over seeds; dots: seeds)")
    fig.tight_layout()
    return fig


COACTIVATION_PERCENTILE = 95  # the colour scale spans this percentile of |log2 lift| over the pairs chosen at least once


def coactivation_spread(lifts: Sequence[np.ndarray]) -> float:
    """Half-width of the co-activation colour scale in log2 lift: the :data:`COACTIVATION_PERCENTILE` th percentile
    of ``|log2 lift|`` over finite positive lifts (at least log2 1.25). A pair never chosen (lift 0, log2 = -inf)
    does not stretch it: it is drawn at the bottom of the scale and annotated 0.0."""
    values = np.concatenate([np.ravel(l) for l in lifts]) if len(lifts) else np.array([])
    positive = values[np.isfinite(values) & (values > 0)]
    if not positive.size:
        return 1.0
    return max(float(np.percentile(np.abs(np.log2(positive)), COACTIVATION_PERCENTILE)), float(np.log2(1.25)))


def plot_coactivation(lifts: Sequence[np.ndarray], title: str = "Expert co-activation") -> plt.Figure:
    """One heatmap per layer of the pair lift ``C_ij / expected_ij`` (1 = as usage predicts), coloured by log2 lift
    centred at 0 and clipped at :func:`coactivation_spread`, so a few never-chosen pairs do not wash out the rest."""
    lifts = [np.asarray(l, dtype=float) for l in lifts]
    num_experts = lifts[0].shape[0]
    spread = coactivation_spread(lifts)
    fig, axes = _layer_panels(len(lifts), width=0.6 * num_experts + 1.3, height=0.6 * num_experts + 0.9)
    for layer, (ax, lift) in enumerate(zip(axes, lifts)):
        with np.errstate(divide="ignore"):
            shown = np.clip(np.log2(lift), -spread, spread)
        sns.heatmap(shown, ax=ax, cmap="vlag", center=0, vmin=-spread, vmax=spread,
                    annot=np.round(lift, 1), fmt="", annot_kws={"fontsize": 8}, cbar=ax is axes[-1], square=True,
                    mask=~np.isfinite(lift),
                    cbar_kws={"label": f"log2 lift (clipped at ±{spread:.1f})", "extend": "both"} if ax is axes[-1] else None)
        ax.set(title=f"layer {layer}", xlabel="expert", ylabel="expert" if ax is axes[0] else "")
    fig.suptitle(f"{title}: lift of each top-2 pair over what usage predicts (annotated; 1 = chance)")
    fig.tight_layout()
    return fig


def plot_capacity_sweep(results: pd.DataFrame, metric: str, title: str = "Capacity factor sweep") -> plt.Figure:
    """Dropped fraction in training (left) and ``metric`` (right; the verdict metric, test perplexity) against the
    capacity factor (dropless last), one line per load-balancing weight; several seeds give mean and 95% CI."""
    finite = sorted(results.capacity_factor.dropna().unique())
    order = [capacity_label(c) for c in finite] + (["dropless"] if results.capacity_factor.isna().any() else [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, ylabel, scale) in zip(
        axes, [("train_dropped_fraction", "dropped slots (% of routed, training)", 100.0), (metric, column_label(metric), 1.0)]
    ):
        for i, (lb, part) in enumerate(results.groupby("load_balancing_weight", sort=False)):
            labels = part.capacity_factor.map(capacity_label)
            mean, yerr = _mean_and_ci_bars([scale * part.loc[labels == o, metric] for o in order])
            ax.errorbar(range(len(order)), mean, yerr=yerr, marker="o", capsize=4, label=f"lb weight {lb}", color=f"C{i}")
        ax.set_xticks(range(len(order)), order)
        ax.set(xlabel="capacity factor (C = ceil(cf N k / E))", ylabel=ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- dispatch speed (notebook 07)
def plot_dispatch_benchmark(layer: pd.DataFrame, tokens: int, title: str = "MoE layer, forward + backward, fp32") -> plt.Figure:
    """One panel per layer shape: achieved GFLOP/s of each implementation at ``tokens`` tokens,
    with the machine's measured fp32 matmul peak (same run) as a dashed line.

    ``layer`` is :func:`moe_lib.benchmark_results.benchmark_layer_frame`'s table.
    """
    part = layer[layer.tokens == tokens]
    if part.empty:
        raise ValueError(f"no benchmark rows at {tokens} tokens; measured: {sorted(layer.tokens.unique())}")
    shapes = list(dict.fromkeys(part["shape"]))
    implementations = list(dict.fromkeys(part["implementation"]))
    colors = dict(zip(implementations, sns.color_palette("deep", len(implementations))))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 0.42 * len(implementations) + 1.8), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = part[part["shape"] == shape].set_index("implementation").reindex(implementations)
        ax.barh(range(len(implementations)), rows.gflops, color=[colors[i] for i in implementations])
        for y, (g, pct) in enumerate(zip(rows.gflops, rows.pct_peak)):
            if pd.notna(g):
                ax.text(g, y, f" {g:.0f} ({pct:.0f}%)", va="center", fontsize=9)
        peak = rows.peak_gflops.dropna().iloc[0]
        ax.axvline(peak, color="black", linestyle="--", linewidth=1)
        ax.text(peak, len(implementations) - 0.4, " fp32 peak", fontsize=9, va="top")
        ax.set(title=f"{rows.label.dropna().iloc[0]}\n{shape}", xlabel="GFLOP/s (% of peak)", xlim=(0, peak * 1.35))
        ax.set_yticks(range(len(implementations)), implementations)
        ax.invert_yaxis()
    fig.suptitle(f"{title}, {tokens} tokens")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, name: str, profile: Profile) -> Path:
    """Save ``fig`` as ``<images>/<name>.png`` (a temp folder under the smoke profile)."""
    path = output_paths(profile).images / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
