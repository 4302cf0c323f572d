"""moe_lib.muon: torch's Muon, with the Newton-Schulz iteration in fp32 on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.optim._muon as torch_muon

from moe_lib.muon import Muon, newton_schulz

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_newton_schulz_in_bf16_is_torchs_own_computation(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, COEFFICIENTS, 5, 1e-7, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.shape == g.shape
    assert torch.equal(ours, torch_muon._zeropower_via_newtonschulz(g, COEFFICIENTS, 5, 1e-7))


def test_muon_step_on_cpu_uses_the_fp32_iteration_and_restores_torch():
    torch.manual_seed(0)
    p0 = torch.randn(32, 64)
    g = torch.randn(32, 64)
    lr, wd = 0.01, 0.1
    updated = {}
    for name, cls in (("ours", Muon), ("torch", torch.optim.Muon)):
        p = torch.nn.Parameter(p0.clone())
        p.grad = g.clone()
        opt = cls([p], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
        opt.step()
        updated[name] = p.detach()
    # first step from zero momentum: the (Nesterov) update is a positive multiple of g, and the iteration normalises it away
    adjusted_lr = lr * 0.2 * math.sqrt(max(p0.shape))
    expected = p0 * (1 - lr * wd) - adjusted_lr * newton_schulz(g, COEFFICIENTS, 5, 1e-7, torch.float32)
    torch.testing.assert_close(updated["ours"], expected, rtol=1e-5, atol=1e-6)
    # torch's bf16 iteration lands elsewhere, by bf16's round-off
    assert not torch.allclose(updated["torch"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(updated["torch"], expected, rtol=0, atol=0.05 * adjusted_lr)
    from moe_lib import muon
    assert torch_muon._zeropower_via_newtonschulz is muon._TORCH_NEWTON_SCHULZ  # torch's function is back


def test_newton_schulz_refuses_a_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.randn(2, 3, 4), COEFFICIENTS, 5, 1e-7)
