"""Triton L2 normalisation (under TRITON_INTERPRET=1 on the CPU) against the torch reference.

fp32 kernel vs the float64 reference: output and dx within 1e-5 relative (max|diff| /
max|ref|) for head sizes that are and are not powers of two, row counts that leave a
partial tile, all-zero rows and rows of very different scales. ``gpu``: bf16 against the
fp32 reference at GDP's 1.3B shapes.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import interpreter_fixture, rel_rmse  # noqa: E402
import kernels  # noqa: E402
from kernels.reference.l2_normalize import l2_normalize as reference  # noqa: E402

tk = interpreter_fixture("kernels.triton.jit_math", "kernels.triton.l2_normalize")

SHAPES = [
    (2, 5, 3, 16),      # GDP q: [B, T, H, K]
    (1, 67, 2, 2, 32),  # GDP k with n_h = 2: 134 rows of 64 ... a partial tile of rows
    (130, 24),          # K not a power of two: masked columns
    (5, 1000),          # one row per program
]


def _inputs(shape, seed=0, bf16_inputs=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = x.view(-1, shape[-1])
    rows *= torch.logspace(-3, 3, rows.shape[0], dtype=torch.float64)[:, None]  # scales eps does and doesn't matter at
    rows[1] = 0.0  # an all-zero row: y = 0, finite gradient
    if bf16_inputs:
        x = x.to(torch.bfloat16).double()
    return x, torch.randn(shape, generator=gen, dtype=torch.float64)


def _run(fn, x, dy, dtype, device="cpu"):
    leaf = x.to(device, dtype).requires_grad_()
    y = fn(leaf, 1e-6)
    (y.double() * dy.to(device)).sum().backward()
    return y.detach(), leaf.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(tk, shape):
    x, dy = _inputs(shape)
    got = _run(tk.l2_normalize, x, dy, torch.float32)
    want = _run(reference, x, dy, torch.float64)
    assert got[0].dtype == torch.float32 and torch.isfinite(got[1]).all()
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()
    big = x.flatten(0, -2).pow(2).sum(-1) > 1.0  # rows where eps is negligible have unit norm
    assert big.sum() >= 2 and torch.allclose(got[0].double().flatten(0, -2)[big].norm(dim=-1),
                                             torch.ones(()).double(), atol=1e-5)


def test_saves_only_the_output_and_rstd(tk):
    x = torch.randn(4, 7, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = tk.l2_normalize(x, 1e-6)
    assert [tuple(t.shape) for t in saved] == [(4, 7, 32), (4, 7, 1)]
    assert saved[0].data_ptr() == y.data_ptr() and saved[1].dtype == torch.float32


def test_public_op_dispatches_and_falls_back(tk, monkeypatch):
    x = torch.randn(3, 5, 8)
    want = reference(x, 1e-6)
    torch.testing.assert_close(kernels.l2_normalize(x, backend="triton"), want)
    torch.testing.assert_close(kernels.l2_normalize(x, backend="torch"), want)
    with pytest.raises(ValueError, match="at least one dim"):
        kernels.l2_normalize(torch.tensor(1.0))
    monkeypatch.setattr(tk, "MAX_TILE", 4)  # rows wider than one tile take the torch path
    torch.testing.assert_close(tk.l2_normalize(x, 1e-6), want)
    assert tk.l2_normalize(x[:0], 1e-6).shape == (0, 5, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4096, 16, 128), (2, 4096, 2, 16, 128), (4, 4096, 8, 256)])
def test_gpu_bf16_against_fp32_reference(shape):
    from kernels.triton.l2_normalize import l2_normalize

    x, dy = _inputs(shape, bf16_inputs=True)
    got = _run(l2_normalize, x, dy, torch.bfloat16, device="cuda")
    want = _run(reference, x, dy, torch.float32, device="cuda")
    assert rel_rmse(got[0], want[0]) <= 5e-3
    assert rel_rmse(got[1], want[1]) <= 1e-2
