"""A finished study's main table and figures, as ``python -m moe_lib run`` shows them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from .. import plots
from ..stats import summarize
from .capacity import capacity_table
from .dispatch import dispatch_table
from .noise import noise_condition_table
from .result import StudyResult
from .routing import routing_table
from .verdicts import VERDICT_METRIC
from .zloss import zloss_table


@dataclass
class StudyReport:
    """The study's main table and the paths its figures were saved to."""

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
        s = summarize(study.results, by=["noise_std", "load_balancing_weight"], metrics=[VERDICT_METRIC])
        figures[f"{name}_interaction"] = plots.plot_interaction(
            s, "noise_std", "load_balancing_weight", VERDICT_METRIC, plots.column_label(VERDICT_METRIC), "Noise x load balancing"
        )
    elif name == "zloss":
        summary = zloss_table(study)
        figures[f"{name}_logit_magnitude"] = plots.plot_layer_metric(h, "logsumexp", "mean logsumexp", "Router logit magnitude")
    elif name == "dispatch":
        summary = dispatch_table(study)
    elif name == "capacity":
        summary = capacity_table(study)
        figures[f"{name}_sweep"] = plots.plot_capacity_sweep(study.results, VERDICT_METRIC, title=f"Capacity factor: dropped slots and {plots.column_label(VERDICT_METRIC)}")
    else:
        summary = routing_table(study)
    paths = [plots.save_figure(f, n, study.profile) for n, f in figures.items()]  # a temp folder under smoke
    if not show:
        for fig in figures.values():
            plt.close(fig)
    return StudyReport(summary, paths)
