"""Figures for the notebooks: training curves, routing per layer, expert usage, grid summaries.

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
import numpy as np
import pandas as pd
import seaborn as sns

from .profiles import Profile, output_paths

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


def plot_loss_curves(history: pd.DataFrame, title: str = "Language-model loss") -> plt.Figure:
    """Training LM loss (lines, mean and 95% band over seeds) and validation loss (markers)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    hue = _hue(history)
    sns.lineplot(data=history, x="step", y="lm_loss", hue=hue, errorbar=("ci", 95), ax=ax)
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


def plot_expert_utilization(history: pd.DataFrame, title: str = "Expert utilization per layer") -> plt.Figure:
    """One panel per layer, one line per expert: share of routed slots vs step (one run or a seed mean)."""
    layers = layers_in(history, "util_std")
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.6), sharey=True, squeeze=False)
    mean = history.groupby("step").mean(numeric_only=True).reset_index()
    for ax, layer in zip(axes[0], layers):
        experts = experts_in(history, layer)
        for e in experts:
            ax.plot(mean["step"], mean[f"util_L{layer}_E{e}"], label=f"E{e}", linewidth=1.2)
        ax.axhline(1 / len(experts), color="grey", linestyle=":", label="uniform")
        ax.set(title=f"layer {layer}", xlabel="optimizer step", ylabel="share of routed slots")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
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
        ax.errorbar(part[x].astype(str), mean, yerr=[low, high], marker="o", capsize=4, label=f"{hue} = {level}")
    ax.set(xlabel=x, ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_metric_by_condition(results: pd.DataFrame, metric: str, ylabel: str, title: str, order: Sequence[str] | None = None) -> plt.Figure:
    """Bar of the mean per condition (95% CI) with every seed's value as a dot."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * results["condition"].nunique()), 4.2))
    order = list(order) if order is not None else list(dict.fromkeys(results["condition"]))
    sns.barplot(data=results, x="condition", y=metric, order=order, errorbar=("ci", 95), ax=ax, color="C0", alpha=0.55)
    sns.stripplot(data=results, x="condition", y=metric, order=order, ax=ax, color="black", size=5)
    ax.set(xlabel="", ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, name: str, profile: Profile) -> Path:
    """Save ``fig`` as ``<images>/<name>.png`` (a temp folder under the smoke profile)."""
    path = output_paths(profile).images / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
