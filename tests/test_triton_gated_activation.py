"""Triton gated activation (under TRITON_INTERPRET=1 on the CPU) against the torch reference.

fp32 kernel vs the float64 reference: output and both gradients within 1e-5 relative
(max|diff| / max|ref|) for SiLU and tanh-GeLU, sizes that leave a partial block, gates far
into both tails. ``gpu``: bf16 against the fp32 reference at an MLP's size.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import interpreter_fixture, rel_rmse  # noqa: E402
import kernels  # noqa: E402
from kernels.reference.gated_activation import gated_activation as reference  # noqa: E402

tk = interpreter_fixture("kernels.triton.jit_math", "kernels.triton.gated_activation")


def _run(fn, shape, kind, dtype, device="cpu", scale=3.0, bf16_inputs=False):
    gen = torch.Generator().manual_seed(0)
    g, u, dy = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    g = g * scale
    if bf16_inputs:  # both sides see the same rounded inputs
        g, u = g.to(torch.bfloat16).double(), u.to(torch.bfloat16).double()
    leaves = [t.to(device, dtype).requires_grad_() for t in (g, u)]
    y = fn(*leaves, kind)
    (y.double() * dy.to(device)).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("kind", ["silu", "gelu"])
@pytest.mark.parametrize("shape,scale", [((3, 7, 16), 3.0), ((2, 1500), 3.0), ((1, 40), 30.0)])
def test_matches_reference(tk, kind, shape, scale):
    got = _run(tk.gated_activation, shape, kind, torch.float32, scale=scale)
    want = _run(reference, shape, kind, torch.float64, scale=scale)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_public_op_dispatches_and_checks_its_arguments(tk):
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(kernels.gated_activation(g, u, "gelu", backend="triton"),
                               reference(g, u, "gelu"))
    with pytest.raises(ValueError, match=r"kind must be one of \('silu', 'gelu'\), got 'relu'"):
        kernels.gated_activation(g, u, "relu")
    with pytest.raises(ValueError, match="same shape and dtype"):
        kernels.gated_activation(g, u[:2])
    assert tk.gated_activation(g[:0], u[:0], "silu").shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["silu", "gelu"])
def test_gpu_bf16_against_fp32_reference(kind):
    from kernels.triton.gated_activation import gated_activation

    got = _run(gated_activation, (2, 4096, 5632), kind, torch.bfloat16, device="cuda", bf16_inputs=True)
    want = _run(reference, (2, 4096, 5632), kind, torch.float32, device="cuda", bf16_inputs=True)
    for a, b in zip(got, want):
        assert rel_rmse(a, b) <= 5e-3
