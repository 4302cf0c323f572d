"""Figures draw what the tables say: the same t interval, log colour scales centred on 1 for ratios."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm

from moe_lib import plots
from moe_lib.stats import mean_ci

RESULTS = pd.DataFrame({"condition": ["a"] * 3 + ["b"] * 3, "seed": [1, 2, 3] * 2, "cv": [0.83, 0.96, 1.11, 0.2, 0.3, 0.25]})


def test_bars_show_the_t_interval_of_the_tables_not_a_bootstrap():
    fig = plots.plot_metric_by_condition(RESULTS, "cv", ylabel="CV", title="")
    bar = fig.axes[0].lines[0].get_ydata()  # seaborn draws each error bar as a vertical line
    _, _, _, low, high = mean_ci(RESULTS.cv[:3])
    assert sorted(bar) == pytest.approx([low, high])
    assert low < RESULTS.cv[:3].min() and high > RESULTS.cv[:3].max()  # a bootstrap CI cannot leave [min, max]


def test_lift_heatmap_has_a_log_scale_centred_on_one_and_no_negative_range():
    rows = [{"layer": 0, "expert": e, "cls": c, "lift": lift, "share": 0.25}
            for c, lifts in (("x", [0.0, 0.5, 1.0, 3.0]), ("y", [1.2, 0.9, 2.0, 1.0])) for e, lift in enumerate(lifts)]
    fig = plots.plot_label_expert_heatmap(pd.DataFrame(rows), "cls", value="lift")
    norm = fig.axes[0].collections[0].norm
    assert isinstance(norm, LogNorm)
    assert norm.vmin > 0 and norm.vmin * norm.vmax == pytest.approx(1.0)  # 1 in the middle of a log scale
    assert norm.vmax == pytest.approx(3.0)


def test_utilization_is_a_heatmap_of_experts_by_step_per_layer():
    steps = np.arange(1, 6)
    history = pd.DataFrame({"step": steps, "util_std_L0": 0.1, "util_std_L1": 0.1,
                            **{f"util_L{l}_E{e}": 0.25 for l in (0, 1) for e in range(4)}})
    history["util_L1_E0"], history["util_L1_E1"] = 0.5, 0.05  # 2x and 0.2x the uniform share: the scale caps at 4x
    fig = plots.plot_expert_utilization(history)
    panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1"]
    mesh = panels[1].collections[0]
    assert mesh.get_array().shape == (4, len(steps))  # experts x steps
    assert isinstance(mesh.norm, LogNorm) and mesh.norm.vmax == pytest.approx(plots.UTILIZATION_MAX_RATIO)
