"""Expert parallelism on real gloo process groups (2 and 4 spawned ranks, hard timeouts)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from moe_lib.config import ModelConfig
from moe_lib.data import sample_batch
from moe_lib.parallel import (
    expert_parallel_model,
    expert_shard,
    scale_expert_grads,
    spawn,
    train_expert_parallel,
)
from moe_lib.moe.experts import Experts
from moe_lib.moe.model import MoETransformer
from moe_lib.parallel_analysis import check_layer_against_single_process
from moe_lib.profiles import get_profile
from moe_lib.training.loop import load_data, train_run

TIMEOUT_S = 120
RTOL = 1e-5  # relative, elementwise and to the tensor's largest entry (round-off of entries near 0 follows the big ones)
LAYER = ModelConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=8, max_seq_len=8, num_experts=4, top_k=2)


def _layer_cases(cases):
    """One spawned job checks several layers: starting ranks costs seconds, a layer microseconds."""
    return [check_layer_against_single_process(cfg, tokens, 0, starve) for cfg, tokens, starve in cases]


def _assert_matches(result):
    for name, (ep, single) in result["compared"].items():
        atol = RTOL * single.abs().max().item() if single.numel() else 0.0
        torch.testing.assert_close(ep, single, rtol=RTOL, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_ep_layer_equals_single_process_on_two_ranks():
    cases = [
        (LAYER, [5, 13], 0),  # uneven loads, expert 0 receives nothing
        (LAYER.replace(capacity_factor=0.5), [9, 3], None),  # capacity drops slots
        (LAYER.replace(top_k=1, gate="softmax"), [1, 11], 3),  # top-1, rank 0 has one token, expert 3 (on rank 1) starved
        (LAYER.replace(num_shared_experts=1, score_func="sigmoid"), [6, 10], None),  # shared expert, sigmoid scores
        (LAYER.replace(router="random"), [12, 12], None),  # the ranks' random experts are the global batch's
        (LAYER.replace(noise_std=0.5, capacity_factor=1.0), [10, 6], None),  # router noise, capacity per rank
    ]
    per_rank = spawn(_layer_cases, 2, cases, timeout_s=TIMEOUT_S)
    for rank_results in per_rank:
        for result in rank_results:
            _assert_matches(result)
    assert per_rank[0][0]["expert_counts"][0] == 0 and per_rank[0][2]["expert_counts"][3] == 0
    assert max(r[1]["dropped_fraction"] for r in per_rank) > 0
    assert {name for name, _ in per_rank[0][3]["compared"].items()} >= {"router.weight.grad", "shared_experts.w_in.weight.grad"}


def test_ep_layer_refuses_expert_choice():
    from moe_lib.moe.model import MoEFeedForward
    from moe_lib.parallel import ExpertParallelMoE

    with pytest.raises(ValueError, match="expert_choice"):
        ExpertParallelMoE(MoEFeedForward(LAYER.replace(router="expert_choice")))


def test_ep_layer_equals_single_process_on_four_ranks():
    cases = [
        (LAYER.replace(num_experts=8), [1, 9, 4, 6], 5),
        (LAYER, [3, 3, 3, 3], None),
        (LAYER.replace(router="random"), [2, 7, 4, 5], None),
        (LAYER.replace(noise_std=0.5), [6, 1, 5, 4], None),
    ]
    per_rank = spawn(_layer_cases, 4, cases, timeout_s=TIMEOUT_S)
    for rank_results in per_rank:
        for result in rank_results:
            _assert_matches(result)
    assert per_rank[0][0]["expert_counts"][5] == 0


def _first_batch(run):
    data = load_data(run.data)
    return sample_batch(data.train.tokens, run.train.batch_size, run.train.seq_len, torch.Generator().manual_seed(run.train.seed))


def _gradients_then_training(runs):
    """Per run: this rank's gradients on the first global batch (after DDP and the expert scaling), then a short EP training."""
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for run in runs:
        model, ddp, group = expert_parallel_model(run, torch.device("cpu"))
        x, y = _first_batch(run)
        ddp(x.chunk(world)[rank], y.chunk(world)[rank]).loss.backward()
        scale_expert_grads(model, world)
        dist.destroy_process_group(group)
        results.append(({name: p.grad for name, p in model.named_parameters()}, train_expert_parallel(run)))
    return results


def test_ep_training_matches_single_process_on_the_global_batch():
    # lb and z-loss on, a clip threshold small enough that clipping is active every step; router noise, and the random router
    run = get_profile("smoke").base.with_train(steps=3, log_every=1, grad_clip=0.05).with_model(z_loss_weight=0.01, load_balancing_weight=0.1)
    runs = [run.with_model(noise_std=0.5), run.with_model(router="random")]
    per_rank = spawn(_gradients_then_training, 2, runs, timeout_s=TIMEOUT_S)

    for index, run in enumerate(runs):
        torch.manual_seed(run.train.seed)
        single = MoETransformer(run.model)
        single(*_first_batch(run)).loss.backward()
        for rank in range(2):
            grads = per_rank[rank][index][0]
            for name, p in single.named_parameters():
                expected = p.grad.chunk(2)[rank] if ".experts." in name else p.grad  # rank r owns experts [2r, 2r+2)
                torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-7, msg=name)

        reference = train_run(run).history
        ep_rows = per_rank[0][index][1]
        # the pre-clip gradient norm, logged inside both training loops, sees the expert gradients' scale (1/W once)
        for column in ("train_loss", "lm_loss", "lb_loss", "z_loss", "grad_norm"):
            assert [row[column] for row in ep_rows] == pytest.approx(reference[column].tolist(), rel=1e-5), (run.model.router, column)
        assert ep_rows == per_rank[1][index][1]


def _train_only(run):
    return train_expert_parallel(run)


def test_ep_training_with_aux_loss_free_balancing_matches_single_process():
    # the selection bias moves after every step from the loads of the GLOBAL batch, over 2 micro-batches
    run = (get_profile("smoke").base.with_train(steps=4, log_every=1, grad_accum_steps=2)
           .with_model(load_balancing_weight=0.0, bias_update_rate=0.01))
    per_rank = spawn(_train_only, 2, run, timeout_s=TIMEOUT_S)
    reference = train_run(run).history
    assert [row["train_loss"] for row in per_rank[0]] == pytest.approx(reference["train_loss"].tolist(), rel=1e-5)
    assert per_rank[0] == per_rank[1]


def _crash_on_rank_one():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails")
    dist.barrier()  # rank 0 waits for a peer that never comes


def test_a_failing_rank_fails_fast_instead_of_hanging():
    # whichever rank's error is seen first (rank 1's, or rank 0's lost connection), all ranks are ended
    with pytest.raises(ProcessRaisedException):
        spawn(_crash_on_rank_one, 2, timeout_s=TIMEOUT_S)


def test_expert_shard_takes_the_ranks_slice_and_rejects_bad_sizes():
    experts = Experts(4, 8, 6)
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    shard = expert_shard(experts, 1, 2)
    assert torch.equal(torch.rand(1), expected_draw)  # sharding leaves the RNG stream as single-process has it
    assert shard.num_experts == 2 and (shard.w_in == experts.w_in[2:4]).all() and (shard.w_out == experts.w_out[2:4]).all()
    with pytest.raises(ValueError, match="world_size=3"):
        expert_shard(experts, 0, 3)
    with pytest.raises(ValueError, match="rank=2"):
        expert_shard(experts, 2, 2)


def test_torchrun_launches_the_ep_command():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moe_lib", "ep", "--profile", "smoke", "--steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size=2 backend=gloo" in done.stdout and "step=1" in done.stdout
