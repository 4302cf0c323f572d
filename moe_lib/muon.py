"""``torch.optim.Muon``, with its Newton-Schulz iteration in fp32 on CPU.

Muon (Jordan et al. 2024) orthogonalises each 2-D update with five Newton-Schulz iterations,
``X <- a X + (b A + c A^2) X`` with ``A = X X^T``. ``torch.optim.Muon`` runs them in bf16, which
is right on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX). On other CPUs bf16 matmuls are
emulated: measured on a 2-core AMD EPYC without AVX-512, one 128 x 384 iteration set took 53 ms
in bf16 and 2.7 ms in fp32, and Muon's bf16 iterations doubled the cpu profile's step time. So
:class:`Muon` keeps torch's algorithm (momentum, Nesterov, learning-rate adjustment, weight
decay: torch's own ``step``) and swaps only the precision of the iteration, to fp32, for
parameters on the CPU. On CUDA it is ``torch.optim.Muon`` unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.optim._muon as _torch_muon

_TORCH_NEWTON_SCHULZ = _torch_muon._zeropower_via_newtonschulz


def newton_schulz(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch's quintic Newton-Schulz orthogonalisation of a 2-D ``grad``, computed in ``dtype``.

    ``X = G / ||G||`` (transposed so that it is wide), then ``ns_steps`` times
    ``A = X X^T``, ``X <- a X + (b A + c A A) X``. With ``dtype=torch.bfloat16`` it is the same
    computation as ``torch.optim.Muon``'s (the tests check that).
    """
    if grad.ndim != 2:
        raise ValueError(f"grad must be a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = ns_coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _fp32_on_cpu(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    if grad.device.type == "cpu":
        return newton_schulz(grad, ns_coefficients, ns_steps, eps, torch.float32)
    return _TORCH_NEWTON_SCHULZ(grad, ns_coefficients, ns_steps, eps)


@contextlib.contextmanager
def fp32_newton_schulz_on_cpu():
    """Within the block, ``torch.optim.Muon`` iterates in fp32 for CPU tensors (torch's function is restored after)."""
    _torch_muon._zeropower_via_newtonschulz = _fp32_on_cpu
    try:
        yield
    finally:
        _torch_muon._zeropower_via_newtonschulz = _TORCH_NEWTON_SCHULZ


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton-Schulz iteration runs in fp32 for parameters on the CPU."""

    @torch.no_grad()
    def step(self, closure=None):
        with fp32_newton_schulz_on_cpu():
            return super().step(closure)
