"""Triton RMSNorm (under TRITON_INTERPRET=1 on the CPU) against the torch reference.

fp32 kernel vs the float64 reference: output and the gradients of x, gate and weight within
1e-5 relative (max|diff| / max|ref|), for plain, norm-then-gate (GDP's per-head o-norm) and
gate-then-norm over groups (Mamba2), token counts that leave a partial tile, group widths
that are not powers of two. ``gpu``: bf16 against the fp32 reference.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import interpreter_fixture, rel_rmse  # noqa: E402
import kernels  # noqa: E402
from kernels.reference.rms_norm import rms_norm as reference  # noqa: E402

tk = interpreter_fixture("kernels.triton.jit_math", "kernels.triton.rms_norm")

# (shape, group, gated, gate_first)
CASES = [
    ((2, 5, 12), None, False, False),
    ((130, 20), 10, False, False),        # 130 tokens: a partial tile of rows
    ((2, 7, 3, 16), None, True, False),   # per-head gated o-norm
    ((3, 5, 96), 32, True, True),         # Mamba2: norm(x * silu(z)) over 3 groups
    ((1, 70), None, True, True),
    ((4, 3, 200), 100, True, False),      # 200 channels: a tile with masked columns
]


def _run(fn, shape, group, gated, gate_first, dtype, device="cpu", seed=0, bf16_inputs=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    gate = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 if gated else None
    w = torch.rand(shape[-1], generator=gen, dtype=torch.float64) + 0.5
    if bf16_inputs:  # both sides see the same rounded inputs: measure the kernel, not the rounding
        x, gate, w = (t.to(torch.bfloat16).double() if t is not None else None for t in (x, gate, w))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    leaves = [t.to(device, dtype).requires_grad_() if t is not None else None for t in (x, gate, w)]
    y = fn(leaves[0], leaves[2], 1e-6, leaves[1], group or shape[-1], gate_first)
    (y.double() * dy.to(device)).sum().backward()
    return [y.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("shape,group,gated,gate_first", CASES)
def test_matches_reference(tk, shape, group, gated, gate_first):
    got = _run(tk.rms_norm, shape, group, gated, gate_first, torch.float32)
    want = _run(reference, shape, group, gated, gate_first, torch.float64)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_public_op_dispatches_and_checks_its_arguments(tk, monkeypatch):
    x, w, gate = torch.randn(3, 8), torch.ones(8), torch.randn(3, 8)
    want = reference(x, w, 1e-6, gate, 4, True)
    torch.testing.assert_close(kernels.rms_norm(x, w, gate=gate, group=4, gate_first=True, backend="triton"), want)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        kernels.rms_norm(x, torch.ones(4))
    with pytest.raises(ValueError, match="group 3 must divide the last dim 8"):
        kernels.rms_norm(x, w, group=3)
    with pytest.raises(ValueError, match="gate must have x's shape"):
        kernels.rms_norm(x, w, gate=gate[:2])
    # groups wider than one tile take the torch path (same numbers)
    monkeypatch.setattr(tk, "MAX_TILE", 4)
    torch.testing.assert_close(tk.rms_norm(x, w, 1e-6, None, 8, False), reference(x, w, 1e-6, None, 8, False))
    assert tk.rms_norm(x[:0], w, 1e-6, None, 8, False).shape == (0, 8)
    # a strided weight (a column of a stacked parameter) is read by its values
    stacked = torch.stack([torch.rand(8) + 0.5, torch.rand(8)], -1)
    assert not stacked[:, 0].is_contiguous()
    torch.testing.assert_close(tk.rms_norm(x, stacked[:, 0], 1e-6, gate, 4, True),
                               reference(x, stacked[:, 0].contiguous(), 1e-6, gate, 4, True))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,group,gated,gate_first", [
    ((2, 4096, 2048), None, False, False), ((2, 4096, 16, 128), None, True, False),
    ((2, 4096, 4096), 2048, True, True)])
def test_gpu_bf16_against_fp32_reference(shape, group, gated, gate_first):
    from kernels.triton.rms_norm import rms_norm

    got = _run(rms_norm, shape, group, gated, gate_first, torch.bfloat16, device="cuda", bf16_inputs=True)
    want = _run(reference, shape, group, gated, gate_first, torch.float32, device="cuda", bf16_inputs=True)
    assert rel_rmse(got[0], want[0]) <= 5e-3
    for a, b in zip(got[1:], want[1:]):
        assert rel_rmse(a, b) <= 1e-2
