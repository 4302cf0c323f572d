"""Notebook 02's "What we found" (moe_lib.studies.routing.findings) on hand-made results tables:
each sentence quotes the seed-paired differences of the table it is given, at each scale, and says
which verdicts change between the cpu and the gpu profile."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from moe_lib import studies
from moe_lib.profiles import get_profile
from moe_lib.studies import routing
from moe_lib.studies.verdicts import holm_sentence

SEEDS = (42, 43, 44)


def study_with_losses(profile_name: str, loss) -> studies.StudyResult:
    """A routing study whose test loss is ``loss(condition, seed)``."""
    profile = get_profile(profile_name)
    grid = studies.build_grid("routing", profile, seeds=SEEDS)
    rows = [{"run_id": run.run_id, "condition": run.condition, **run.factors, "seed": run.seed,
             "test_loss": loss(run.condition, run.seed), "router_entropy": 1.0} for run in grid.runs]
    return studies.StudyResult(grid, profile, pd.DataFrame(rows), pd.DataFrame(), None)


def ci(differences) -> str:
    """The 95% t-interval of the mean, computed here from scipy, as the findings print it."""
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return f"95% CI [{mean - half:+.3f}, {mean + half:+.3f}]"


# Per seed, each condition's loss relative to "top-2 random" (2.0): learned better by about 0.1 at k = 1 and 2;
# the shared expert makes learned top-2 worse (+0.05) and random top-2 better by an inconclusive amount.
NOISE = {42: -0.01, 43: 0.0, 44: 0.01}
RANDOM_ARM = {42: -0.01, 43: -0.06, 44: 0.02}  # + shared minus without, random routing: mean -0.017, CI includes 0
LEARNED_ARM = {42: 0.05, 43: 0.06, 44: 0.04}


def cpu_loss(condition: str, seed: int) -> float:
    top2 = 1.9 + NOISE[seed]
    return {
        "top-1 random": 2.2, "top-1": 2.1 + NOISE[seed], "top-2 random": 2.0, "top-2": top2,
        "top-2 + shared": top2 + LEARNED_ARM[seed], "top-2 random + shared": 2.0 + RANDOM_ARM[seed],
    }[condition]


def test_findings_quote_the_paired_differences_of_the_table():
    lines = routing.findings(study_with_losses("cpu", cpu_loss))
    assert len(lines) <= 6
    first, top2_vs_top1, arms, shared, holm, scale = lines
    learned_minus_random = [cpu_loss("top-1", s) - 2.2 for s in SEEDS]
    assert f"top-1 cpu -0.100 nats ({ci(learned_minus_random)}, 3/3 seeds): CI below 0" in first
    assert "top-2 cpu -0.100 nats" in first
    assert "Top-2 minus top-1, both learned: cpu -0.200 nats (95% CI [-0.200, -0.200], 3/3 seeds): CI below 0" in top2_vs_top1
    assert f"learned top-2's test loss by cpu +0.050 nats ({ci(list(LEARNED_ARM.values()))}, 3/3 seeds): CI above 0" in arms
    assert f"random top-2's by cpu -0.017 nats ({ci(list(RANDOM_ARM.values()))}, 2/3 seeds): inconclusive" in arms
    with_shared = [cpu_loss("top-2 + shared", s) - cpu_loss("top-2 random + shared", s) for s in SEEDS]
    assert f"learned minus random top-2: cpu {sum(with_shared) / 3:+.3f} nats ({ci(with_shared)}" in shared
    assert "cpu-scale findings only" in scale and "gpu" not in first
    assert holm == holm_sentence({"cpu": routing.verdict_family(study_with_losses("cpu", cpu_loss))})
    assert holm.startswith("After Holm's correction over this notebook's tests, significant: cpu ")


def test_verdicts_report_both_arms_of_the_shared_expert_effect():
    line = next(l for l in routing.routing_verdicts(study_with_losses("cpu", cpu_loss)) if l.startswith("Each arm"))
    assert "learned top-2 +0.050 nats" in line and "random top-2 -0.017 nats" in line and "2/3 seeds): inconclusive" in line


def test_findings_at_two_scales_name_the_verdicts_that_change():
    # gpu: learned top-1 no better than random (seeds disagree); every other comparison as on cpu
    spread = {42: -0.3, 43: 0.1, 44: 0.2}
    gpu = study_with_losses("gpu", lambda c, s: 2.2 + spread[s] if c == "top-1" else cpu_loss(c, s))
    lines = routing.findings(study_with_losses("cpu", cpu_loss), gpu)
    assert len(lines) <= 6
    assert "top-1 cpu -0.100 nats" in lines[0] and "; gpu +0.000 nats" in lines[0]
    scale = lines[-1]
    # top-1's spread also makes top-2 minus top-1 inconclusive on gpu; the other four comparisons keep their verdicts
    assert scale.startswith("What changes with scale (cpu -> gpu): the verdict of learned minus random, top-1 "
                            "(below 0 on cpu, inconclusive on gpu); top-2 minus top-1 (learned) (below 0 on cpu, "
                            "inconclusive on gpu); the rest keep theirs."), scale
    same = routing.findings(study_with_losses("cpu", cpu_loss), study_with_losses("gpu", cpu_loss))[-1]
    assert "no verdict changes" in same


def test_findings_without_the_shared_expert_runs_leave_out_its_sentences():
    study = study_with_losses("cpu", cpu_loss)
    study.results = study.results[~study.results.condition.isin(list(routing.SHARED_EXPERT_CONDITIONS))]
    lines = routing.findings(study)
    assert len(lines) == 4 and not any("shared" in line for line in lines)
    assert lines[2].startswith("After Holm's correction") and "of 3" in lines[2]


def test_verdict_family_holds_a_paired_t_test_per_comparison():
    study = study_with_losses("cpu", cpu_loss)
    family = dict(routing.verdict_family(study))
    assert len(family) == 7
    arm = list(RANDOM_ARM.values())
    assert math.isclose(family["adding the shared expert, random top-2"], stats.ttest_1samp(arm, 0.0).pvalue)
    learned_arm = list(LEARNED_ARM.values())
    change = [-r + l for r, l in zip(arm, learned_arm)]  # advantage (random - learned) with the shared expert minus without
    assert math.isclose(family["shared expert's change of learned routing's advantage"], stats.ttest_1samp(change, 0.0).pvalue)
    results = study.results.set_index(["condition", "seed"]).test_loss
    top1 = stats.ttest_rel([results["top-1", s] for s in SEEDS], [results["top-1 random", s] for s in SEEDS]).pvalue
    assert math.isclose(family["learned minus random, top-1"], top1)
