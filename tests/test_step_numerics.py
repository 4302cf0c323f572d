"""The speed work on the training step keeps its numbers (``benchmarks/bench_step.py`` measures the speed).

Reference losses: the first four steps of a small run, recorded with the code before the speed
changes (commit a775636, fp32, one thread); Muon's after it came to train the experts and the
router gate as well (issue 21, RESULTS_VERSION 3), which changes its numbers by design. Changes that only reorder float arithmetic stay far
inside the tolerance; a changed formula does not.
"""

import pytest
import torch

from moe_lib.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from moe_lib.moe.model import apply_rotary, rotary_tables
from moe_lib.training.loop import init_train_state, train_step

REFERENCE_LM_LOSSES = {
    "adamw": [6.239978, 6.241711, 6.251151, 6.257811],  # recorded at a775636
    "muon": [6.239978, 6.242366, 6.248965, 6.258255],  # recorded with Muon on the experts and router (results version 3)
}


def small_config(optimizer: str) -> RunConfig:
    return RunConfig(
        model=ModelConfig(vocab_size=512, d_model=32, n_heads=2, n_layers=2, d_ff=32, max_seq_len=32, num_experts=4, top_k=2),
        data=DataConfig(bpe_vocab_size=512),
        train=TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=1, optimizer=optimizer, device="cpu",
                          precision="fp32", progress=False),
    )


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_first_steps_match_the_recorded_losses(optimizer):
    torch.set_num_threads(1)
    config = small_config(optimizer)
    state = init_train_state(config, torch.device("cpu"))
    tokens = torch.randint(0, 512, (5000,), generator=torch.Generator().manual_seed(0))
    losses = [float(train_step(state, tokens, step).losses[1]) for step in range(4)]
    assert losses == pytest.approx(REFERENCE_LM_LOSSES[optimizer], rel=1e-5, abs=0)


def real_form_rotary(x, cos, sin):
    """The rotation written out on (even, odd) pairs: ``(x1 cos - x2 sin, x1 sin + x2 cos)``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotary_equals_the_pairwise_rotation_with_its_gradient(dtype):
    batch, seq, heads, head_dim = 2, 12, 3, 8
    cos, sin = rotary_tables(head_dim, seq, 10000.0)
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    qkv = qkv.to(dtype).requires_grad_()
    k = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[1]  # strided, as attention passes it
    weight = torch.randn(batch, heads, seq, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = apply_rotary(k, cos, sin)
    (grad_got,) = torch.autograd.grad((got * weight).sum(), qkv)
    want = real_form_rotary(k, cos.to(dtype), sin.to(dtype))
    (grad_want,) = torch.autograd.grad((want * weight).sum(), qkv)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 0}[dtype]  # bf16 takes the real form itself
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_got, grad_want, rtol=tol, atol=tol)
