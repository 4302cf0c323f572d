"""The original studies' reported results, as data, with their source.

The course compares its runs with what the originals reported; those numbers live here, once,
and the verdicts in :mod:`moe_lib.studies` compute their comparisons from these tables. Labels
(``condition``) are the course's condition labels, so a table joins on them directly. The
sources are the documents in the course's source material (see the README's sources).
"""

from __future__ import annotations

import pandas as pd

ROUTING_SOURCE = "moe-experiments README (tsh-03/moe-experiments, MIT), results table; one seed, 3,000 steps"
# Test loss, top-3 accuracy, routing entropy and expert-utilization std per layer (5 layers).
ROUTING = pd.DataFrame(
    [
        ("top-1", "Top-1", 2.46, 66.79, (1.11, 1.08, 1.06, 0.94, 0.78), (0.02, 0.11, 0.12, 0.11, 0.09)),
        ("top-1 random", "Top-1 Random", 2.53, 65.57, (1.27,) * 5, (0.01,) * 5),
        ("top-2", "Top-2", 2.42, 67.22, (1.06, 1.02, 0.95, 0.78, 0.65), (0.03, 0.02, 0.07, 0.05, 0.11)),
        ("top-2 random", "Top-2 Random", 2.53, 65.63, (1.27,) * 5, (0.01,) * 5),
    ],
    columns=["condition", "model", "test_loss", "top3_accuracy_pct", "routing_entropy_per_layer", "utilization_std_per_layer"],
).set_index("condition")

NOISE_SOURCE = "routing-noise study write-up: results table (mean ± std over seeds 42, 43, 44), 400 steps"
# Best validation perplexity (mean ± std over 3 seeds), expert-usage CV (pooled over layers), minutes.
NOISE = pd.DataFrame(
    [
        (0.0, 0.01, 130.23, 0.94, 0.0696, 1.6),
        (0.0, 0.00, 130.54, 1.02, 0.2064, 1.6),
        (0.1, 0.01, 131.38, 1.00, 0.0640, 1.6),
        (0.1, 0.00, 131.71, 1.09, 0.2279, 1.6),
        (0.5, 0.01, 144.37, 1.40, 0.0639, 1.6),
        (0.5, 0.00, 144.30, 0.54, 0.3345, 1.6),
    ],
    columns=["noise_std", "load_balancing_weight", "best_val_perplexity_mean", "best_val_perplexity_std", "expert_usage_cv", "training_time_minutes"],
)
NOISE_PER_SEED = pd.DataFrame(
    [
        (0.0, 0.01, 42, 129.75, 0.0661), (0.0, 0.01, 43, 131.55, 0.0867), (0.0, 0.01, 44, 129.40, 0.0560),
        (0.0, 0.00, 42, 130.99, 0.2169), (0.0, 0.00, 43, 131.50, 0.2426), (0.0, 0.00, 44, 129.13, 0.1598),
        (0.1, 0.01, 42, 130.86, 0.0620), (0.1, 0.01, 43, 132.79, 0.0835), (0.1, 0.01, 44, 130.51, 0.0465),
        (0.1, 0.00, 42, 131.90, 0.2505), (0.1, 0.00, 43, 132.94, 0.2667), (0.1, 0.00, 44, 130.30, 0.1665),
        (0.5, 0.01, 42, 144.55, 0.0541), (0.5, 0.01, 43, 145.99, 0.0808), (0.5, 0.01, 44, 142.57, 0.0567),
        (0.5, 0.00, 42, 145.03, 0.4388), (0.5, 0.00, 43, 144.13, 0.3138), (0.5, 0.00, 44, 143.73, 0.2510),
    ],
    columns=["noise_std", "load_balancing_weight", "seed", "best_val_perplexity", "expert_usage_cv"],
)

ZLOSS_SOURCE = "z-loss tutorial: results table (one seed; its ms/step figures are implausible)"
# Test perplexity, improvement vs the baseline (%), ms/step and router entropy (nats; none for the baseline).
ZLOSS = pd.DataFrame(
    [
        ("baseline", "Baseline MoE (Control)", 12.46, float("nan"), 106_844.96, float("nan")),
        ("z=0.001", "MoE with Z-Loss (0.001)", 12.33, 1.0, 100_612.23, 1.810),
        ("z=0.001, no noise", "Z-Loss (0.001) + No Noise", 12.25, 1.7, 100_204.35, 1.805),
        ("z=0.01", "Higher Z-Loss (0.01)", 11.75, 5.7, 100_918.52, 1.884),
    ],
    columns=["condition", "experiment", "test_perplexity", "improvement_pct", "ms_per_step", "router_entropy"],
).set_index("condition")

SOURCES = {"routing": ROUTING_SOURCE, "noise": NOISE_SOURCE, "zloss": ZLOSS_SOURCE}


