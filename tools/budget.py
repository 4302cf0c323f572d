"""How long the whole course takes on a device, from FLOP counts: an estimate, not a measurement.

A training step costs ``6 x (matmul parameters a token uses) + 6 L T d`` FLOPs per token
(forward + backward, :func:`moe_lib.moe.model.flops_per_token`; the second term is attention's scores and values); an evaluation
batch costs a third of that (forward only). Time = total FLOPs / (peak x MFU), where MFU, the
fraction of the peak a run really achieves, is an assumption until someone times the run.
"""

from __future__ import annotations

from moe_lib.config import RunConfig
from moe_lib.moe.model import flops_per_token
from moe_lib.profiles import Profile
from moe_lib.studies import STUDIES

# NVIDIA T4 datasheet: 65 TFLOPS peak in mixed precision (fp16 tensor cores, fp32 accumulate).
T4_FP16_PEAK_FLOPS = 65e12
# Small models (d_model a few hundred) reach a small fraction of a GPU's peak: kernel launches,
# routing, norms and the optimizer do not run on tensor cores. 10% is our assumption for a T4.
ASSUMED_T4_MFU = 0.10


def run_flops(config: RunConfig) -> float:
    """Training plus periodic and final evaluation (``final_eval_batches`` on validation and test)."""
    t = config.train
    per_token = flops_per_token(config.model, t.seq_len)
    if t.final_eval_batches is None:
        raise ValueError("run_flops needs train.final_eval_batches set: the whole-split evaluation depends on the corpus")
    eval_batches = (t.steps // t.eval_every) * t.eval_batches + 2 * t.final_eval_batches
    return per_token * (t.steps * t.tokens_per_step + eval_batches * t.batch_size * t.seq_len / 3)


def course_flops(profile: Profile) -> float:
    """Every run of every study, plus notebook 01's one run of the base config."""
    return run_flops(profile.base) + sum(run_flops(run.config) for build in STUDIES.values() for run in build(profile).runs)


def course_hours(profile: Profile, peak_flops: float = T4_FP16_PEAK_FLOPS, mfu: float = ASSUMED_T4_MFU) -> float:
    return course_flops(profile) / (peak_flops * mfu) / 3600
