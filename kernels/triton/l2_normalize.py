"""Triton L2 normalisation over the last dim: one fused kernel forward, one backward.

Eager, ``x / sqrt(sum x² + eps)`` on a bf16 tensor is ~6 kernels forward (upcast, square,
sum, rsqrt, multiply, downcast) and more backward, each a pass over q or k (GDP normalises
``(1 + n_h)·H·K`` channels per token). Here the forward reads x once and writes y and an
fp32 rstd per row; the backward reads y, rstd and dy once and writes dx. Same saved
tensors (y, rstd) and gradients as ``kernels.reference.l2_normalize`` (the oracle);
arithmetic in fp32. Program i owns ``BM`` rows of ``BN >= K`` columns.

Kernels call only builtins and jit helpers of this module and ``jit_math`` (see
``linear_recurrence``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_triton
from ..reference import l2_normalize as _ref
from .jit_math import add
from .rms_norm import row_tiles

MAX_TILE = 16384  # channels one program holds; wider rows take the torch path


@triton.jit
def _row_tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's BM rows of N channels: row indices, row mask, tile mask, offsets."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    rmask = rows < M
    return rows, rmask, rmask[:, None] & (cols < N)[None, :], rows[:, None] * N + cols[None, :]


@triton.jit
def _l2_fwd_kernel(x_ptr, y_ptr, rstd_ptr, M, N, eps, BM: tl.constexpr, BN: tl.constexpr):
    rows, rmask, mask, offs = _row_tile(M, N, BM, BN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 1, add) + eps)
    tl.store(y_ptr + offs, (x * rstd[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _l2_bwd_kernel(y_ptr, rstd_ptr, dy_ptr, dx_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr):
    rows, rmask, mask, offs = _row_tile(M, N, BM, BN)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    dx = rstd[:, None] * (dy - y * tl.reduce(dy * y, 1, add)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _L2NormalizeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps: float):  # type: ignore[override]
        x_c = x.contiguous()
        N = x_c.shape[-1]
        M = x_c.numel() // N
        BM, BN, warps = row_tiles(N)
        y = torch.empty_like(x_c)
        rstd = torch.empty(x_c.shape[:-1] + (1,), device=x.device, dtype=torch.float32)
        _l2_fwd_kernel[(triton.cdiv(M, BM),)](x_c, y, rstd, M, N, eps, BM=BM, BN=BN, num_warps=warps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        y, rstd = ctx.saved_tensors
        N = y.shape[-1]
        M = y.numel() // N
        BM, BN, warps = row_tiles(N)
        dx = torch.empty_like(y)
        _l2_bwd_kernel[(triton.cdiv(M, BM),)](y, rstd, dy.contiguous(), dx, M, N, BM=BM, BN=BN, num_warps=warps)
        return dx, None


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``kernels.l2_normalize``'s Triton path (arguments checked there)."""
    if x.shape[-1] > MAX_TILE or x.numel() == 0 or x.numel() >= 2**31:  # int32 offsets
        return _ref.l2_normalize(x, eps)
    return _L2NormalizeTriton.apply(x, eps)


register_triton("l2_normalize", l2_normalize)