# --------------------------------------------------------------------------- the originals' setups
# What each original's code and write-up actually did, one entry per row of
# :func:`moe_lib.studies.comparison.setup_comparison` (keys are :data:`SETUP_ROWS`). Facts read from the
# originals' public code, summarised in the source material's README ("What the originals' code
# actually did"); "not stated" where neither the code summary nor the write-up gives a value.
SETUP_ROWS = (
    "data", "model size", "steps and tokens", "gate function", "shared expert",
    "auxiliary-loss reduction", "CV definition", "router noise", "optimizer",
    "experts", "z-loss reduction", "step counting", "reported metric",
)
_LLM_PY = "the noise / z-loss studies' llm.py"
_LLM_PY_OPTIMIZER = (  # the version of llm.py with the z-loss option; the noise write-up says "Muon for most 2D params"
    "Muon (Nesterov momentum 0.95, bf16 Newton-Schulz, no weight decay) on every 2-D weight but the token embedding "
    "(tied to the LM head) and the norms: attention, every expert's two matrices, the router's gate; "
    "AdamW on the embedding and norms at 0.1 x Muon's lr, weight decay 0.1; gradients clipped at 1.0"
)
_LLM_PY_EXPERTS = "separate experts, each linear1 -> SiLU -> dropout -> linear2 (an MLP, not SwiGLU), no biases; dropout 0.1 throughout"
_LLM_PY_STEPS = ("its loop counts micro-batches and steps the optimizers every gradient_accumulation_steps (default 4): "
                 "{steps} steps may be {optimizer_steps} optimizer steps, and the warmup + cosine schedule, written over "
                 "max_steps but advanced once per optimizer step, then covers only part of its curve; the setting run is not stated")
SETUPS: dict[str, dict[str, str]] = {
    "routing": {
        "data": "character-level tokens: a sample of Alice in Wonderland, or TinyStories",
        "model size": "d_model 128, 5 layers, 4 heads, context 64, 4 routed experts of width 256, top-1 or top-2; params not reported",
        "steps and tokens": f"3,000 steps x batch 16 x 64 = {3000 * 16 * 64 / 1e6:.2f}M tokens",
        "gate function": "sigmoid of the chosen top-k logits (weights do not sum to 1, so top-1 gets a gradient); "
                         "random: torch.randint, may pick one expert twice, weights all 1",
        "shared expert": "1 SwiGLU expert of width 256 in every MoE layer",
        "auxiliary-loss reduction": "none: no load-balancing loss",
        "CV definition": "none: expert-utilization std per layer",
        "router noise": "none",
        "optimizer": "not stated",
        "experts": "MLPs (the README's word; their activation is not in the seeds' summary); the shared expert is SwiGLU",
        "z-loss reduction": "none: no z-loss",
        "step counting": "3,000 steps; gradient accumulation not stated",
        "reported metric": "test loss and top-3 accuracy (one seed)",
    },
    "noise": {
        "data": "SmolLM corpus subset: 2,000 documents, 500,000 tokens",
        "model size": "d_model 384, 6 layers, d_ff 1536, 8 experts top-2; params not reported",
        "steps and tokens": f"400 steps x batch 24 x 512 = {400 * 24 * 512 / 1e6:.2f}M tokens ({400 * 24 * 512 / 500_000:.1f} passes over 500k tokens)",
        "gate function": "softmax over the chosen top-k logits (renormalised)",
        "shared expert": "none",
        "auxiliary-loss reduction": "weight x per-layer loss, summed over layers (aux about 0.06 for 6 layers at 0.01)",
        "CV definition": "pooled: counts of all layers summed per expert, then CV",
        "router noise": "noise_std 0, 0.1, 0.5 on the logits",
        "optimizer": f"as {_LLM_PY} (the write-up: 'Muon for most 2D params'): {_LLM_PY_OPTIMIZER}; AMP",
        "experts": _LLM_PY_EXPERTS,
        "z-loss reduction": "none: no z-loss",
        "step counting": _LLM_PY_STEPS.format(steps="400", optimizer_steps="100"),
        "reported metric": "'best val PPL' = the final validation, on eval_steps batches: eval_every 500 > 400 steps, "
                           "so no validation ran before the end",
    },
    "zloss": {
        "data": "SmolLM corpus subset",
        "model size": f"{_LLM_PY}; sizes not stated in the tutorial",
        "steps and tokens": "1,000 steps; batch and sequence not stated",
        "gate function": "softmax over the chosen top-k logits (renormalised)",
        "shared expert": "none",
        "auxiliary-loss reduction": "per-layer loss summed over layers; the configured lb weight is never passed to the layer",
        "CV definition": "pooled over layers (not reported in the tutorial)",
        "router noise": "on (std not stated), off in the 'no noise' run",
        "optimizer": f"{_LLM_PY}: {_LLM_PY_OPTIMIZER}",
        "experts": _LLM_PY_EXPERTS,
        "z-loss reduction": "once, on the router logits averaged over layers (stack(...).mean(0)), not per layer as in ST-MoE; "
                            "its router entropy is likewise that of the layer-averaged logits",
        "step counting": _LLM_PY_STEPS.format(steps="1,000", optimizer_steps="250"),
        "reported metric": "test perplexity (one seed)",
    },
}
SETUP_SOURCES = {
    "routing": "tsh-03/moe-experiments code and README (source tutorial 003)",
    "noise": f"routing-noise write-up (source tutorial 004) and {_LLM_PY}",
    "zloss": f"z-loss tutorial and plan (source tutorials 000, 001) and {_LLM_PY}",
}
