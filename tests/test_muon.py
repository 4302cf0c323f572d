"""moe_lib.training.muon: Muon for matrices and stacked expert matrices, checked against torch.optim.Muon."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lib.training.muon import Muon, newton_schulz


def _steps(optimizer_class, p0: torch.Tensor, grads: list[torch.Tensor], **kwargs) -> torch.Tensor:
    """``p0`` after one step per gradient in ``grads``."""
    p = torch.nn.Parameter(p0.clone())
    opt = optimizer_class([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
@pytest.mark.parametrize("options", [
    dict(adjust_lr_fn="match_rms_adamw"), dict(adjust_lr_fn=None, nesterov=False), dict(adjust_lr_fn="original", momentum=0.9),
])
def test_bf16_iteration_is_torchs_muon_bit_for_bit(shape, options):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(*shape, generator=gen)
    grads = [torch.randn(*shape, generator=gen) for _ in range(3)]  # 3 steps: the momentum buffer matters
    kwargs = dict(lr=0.01, weight_decay=0.1, **options)
    ours = _steps(Muon, p0, grads, ns_dtype=torch.bfloat16, **kwargs)
    assert torch.equal(ours, _steps(torch.optim.Muon, p0, grads, **kwargs))


def test_cpu_default_is_the_fp32_iteration():
    gen = torch.Generator().manual_seed(0)
    p0, g = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)
    lr, wd = 0.01, 0.1
    ours = _steps(Muon, p0, [g], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    # first step from zero momentum: the (Nesterov) update is a positive multiple of g, and the iteration normalises it away
    adjusted_lr = lr * 0.2 * math.sqrt(max(p0.shape))
    expected = p0 * (1 - lr * wd) - adjusted_lr * newton_schulz(g, dtype=torch.float32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # torch's bf16 iteration lands elsewhere, by bf16's round-off
    torch_muon = _steps(torch.optim.Muon, p0, [g], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    assert not torch.allclose(torch_muon, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch_muon, expected, rtol=0, atol=0.05 * adjusted_lr)


@pytest.mark.parametrize("slice_shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original"])
def test_stacked_experts_step_as_separate_matrices(slice_shape, adjust_lr_fn):
    """One step on ``[E, rows, cols]`` = E Muon steps on its ``[rows, cols]`` slices: each slice has its own
    momentum, norm, iteration and learning-rate scale (not the whole tensor's, nor shape[:2] as torch's would be)."""
    num_experts = 4
    gen = torch.Generator().manual_seed(1)
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0]).view(-1, 1, 1)  # experts with very different gradient sizes
    p0 = torch.randn(num_experts, *slice_shape, generator=gen)
    grads = [torch.randn(num_experts, *slice_shape, generator=gen) * scales for _ in range(2)]
    kwargs = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    stacked = _steps(Muon, p0, grads, **kwargs)
    for e in range(num_experts):
        alone = _steps(Muon, p0[e], [g[e] for g in grads], **kwargs)
        torch.testing.assert_close(stacked[e], alone, rtol=1e-5, atol=1e-6)
        # and the same as torch's Muon on the slice, up to torch's bf16 round-off
        reference = _steps(torch.optim.Muon, p0[e], [g[e] for g in grads], **kwargs)
        torch.testing.assert_close(stacked[e], reference, rtol=0, atol=0.05 * kwargs["lr"] * 5)
    bf16 = _steps(Muon, p0, grads, ns_dtype=torch.bfloat16, **kwargs)
    for e in range(num_experts):  # batched bf16 against torch's own bf16 iteration, slice by slice
        reference = _steps(torch.optim.Muon, p0[e], [g[e] for g in grads], **kwargs)
        torch.testing.assert_close(bf16[e], reference, rtol=0, atol=1e-2 * kwargs["lr"])


def test_newton_schulz_orthogonalises_each_stacked_matrix():
    g = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(2))
    x = newton_schulz(g, ns_steps=10)
    singular_values = torch.linalg.svdvals(x)  # the quintic's fixed band is roughly [0.7, 1.2], not exactly 1
    assert singular_values.shape == (3, 16) and singular_values.min() > 0.6 and singular_values.max() < 1.25
    torch.testing.assert_close(x[1], newton_schulz(g[1], ns_steps=10), rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match="2-D|matrix"):
        newton_schulz(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"shape \(8,\).*AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match="adjust_lr_fn='rms'.*match_rms_adamw"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="lr=-1"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr=-1)
