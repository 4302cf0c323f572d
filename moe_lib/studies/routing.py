"""Notebook 02's study: learned vs random routing, top-1 and top-2, with 4 experts as in the original
grid (the moe-experiments study), and learned vs random top-2 with one shared expert (the original's
layers had one: does it explain why random routing came close?). Its grid, table and verdicts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..runs import Grid
from ..profiles import Profile
from ..stats import mean_ci, mean_std_text, one_sample_p, sign_consistency
from . import originals
from .result import StudyResult, conditions, layer_means, pair_series, pair_values, paired_table, per_layer
from .verdicts import ci_text, holm_sentence, lower_is_better_phrase, overfit_lines, seeds_text, significance


SHARED_EXPERT_CONDITIONS = {"top-2 + shared": "topk", "top-2 random + shared": "random"}


def routing_grid(profile: Profile, seeds=None) -> Grid:
    """Learned vs random routing, k = 1 and 2, with 4 experts as in the original grid; and learned vs
    random top-2 with one shared expert (``num_shared_experts=1``), as in every layer of the original."""
    base = profile.base.with_model(num_experts=4, noise_std=0.0, load_balancing_weight=0.01, z_loss_weight=0.0)
    conditions = {
        f"top-{k}" + (" random" if router == "random" else ""): {"router": router, "top_k": k, "num_shared_experts": 0}
        for router, k in (("topk", 1), ("topk", 2), ("random", 1), ("random", 2))
    }
    conditions.update({label: {"router": router, "top_k": 2, "num_shared_experts": 1} for label, router in SHARED_EXPERT_CONDITIONS.items()})
    return Grid.from_conditions("routing_types", base, conditions, seeds or profile.seeds, baseline="top-2")


def routing_table(study: StudyResult) -> pd.DataFrame:
    """Per condition: test loss/PPL (mean ± std), top-3 accuracy, entropy and usage std per layer."""
    rows = []
    for condition in conditions(study):
        part = study.results[study.results.condition == condition]
        rows.append({
            "condition": condition,
            "seeds": len(part),
            "test loss": mean_std_text(part.test_loss, 3),
            "test PPL": mean_std_text(part.test_perplexity, 2),
            "test top-3 acc. (%)": mean_std_text(100 * part.test_top3_accuracy, 2),
            "routing entropy per layer": per_layer(part, "val_entropy"),
            "usage std per layer": per_layer(part, "val_util_std"),
        })
    return pd.DataFrame(rows).set_index("condition")


def best_condition(study: StudyResult, metric: str = "test_loss") -> str:
    """The condition with the lowest seed-mean ``metric``."""
    return study.results.groupby("condition")[metric].mean().idxmin()


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
        cmp = paired_table(study, "test_loss", random).loc[learned]
        lines.append(
            f"Learned top-{k} vs random top-{k}: test loss {means[learned]:.3f} vs {means[random]:.3f}; "
            f"paired difference {cmp.mean_difference:+.3f} nats, {ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
            f"{lower_is_better_phrase('learned routing', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high, pair_values(study, 'test_loss', random, learned))}. "
            f"The original found learned better ({loss['top-1']:.2f}/{loss['top-2']:.2f} vs {loss['top-1 random']:.2f}), on one seed."
        )
    learned, random = "top-2 + shared", "top-2 random + shared"
    if {learned, random} <= set(study.results.condition):
        cmp = paired_table(study, "test_loss", random).loc[learned]
        plain = paired_table(study, "test_loss", "top-2 random").loc["top-2"]
        # Does the shared expert shrink learned routing's advantage? Per seed: advantage (random - learned) with it minus without it.
        with_shared = -pair_series(study, "test_loss", random, learned)
        without = -pair_series(study, "test_loss", "top-2 random", "top-2")
        change = (with_shared - without).dropna()  # < 0: the shared expert shrinks the advantage
        mean, _, _, low, high = mean_ci(change)
        effect = f"shrinks learned routing's advantage by {-mean:.3f} nats" if mean < 0 else f"grows learned routing's advantage by {mean:.3f} nats"
        lines.append(
            f"With one shared expert (as in every layer of the original): learned vs random top-2, paired difference "
            f"{cmp.mean_difference:+.3f} nats, {ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
            f"{lower_is_better_phrase('learned routing', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high, pair_values(study, 'test_loss', random, learned))}; "
            f"without it {plain.mean_difference:+.3f} nats. The original's explanation (a shared expert makes random routing "
            f"nearly as good) predicts a smaller advantage with it. Per seed, advantage (random - learned loss) with the shared "
            f"expert minus without: mean {mean:+.3f} nats, {ci_text(low, high, 3)}, so the shared expert {effect} on average: "
            f"{'the CI excludes 0' if (low > 0 or high < 0) else significance(low, high, change.to_numpy(), 3, ' nats')}"
            + (", and with it random routing has the lower mean loss." if cmp.mean_difference > 0 else ".")
        )
        arms = shared_expert_arms(study)
        lines.append(
            "Each arm of the shared-expert effect (test loss with it minus without, per seed): "
            + "; ".join(f"{arm} top-2 {_effect_text(d)}" for arm, d in arms.items()) + "."
        )
    cmp = paired_table(study, "test_loss", "top-1").loc["top-2"]
    lines.append(
        f"Top-2 vs top-1 (learned): paired difference {cmp.mean_difference:+.3f} nats, {ci_text(cmp.difference_ci_low, cmp.difference_ci_high, 3)}: "
        f"{lower_is_better_phrase('top-2', cmp.mean_difference, cmp.difference_ci_low, cmp.difference_ci_high, pair_values(study, 'test_loss', 'top-1', 'top-2'))}. "
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
        ours = layer_means(study.results[study.results.condition == f"top-{k}"], "val_entropy")
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
    return lines + overfit_lines(study.results)


# --------------------------------------------------------------------------- what we found
def shared_expert_arms(study: StudyResult) -> dict[str, pd.Series]:
    """Per seed, test loss with one shared expert minus without it, for learned (``"learned"``) and
    random (``"random"``) top-2 routing: the two arms whose difference the shared-expert verdict tests."""
    return {
        "learned": pair_series(study, "test_loss", "top-2", "top-2 + shared"),
        "random": pair_series(study, "test_loss", "top-2 random", "top-2 random + shared"),
    }


def verdict_family(study: StudyResult) -> list[tuple[str, float]]:
    """``(label, p)`` of every test :func:`routing_verdicts` makes, for :func:`~moe_lib.studies.verdicts.family_table`:
    paired t-tests (``scipy.stats.ttest_1samp`` of the per-seed differences, the same as ``ttest_rel``)."""
    family = [(label, one_sample_p(differences)) for label, differences in _comparisons(study).items()]
    if set(SHARED_EXPERT_CONDITIONS) <= set(study.results.condition):
        # learned routing's advantage (random - learned loss) with the shared expert minus without it, per seed
        with_shared = pair_series(study, "test_loss", "top-2 + shared", "top-2 random + shared")
        without = pair_series(study, "test_loss", "top-2", "top-2 random")
        family.append(("shared expert's change of learned routing's advantage", one_sample_p((with_shared - without).dropna())))
    return family



def _side(differences: pd.Series) -> str:
    """Where the 95% CI of the mean of ``differences`` lies: ``"below 0"``, ``"above 0"`` or ``"inconclusive"``."""
    _, _, _, low, high = mean_ci(differences)
    return "below 0" if high < 0 else "above 0" if low > 0 else "inconclusive"


def _effect_text(differences: pd.Series) -> str:
    """``"-0.090 nats (95% CI [-0.461, +0.281], 2/3 seeds): inconclusive"``: a mean paired difference, its
    interval, how many seeds share its sign, and where the CI lies (:func:`_side`)."""
    mean, _, _, low, high = mean_ci(differences)
    side = _side(differences)
    return f"{mean:+.3f} nats ({ci_text(low, high, 3)}, {seeds_text(*sign_consistency(differences))}): {'CI ' if side != 'inconclusive' else ''}{side}"


def _comparisons(study: StudyResult) -> dict[str, pd.Series]:
    """The per-seed test-loss differences the findings rest on, keyed by what each compares."""
    found = {
        "learned minus random, top-1": pair_series(study, "test_loss", "top-1 random", "top-1"),
        "learned minus random, top-2": pair_series(study, "test_loss", "top-2 random", "top-2"),
        "top-2 minus top-1 (learned)": pair_series(study, "test_loss", "top-1", "top-2"),
    }
    if set(SHARED_EXPERT_CONDITIONS) <= set(study.results.condition):
        arms = shared_expert_arms(study)
        found["adding the shared expert, learned top-2"] = arms["learned"]
        found["adding the shared expert, random top-2"] = arms["random"]
        found["learned minus random, top-2 with the shared expert"] = pair_series(study, "test_loss", "top-2 random + shared", "top-2 + shared")
    return found


def findings(cpu_study: StudyResult, gpu_study: StudyResult | None = None) -> list[str]:
    """At most 6 plain sentences: learned vs random routing at k = 1 and 2, top-2 vs top-1, the shared
    expert's two arms, at each scale with results, and what changes with scale.

    Every number is a seed-paired test-loss difference (nats; negative: the first named is lower,
    i.e. better) with its 95% t-interval and sign count, and whether the CI lies below 0, above 0 or includes it.
    """
    studies = [s for s in (cpu_study, gpu_study) if s is not None]
    found = {s.profile.name: _comparisons(s) for s in studies}

    def at_each_scale(key: str) -> str:
        return "; ".join(f"{name} {_effect_text(c[key])}" for name, c in found.items() if key in c)

    lines = [
        f"Learned minus random routing, test loss: top-1 {at_each_scale('learned minus random, top-1')}; "
        f"top-2 {at_each_scale('learned minus random, top-2')}.",
        f"Top-2 minus top-1, both learned: {at_each_scale('top-2 minus top-1 (learned)')}.",
    ]
    if any("adding the shared expert, learned top-2" in c for c in found.values()):
        lines.append(
            "Adding one shared expert changes learned top-2's test loss by "
            f"{at_each_scale('adding the shared expert, learned top-2')}, and random top-2's by "
            f"{at_each_scale('adding the shared expert, random top-2')}: the original's explanation (a shared expert "
            "makes random routing nearly as good) needs the random arm to improve, not the learned one to get worse."
        )
        lines.append(
            "With the shared expert, learned minus random top-2: "
            f"{at_each_scale('learned minus random, top-2 with the shared expert')}."
        )
    lines.append(holm_sentence({s.profile.name: verdict_family(s) for s in studies}))
    if gpu_study is None:
        lines.append("No gpu-profile results for this study were found, so these are cpu-scale findings only.")
    else:
        cpu, gpu = found[cpu_study.profile.name], found[gpu_study.profile.name]
        changed = [f"{key} ({_side(cpu[key])} on {cpu_study.profile.name}, {_side(gpu[key])} on {gpu_study.profile.name})"
                   for key in cpu if key in gpu and _side(cpu[key]) != _side(gpu[key])]
        lines.append(
            f"What changes with scale ({cpu_study.profile.name} -> {gpu_study.profile.name}): "
            + ("the verdict of " + "; ".join(changed) + "; the rest keep theirs" if changed else "no verdict changes")
            + ". A verdict at one scale is not a general truth."
        )
    return lines
