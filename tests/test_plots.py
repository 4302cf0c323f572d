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


def test_interaction_plot_names_its_factors_in_words_not_column_names():
    summary = pd.DataFrame({"noise_std": [0.0, 0.5, 0.0, 0.5], "load_balancing_weight": [0.01, 0.01, 0.0, 0.0],
                            "test_perplexity_mean": [90.0, 95.0, 91.0, 96.0], "test_perplexity_ci_low": [88.0, 93.0, 89.0, 94.0],
                            "test_perplexity_ci_high": [92.0, 97.0, 93.0, 98.0]})
    fig = plots.plot_interaction(summary, "noise_std", "load_balancing_weight", "test_perplexity", "test perplexity", "")
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert ax.get_xlabel() == "router noise std" and legend.get_title().get_text() == "load-balancing weight"
    assert [t.get_text() for t in legend.get_texts()] == ["0.01", "0"]
    assert "_" not in ax.get_xlabel() + legend.get_title().get_text()
    assert plots.column_label("some_other_column") == "some other column"


def test_layer_metric_names_coinciding_conditions_together_instead_of_hiding_them():
    """Random routers all sit at ln E: drawn one by one, the last line hides the others. They get one line and one
    legend entry that names them all; a learned condition that only starts at ln E keeps its own."""
    steps = [1, 2, 3]
    rows = []
    for condition, curve in (("top-1", [1.38, 1.2, 1.0]), ("top-1 random", [1.386] * 3), ("top-2 random", [1.386] * 3),
                             ("top-2 random + shared", [1.3862] * 3)):
        for seed in (42, 43):
            rows += [{"condition": condition, "seed": seed, "step": s, "entropy_L0": v, "entropy_L1": v} for s, v in zip(steps, curve)]
    fig = plots.plot_routing_entropy(pd.DataFrame(rows), num_experts=4)
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert labels == ["top-1", "top-1 random = top-2 random = top-2 random + shared (coincide)", "uniform: ln 4"]
    assert len([l for l in fig.axes[0].lines if len(l.get_xdata()) == len(steps)]) == 2  # two curves, no hidden ones


def _heatmap_limits(fig):
    mesh = fig.axes[0].collections[0]
    return mesh.norm.vmin, mesh.norm.vmax


def test_coactivation_colour_scale_is_not_stretched_by_pairs_never_chosen():
    rng = np.random.default_rng(0)
    lift = np.exp2(rng.uniform(-1, 1, size=(8, 8)))  # lifts between 0.5 and 2
    np.fill_diagonal(lift, np.nan)
    with_zeros = lift.copy()
    with_zeros[0, 5] = with_zeros[5, 0] = 0.0  # a pair never chosen together: log2 lift = -inf
    spread = plots.coactivation_spread([lift])
    assert plots.coactivation_spread([with_zeros]) == pytest.approx(spread, rel=0.05)  # 2 of 56 cells do not move it
    assert 0.8 < spread <= 1.0  # the 95th percentile of |log2 lift| of uniform(-1, 1)
    low, high = _heatmap_limits(plots.plot_coactivation([with_zeros, lift]))
    assert low == pytest.approx(-plots.coactivation_spread([with_zeros, lift])) and high == -low  # centred at log2 1 = 0
    assert plots.coactivation_spread([np.full((2, 2), 1.0)]) == pytest.approx(np.log2(1.25))  # a floor, never a zero-width scale
