"""Notebook 08's tables and verdicts on a hand-made results table whose answers are known."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from moe_lib.stats import condition_differences, minimum_detectable_effect
from moe_lib.studies import modern

NAN = float("nan")
# test PPL per seed (42, 43, 44): "better" is lower in every seed by about 1; "noisy" goes both ways;
# "one seed" has a single run; "gap" lost seed 44's value.
PPL = {
    "classic": [10.0, 11.0, 12.0],
    "better": [9.0, 10.1, 10.9],
    "noisy": [9.0, 12.0, 11.5],
    "one seed": [9.5],
    "gap": [9.0, 10.0, NAN],
}


def results() -> pd.DataFrame:
    rows = []
    for condition, values in PPL.items():
        for seed, ppl in zip((42, 43, 44), values):
            dense = condition == "gap"  # stands in for a dense model: no routing statistics
            rows.append({
                "run_id": f"{condition}-{seed}", "condition": condition, "seed": seed, "val_perplexity": ppl, "test_perplexity": ppl,
                "active_params": 2_000_000, "total_params": 5_000_000, "ms_per_step": 100.0 if condition == "classic" else 50.0,
                "expert_usage_cv": NAN if dense else 0.1, "expert_maxvio": NAN if dense else 0.5,
                "val_cv_L0": NAN if dense else 0.1, "val_maxvio_L0": NAN if dense else 0.5,
            })
    return pd.DataFrame(rows)


def test_verdicts_name_a_winner_only_when_the_interval_excludes_zero():
    r = results()
    assert modern.verdict(r, "better").endswith("excludes 0: better is better.")
    assert "-1.00 on average (9.1% better), lower in 3/3 seeds" in modern.verdict(r, "better")
    noisy = modern.verdict(r, "noisy")
    # the course's one inconclusive phrase: sign consistency (seeds on the mean's side) and the 80%-power MDE
    differences = condition_differences(r, "classic", "noisy", "test_perplexity")
    mde = minimum_detectable_effect(float(differences.std(ddof=1)), 3)
    assert noisy.endswith(f"includes 0: inconclusive at n = 3 (2/3 seeds point the same way; MDE {mde:.2f} at 80% power).")
    assert "lower in 2/3 seeds" in noisy
    one = modern.verdict(r, "one seed")
    assert "no 95% CI with 1 pair" in one and "inconclusive at n = 1 (1/1 seeds point the same way; too few seeds for an MDE)" in one
    gap = modern.verdict(r, "gap")  # seed 44's NaN leaves 2 pairs, both exactly 1 lower: a zero-width interval
    assert "lower in 2/2 seeds" in gap and gap.endswith("excludes 0: gap is better.")
    assert "no effect" not in " ".join(modern.verdict(r, c) for c in PPL if c != "classic")
    with pytest.raises(ValueError, match="unknown condition 'nope'"):
        modern.verdict(r, "nope")


def test_worse_condition_is_called_worse():
    r = results()
    r.loc[r.condition == "better", "test_perplexity"] += 3  # now higher than classic in every seed
    worse = modern.verdict(r, "better")
    assert worse.endswith("excludes 0: better is worse.") and "+2.00 on average (18.3% worse), lower in 0/3 seeds" in worse


def test_comparison_table_counts_pairs_and_seeds_with_nan_and_one_seed():
    table = modern.comparison_table(results())
    assert table.loc["gap", "pairs"] == 2 and table.loc["gap", "better in"] == "2/2 seeds"
    assert table.loc["one seed", "95% CI"] == "–" and table.loc["one seed", "better in"] == "1/1 seeds"
    assert table.loc["better", "better in"] == "3/3 seeds"
    assert table.loc["better", "Δ test_perplexity"] == "-1.00"


def test_condition_table_shows_mean_std_and_zero_balance_for_dense():
    table = modern.condition_table(results(), flops={"classic": 12_000_000})
    assert table.loc["classic", "test PPL"] == "11.00 ± 1.00"
    assert table.loc["one seed", "test PPL"] == "9.50"  # one run: no std
    assert table.loc["gap", "seeds"] == 3 and table.loc["gap", "test PPL"] == "9.50 ± 0.71"  # the NaN run is left out
    assert table.loc["gap", "usage CV"] == "0.000 ± 0.000" and table.loc["classic", "MaxVio"] == "0.500 ± 0.000"
    assert table.loc["classic", "MFLOPs/token"] == "12.0" and table.loc["better", "MFLOPs/token"] == "–"
    assert table.loc["classic", "active params (M)"] == "2.00"
    balance = modern.per_layer_balance(results(), ["classic", "gap"])
    assert balance.loc["classic", "MaxVio L0"] == 0.5 and math.isnan(balance.loc["gap", "CV L0"])


def test_ratio_phrase_and_compute_axes():
    r = results()
    assert modern.ratio_phrase(r, "better") == "better takes 0.50x the ms/step of classic (seed means)."
    assert modern.ratio_phrase(r, "better", metric="expert_maxvio", baseline="gap", what="MaxVio").endswith("no MaxVio to compare.")
    hist = pd.DataFrame({"run_id": ["classic-42"] * 2, "condition": ["classic"] * 2, "step": [5, 10], "tokens": [50, 100], "val_loss": [NAN, 3.0]})
    axes = modern.with_compute_axes(hist, r, {"classic": 7})
    assert axes.step.tolist() == [10] and axes.train_flops.tolist() == [700] and axes.train_seconds.tolist() == [1.0]


def _dense_results(classic_ppl, classic_ms):
    """classic against the two dense baselines, 3 seeds; the dense models at PPL 10, 11, 12 and 100 ms/step."""
    rows = []
    for condition in ("classic", *modern.DENSE_BASELINES):
        for seed, base in zip((42, 43, 44), (10.0, 11.0, 12.0)):
            ppl = base + classic_ppl[seed - 42] if condition == "classic" else base
            rows.append({"run_id": f"{condition}-{seed}", "condition": condition, "seed": seed, "test_perplexity": ppl,
                         "ms_per_step": classic_ms if condition == "classic" else 100.0})
    return pd.DataFrame(rows)


FLOPS = {"classic": 8, "dense (same active)": 8, "dense (same total)": 24}


@pytest.mark.parametrize("shift, ms, words", [
    ((-1.0, -1.1, -0.9), 120.0, "lower test perplexity (the CI excludes 0)"),
    ((-1.0, -1.1, -0.9), 80.0, "so it is ahead per token, per FLOP and per second."),
    ((1.0, 1.1, 0.9), 120.0, "so it is behind per token and per second."),
    ((-1.0, 2.0, 0.5), 110.0, "cannot be told apart from it at n = 3"),
    ((-1.0, 2.0, 0.5), 110.0, "the same tokens cost it 1.10x the time."),
    ((-1.0, 2.0, 0.5), 90.0, "costs 0.90x the time and 1.00x the FLOPs for a perplexity not shown to differ"),
])
def test_moe_vs_dense_summary_chooses_its_words_from_the_numbers(shift, ms, words):
    lines = modern.moe_vs_dense_summary(_dense_results(shift, ms), FLOPS)
    assert len(lines) == 2 and lines[0].startswith("Against dense (same active), classic reaches")
    assert words in lines[0]
    assert "1.00x its FLOPs per token" in lines[0] and "0.33x its FLOPs per token" in lines[1]
    assert f"{ms / 100:.2f}x its time per step" in lines[0]


def test_moe_vs_dense_summary_never_claims_per_second_from_a_slower_better_model():
    line = modern.moe_vs_dense_summary(_dense_results((-1.0, -1.1, -0.9), 150.0), FLOPS)[0]
    assert "ahead per token and per FLOP; per second it pays 1.50x per step" in line and "ahead per second" not in line


def test_saturation_summary_reads_each_checkpoint_against_chance():
    curves = pd.DataFrame({
        "condition": ["a"] * 6, "step": [10, 10, 20, 20, 30, 30], "layer": [0, 1] * 3, "saturation": [0.4, 0.6, 0.8, 0.9, 1.0, 1.0],
    })
    (line,) = modern.saturation_summary(curves, chance={"a": 0.25})
    assert line.startswith("a: 0.50 at step 10, 0.85 at step 20 (mean over layers; chance 0.25")
    assert "first checkpoint is 2.0x chance" in line and "still routes 15% of top-k choices differently" in line


def test_plot_saturation_draws_each_chance_level_in_its_conditions_colour():
    import matplotlib.colors as mcolors

    curves = pd.DataFrame({"condition": ["a", "a", "b", "b"], "step": [10, 20, 10, 20], "layer": [0, 0, 0, 0],
                           "saturation": [0.5, 1.0, 0.4, 1.0]})
    fig = modern.plot_saturation(curves, chance={"a": 0.25, "b": 0.2})
    ax = fig.axes[0]
    lines = {round(l.get_ydata()[0], 3): l for l in ax.lines if l.get_linestyle() == ":"}
    assert set(lines) == {0.25, 0.2}
    curve_colours = {mcolors.to_hex(l.get_color()) for l in ax.lines if l.get_linestyle() != ":" and len(l.get_xdata()) == 2}
    assert {mcolors.to_hex(lines[0.25].get_color()), mcolors.to_hex(lines[0.2].get_color())} <= curve_colours
    assert {t.get_text() for t in ax.texts} == {"chance, a (k/E = 0.25)", "chance, b (k/E = 0.20)"}
    assert len(modern.plot_saturation(curves).axes[0].texts) == 0


def _findings_results(alf_ppl=(9.0, 10.0, 11.0), alf_maxvio=(0.5, 0.6, 0.4)):
    """classic at PPL 10, 11, 12 and MaxVio 0.2; no balancing 1 PPL lower (noisily) with MaxVio 2; aux-loss-free as given."""
    table = {
        "classic": ((10.0, 11.0, 12.0), (0.2, 0.2, 0.2), 100.0),
        "dense (same active)": ((10.5, 11.0, 11.6), (NAN, NAN, NAN), 50.0),
        "no balancing": ((9.2, 9.8, 11.1), (2.0, 2.1, 1.9), 100.0),
        "aux-loss-free": (alf_ppl, alf_maxvio, 110.0),
    }
    return pd.DataFrame([
        {"run_id": f"{c}-{seed}", "condition": c, "seed": seed, "test_perplexity": ppl[i], "expert_maxvio": mv[i], "ms_per_step": ms}
        for c, (ppl, mv, ms) in table.items() for i, seed in enumerate((42, 43, 44))
    ])


def test_findings_say_where_the_aux_loss_free_gain_comes_from():
    lines = modern.findings(_findings_results(), scale="cpu profile")
    assert len(lines) == 3 and all(line.startswith("cpu profile: ") for line in lines)  # dense (same active), aux-loss-free, Holm
    assert "0.4% lower test perplexity than dense (same active)" in lines[0] and "at 2.00x its time per step" in lines[0]
    alf = lines[1]
    assert "9.1% lower test perplexity than classic (95% CI of the difference [-1.00, -1.00] excludes 0 at n = 3)" in alf
    assert "lower MaxVio than no balancing" in alf and "includes 0: inconclusive" in alf
    assert alf.endswith("so the perplexity gain comes from removing the 0.01 auxiliary loss, and what the bias buys is balance, not perplexity.")
    family = modern.verdict_family(_findings_results())
    assert lines[2].startswith(f"cpu profile: Of the {len(family)} tests above, ")
    assert lines[2].endswith("read every other CI that excludes 0 as a lead, not a finding.")


def test_findings_call_a_balance_gain_that_fails_holm_a_lead():
    """Three seeds whose MaxVio gap is clear uncorrected (p ~ 0.02) but not after Holm over the family."""
    results = _findings_results(alf_maxvio=(1.5, 1.4, 1.5))
    lines, family = modern.findings(results), modern.verdict_family(results)
    holm = dict(zip((label for label, _ in family), modern.holm_adjusted([p for _, p in family])))
    q = holm["aux-loss-free vs no balancing, MaxVio"]
    assert q >= 0.05
    assert lines[1].endswith(f"balance, not perplexity (a lead: the balance gain is significant only uncorrected, Holm p = {q:.2f}).")


def test_findings_do_not_credit_the_loss_when_the_bias_also_changes_perplexity():
    lines = modern.findings(_findings_results(alf_ppl=(7.0, 7.5, 8.9)), load_balancing_weight=0.02)
    assert lines[1].endswith("so these runs do not separate what removing the loss and adding the bias each buy.")
    assert not lines[1].startswith(":")


def test_findings_leave_out_conditions_the_table_lacks():
    r = _findings_results()
    assert modern.findings(r[r.condition.isin(["classic", "no balancing"])]) == []


def test_effect_phrase_with_one_pair_has_no_interval():
    r = _findings_results()
    one = r[(r.seed == 42)]
    assert modern.effect_phrase(one, "aux-loss-free") == "10.0% lower test perplexity than classic (one pair: no interval)"


def _curves(seeds):
    rows = []
    for c, shift in (("classic", 0.0), ("dense (same active)", 0.1)):
        for seed in seeds:
            for step in (10, 20, 30):
                rows.append({"run_id": f"{c}-{seed}", "condition": c, "seed": seed, "step": step, "tokens": 100 * step,
                             "val_loss": 5.0 - step / 10 + shift + 0.05 * (seed - 43)})
    hist = pd.DataFrame(rows)
    res = pd.DataFrame([{"run_id": f"{c}-{s}", "condition": c, "seed": s, "ms_per_step": 10.0}
                        for c in ("classic", "dense (same active)") for s in seeds])
    return hist, res


def test_loss_vs_compute_draws_a_t_interval_band_only_with_several_seeds():
    from matplotlib.collections import PolyCollection

    from moe_lib.stats import mean_ci

    hist, res = _curves((42, 43, 44))
    flops = {"classic": 2, "dense (same active)": 2}
    fig = modern.plot_loss_vs_compute(hist, res, flops, conditions=("classic", "dense (same active)"))
    for ax in fig.axes:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2  # one per condition
    _, _, _, low, high = mean_ci([5.0 - 1 - 0.05, 5.0 - 1, 5.0 - 1 + 0.05])  # classic at step 10
    classic_band = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)][0]
    at_step_10 = [y for x, y in classic_band.get_paths()[0].vertices if x == 1000]  # tokens = 100 x step
    assert min(at_step_10) == pytest.approx(low) and max(at_step_10) == pytest.approx(high)
    assert "95% t interval" in fig._suptitle.get_text()
    hist1, res1 = _curves((42,))
    fig1 = modern.plot_loss_vs_compute(hist1, res1, flops, conditions=("classic", "dense (same active)"))
    assert not [c for ax in fig1.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert "one seed" in fig1._suptitle.get_text()


def test_verdict_family_holds_each_printed_test_once_with_its_paired_p():
    """Notebook 08's family for Holm: every condition vs classic on test perplexity, plus the balance tests of
    sections 3 and 4, each once (classic vs no balancing on perplexity is the table's row, not a second test)."""
    from moe_lib.stats import paired_comparison

    r = _findings_results()
    family = dict(modern.verdict_family(r))
    assert list(family) == [
        "dense (same active) vs classic, test perplexity", "aux-loss-free vs classic, test perplexity",
        "no balancing vs classic, test perplexity", "aux-loss-free vs classic, MaxVio",
        "aux-loss-free vs no balancing, test perplexity", "aux-loss-free vs no balancing, MaxVio", "classic vs no balancing, MaxVio",
    ]  # usage CV needs expert_usage_cv rows: the conditions are present, the column is not, so it is absent below
    expected = paired_comparison(r, baseline="no balancing", metric="expert_maxvio").set_index("condition").loc["aux-loss-free", "p_value"]
    assert family["aux-loss-free vs no balancing, MaxVio"] == pytest.approx(expected)
    full = dict(modern.verdict_family(results().assign(condition=lambda d: d.condition.replace({"better": "sigmoid"}))))
    assert set(full) == {"sigmoid vs classic, test perplexity", "sigmoid vs classic, MaxVio"}
