"""Triton RMSNorm with an optional SiLU gate, per channel group: one fused kernel forward,
one backward.

In eager PyTorch a gated norm is a chain of ~10 elementwise kernels forward and more
backward, each reading and writing the whole activation; a model calls two or three per
layer. Here the forward reads x (and the gate) once and writes y and an fp32 rstd per row;
the backward reads x, gate, dy once and writes dx, dgate and per-program partial sums of
the weight gradient (summed on the host, a ``[programs, D]`` fp32 buffer).

Layout: x is ``[M, G, N]`` (M tokens, G groups of N channels); program (i, g) owns ``BM``
tokens of group g, so its weight slice is fixed. fp32 arithmetic throughout. Same
semantics, saved tensors and gradients as ``kernels.reference.rms_norm`` (the oracle).

Kernels call only builtins and jit helpers of this module and ``jit_math`` (see
``linear_recurrence``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_triton
from ..reference import rms_norm as _ref
from .jit_math import add, sigmoid

MAX_TILE = 16384  # channels per group one program holds; wider groups take the torch path


@triton.jit
def _tile(pid, grp, M, G, N, BM: tl.constexpr, BN: tl.constexpr):
    """Rows (tokens) and columns (channels of group ``grp``) of this program, masks, offsets."""
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    rmask, cmask = rows < M, cols < N
    mask = rmask[:, None] & cmask[None, :]
    return rows, cols, rmask, cmask, mask, (rows[:, None] * G + grp) * N + cols[None, :]


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, gate_ptr, w_ptr, y_ptr, rstd_ptr, M, G, N, eps,
                         HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr):
    pid, grp = tl.program_id(0), tl.program_id(1)
    rows, cols, rmask, cmask, mask, offs = _tile(pid, grp, M, G, N, BM, BN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate_silu = x  # replaced below when there is a gate
    if HAS_GATE:
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate_silu = g * sigmoid(g)
        if GATE_FIRST:
            x = x * gate_silu
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 1, add) / N + eps)
    w = tl.load(w_ptr + grp * N + cols, mask=cmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_GATE:
        if not GATE_FIRST:
            y = y * gate_silu
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * G + grp, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, gate_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dgate_ptr, dwp_ptr, M, G, N,
                         HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr):
    pid, grp = tl.program_id(0), tl.program_id(1)
    rows, cols, rmask, cmask, mask, offs = _tile(pid, grp, M, G, N, BM, BN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows * G + grp, mask=rmask, other=0.0)
    w = tl.load(w_ptr + grp * N + cols, mask=cmask, other=0.0).to(tl.float32)
    u = x
    gate_silu = x
    dsilu = x
    if HAS_GATE:
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = sigmoid(g)
        gate_silu = g * s
        dsilu = s * (1.0 + g * (1.0 - s))
        if GATE_FIRST:
            u = x * gate_silu
    xhat = u * rstd[:, None]
    if HAS_GATE:
        if not GATE_FIRST:
            tl.store(dgate_ptr + offs, (dy * xhat * w[None, :] * dsilu).to(dgate_ptr.dtype.element_ty), mask=mask)
            dy = dy * gate_silu
    tl.store(dwp_ptr + (pid * G + grp) * N + cols, tl.reduce(dy * xhat, 0, add), mask=cmask)
    dxhat = dy * w[None, :]
    du = rstd[:, None] * (dxhat - xhat * (tl.reduce(dxhat * xhat, 1, add) / N)[:, None])
    if HAS_GATE:
        if GATE_FIRST:
            tl.store(dgate_ptr + offs, (du * x * dsilu).to(dgate_ptr.dtype.element_ty), mask=mask)
            du = du * gate_silu
    tl.store(dx_ptr + offs, du.to(dx_ptr.dtype.element_ty), mask=mask)


def row_tiles(N: int) -> tuple[int, int, int]:
    """(BM, BN, num_warps) of a row-wise kernel over rows of N channels: about 4K elements per
    program, at least one row (also the L2 norm's tiles)."""
    BN = triton.next_power_of_2(N)
    BM = max(1, min(64, 4096 // BN))
    return BM, BN, 4 if BM * BN <= 2048 else 8


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps: float, group: int, gate_first: bool):  # type: ignore[override]
        D = x.shape[-1]
        x_c = x.contiguous()
        gate_c = gate.contiguous() if gate is not None else None
        M, G, N = x_c.numel() // D, D // group, group
        BM, BN, warps = row_tiles(N)
        y = torch.empty_like(x_c)
        rstd = torch.empty(M, G, device=x.device, dtype=torch.float32)
        _rms_norm_fwd_kernel[(triton.cdiv(M, BM), G)](
            x_c, gate_c if gate_c is not None else x_c, weight, y, rstd, M, G, N, eps,
            HAS_GATE=gate is not None, GATE_FIRST=gate_first, BM=BM, BN=BN, num_warps=warps)
        ctx.save_for_backward(x_c, gate_c, weight, rstd)
        ctx.gate_first = gate_first
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, gate, weight, rstd = ctx.saved_tensors
        M, G = rstd.shape
        N = x.shape[-1] // G
        BM, BN, warps = row_tiles(N)
        programs = triton.cdiv(M, BM)
        dx = torch.empty_like(x)
        dgate = torch.empty_like(gate) if gate is not None else None
        dw_partial = torch.empty(programs, G, N, device=x.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs, G)](
            x, gate if gate is not None else x, weight, rstd, dy.contiguous(), dx,
            dgate if dgate is not None else dx, dw_partial, M, G, N,
            HAS_GATE=gate is not None, GATE_FIRST=ctx.gate_first, BM=BM, BN=BN, num_warps=warps)
        dw = dw_partial.sum(0).reshape(weight.shape).to(weight.dtype)
        return dx, dgate, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None, group: int,
             gate_first: bool) -> torch.Tensor:
    """``kernels.rms_norm``'s Triton path (arguments checked there)."""
    if group > MAX_TILE or x.numel() == 0 or x.numel() >= 2**31:  # the kernel's offsets are int32
        return _ref.rms_norm(x, weight, eps, gate, group, gate_first)
    return _RMSNormTriton.apply(x, gate, weight.contiguous(), eps, group, gate_first)  # read with stride 1


register_triton("rms_norm", rms_norm)
