"""Notebook 07's experiment grid: what modern MoE changes, each variant against the classic one.

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
* ``no balancing`` - neither the loss nor the bias: the control for both, so that notebook 07
  can say what each mechanism buys over doing nothing.
* ``expert choice`` - each expert takes its top C = N k / E tokens. Its validation loss is
  computed in batches like every other, so it benefits from the future tokens it can see:
  read it as a leak, not a win.

Router saturation (OLMoE) needs checkpoints from inside a run: notebook 07 trains those runs
with ``TrainConfig.checkpoint_steps``, outside this grid.
"""

from __future__ import annotations

from typing import Any

from .config import RunConfig, fine_grained
from .experiments import Grid, Run
from .profiles import Profile

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


def modern_grid(profile: Profile, seeds=None, conditions: tuple[str, ...] = MODERN_GRID_CONDITIONS) -> Grid:
    """The ``conditions`` of :func:`modern_conditions` on the profile's seeds, paired against ``classic``."""
    available = modern_conditions(profile.base)
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
