"""Triton RG-LRU gating: one fused elementwise kernel forward, one backward.

Eager, the gating (``kernels.reference.rg_lru_gates``: two sigmoids, softplus, expm1, sqrt,
exp, masks) is ~15 kernels forward and ~30 backward over ``W``-wide tensors per token. Here
the forward reads x and the two gate logits once and writes x̃ and a (fp32, the scan's
inputs); the backward reads them and dx̃, da once and writes dx and the two logit gradients,
plus per-program partial sums of dsoftplus(Λ) (``[programs, W]`` fp32, summed on the host).
Same saved tensors and gradients as the reference, arithmetic in fp32.

softplus and expm1 use exact forms for small arguments (``log1p``/``expm1`` are not Triton
builtins): the reference's ``F.softplus`` and ``torch.expm1`` keep full relative precision
where 1 - a² is tiny (a → 1) and where softplus(Λ) ~ 1e-4 (Λ at init). Program (i, j) owns
``ROWS`` tokens (looping over ``BM``-row tiles) of channel block j: up to 256, fewer for
short inputs (a decoding step has one token per sequence).

Kernels call only builtins and jit helpers of this module and ``jit_math`` (see
``linear_recurrence``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_triton
from ..reference import rg_lru_gates as _ref
from .jit_math import add, sigmoid

BM, BW, MAX_ROWS = 16, 128, 256  # tile rows x channels; tokens per program (dsoftplus partials)


@triton.jit
def _log1p(u):
    """log(1 + u) to full relative precision (Goldberg: log(w) · u / (w - 1), w = 1 + u)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _expm1(z):
    """exp(z) - 1 to full relative precision for z <= 0: Kahan's (w - 1) · z / log(w), w = e^z,
    where cancellation would hurt (z > -1); plain w - 1 below (log of a subnormal w is coarse)."""
    w = tl.exp(z)
    small = (z > -1.0) & (w != 1.0)
    safe = tl.where(small, w, 0.5)  # keeps the unused branch finite
    return tl.where(w == 1.0, z, tl.where(small, (safe - 1.0) * (z / tl.log(safe)), w - 1.0))


@triton.jit
def _softplus(z):
    """log(1 + e^z), z itself above 20 (torch's threshold)."""
    return tl.where(z > 20.0, z, _log1p(tl.exp(tl.minimum(z, 20.0))))


@triton.jit
def _gates(gx_ptr, ga_ptr, lam_ptr, reset_ptr, offs, rows, cols, mask, rmask, cmask, c):
    """gate_x, gate_a, their sigmoid derivatives σ(z)·σ(-z) (no 1 - σ cancellation),
    softplus(Λ), log a, 1 - a², the multiplier and the reset mask, fp32."""
    zx = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    za = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate_x, gate_a = sigmoid(zx), sigmoid(za)
    dgate_x, dgate_a = gate_x * sigmoid(-zx), gate_a * sigmoid(-za)
    sp = _softplus(tl.load(lam_ptr + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
    reset = (tl.load(reset_ptr + rows, mask=rmask, other=0) != 0)[:, None]
    log_a = -c * gate_a * sp
    one_minus_a2 = -_expm1(2.0 * log_a)
    mult = tl.where(reset, 1.0, tl.sqrt(one_minus_a2))
    return gate_x, gate_a, dgate_x, dgate_a, sp, log_a, one_minus_a2, mult, reset


@triton.jit
def _rg_lru_fwd_kernel(x_ptr, gx_ptr, ga_ptr, lam_ptr, reset_ptr, xn_ptr, a_ptr, M, W, c,
                       BM: tl.constexpr, BW: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    cmask = cols < W
    for r0 in range(0, ROWS, BM):
        rows = tl.program_id(0) * ROWS + r0 + tl.arange(0, BM)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * W + cols[None, :]
        gate_x, _, _, _, _, log_a, _, mult, reset = _gates(gx_ptr, ga_ptr, lam_ptr, reset_ptr, offs, rows, cols, mask,
                                                     rmask, cmask, c)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(xn_ptr + offs, x * gate_x * mult, mask=mask)
        tl.store(a_ptr + offs, tl.where(reset, 0.0, tl.exp(log_a)), mask=mask)


@triton.jit
def _rg_lru_bwd_kernel(x_ptr, gx_ptr, ga_ptr, lam_ptr, reset_ptr, dxn_ptr, da_ptr, dx_ptr, dgx_ptr, dga_ptr,
                       dsp_ptr, M, W, c, min_denominator_sq,
                       BM: tl.constexpr, BW: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    cmask = cols < W
    dsp = tl.full([BW], 0.0, tl.float32)
    for r0 in range(0, ROWS, BM):
        rows = tl.program_id(0) * ROWS + r0 + tl.arange(0, BM)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * W + cols[None, :]
        gate_x, gate_a, dgate_x, dgate_a, sp, log_a, one_minus_a2, mult, reset = _gates(
            gx_ptr, ga_ptr, lam_ptr, reset_ptr, offs, rows, cols, mask, rmask, cmask, c)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dxn = tl.load(dxn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        da = tl.where(reset, 0.0, tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        dmult = tl.where(reset, 0.0, dxn * x * gate_x)
        # sqrt's derivative 1 / (2 sqrt(1 - a²)), capped: the denominator is at least 1 / cap
        denom = tl.sqrt(tl.maximum(4.0 * one_minus_a2, min_denominator_sq))
        a = tl.exp(log_a)
        dlog_a = dmult / denom * (-2.0 * a * a) + da * a
        tl.store(dx_ptr + offs, (dxn * gate_x * mult).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dgx_ptr + offs, (dxn * x * mult * dgate_x).to(dgx_ptr.dtype.element_ty), mask=mask)
        tl.store(dga_ptr + offs, (dlog_a * (-c * sp) * dgate_a).to(dga_ptr.dtype.element_ty),
                 mask=mask)
        dsp += tl.reduce(tl.where(mask, dlog_a * (-c * gate_a), 0.0), 0, add)
    tl.store(dsp_ptr + tl.program_id(0) * W + cols, dsp, mask=cmask)


def _launch(M: int, W: int) -> tuple[tuple[int, int], int]:
    """(grid, ROWS): tokens per program a power of two in [BM, MAX_ROWS], no idle tiles."""
    rows = max(BM, min(MAX_ROWS, triton.next_power_of_2(M)))
    return (triton.cdiv(M, rows), triton.cdiv(W, BW)), rows


class _RGLRUGatesTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gx_logits, ga_logits, a_param, reset, c: float, max_sqrt_gradient: float):  # type: ignore[override]
        x, gx_logits, ga_logits = x.contiguous(), gx_logits.contiguous(), ga_logits.contiguous()
        W = x.shape[-1]
        M = x.numel() // W
        reset_rows = reset.reshape(M).contiguous().view(torch.uint8)
        x_norm = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        a = torch.empty_like(x_norm)
        grid, rows = _launch(M, W)
        _rg_lru_fwd_kernel[grid](x, gx_logits, ga_logits, a_param, reset_rows, x_norm, a, M, W, c,
                                 BM=BM, BW=BW, ROWS=rows, num_warps=8)
        ctx.save_for_backward(x, gx_logits, ga_logits, a_param, reset_rows)
        ctx.c, ctx.max_sqrt_gradient = c, max_sqrt_gradient
        return x_norm, a

    @staticmethod
    def backward(ctx, dx_norm, da):  # type: ignore[override]
        x, gx_logits, ga_logits, a_param, reset_rows = ctx.saved_tensors
        W = x.shape[-1]
        M = x.numel() // W
        grid, rows = _launch(M, W)
        dx, dgx, dga = torch.empty_like(x), torch.empty_like(gx_logits), torch.empty_like(ga_logits)
        dsp_partial = torch.empty(grid[0], W, device=x.device, dtype=torch.float32)
        _rg_lru_bwd_kernel[grid](x, gx_logits, ga_logits, a_param, reset_rows, dx_norm.contiguous(), da.contiguous(),
                                 dx, dgx, dga, dsp_partial, M, W, ctx.c, 1.0 / ctx.max_sqrt_gradient**2,
                                 BM=BM, BW=BW, ROWS=rows, num_warps=8)
        da_param = dsp_partial.sum(0) * torch.sigmoid(a_param.float())
        return dx, dgx, dga, da_param.to(a_param.dtype), None, None, None


def rg_lru_gates(x: torch.Tensor, gx_logits: torch.Tensor, ga_logits: torch.Tensor, a_param: torch.Tensor,
                 reset: torch.Tensor, c: float, max_sqrt_gradient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.rg_lru_gates``'s Triton path (arguments checked there)."""
    if x.numel() == 0:
        return _ref.rg_lru_gates(x, gx_logits, ga_logits, a_param, reset, c, max_sqrt_gradient)
    return _RGLRUGatesTriton.apply(x, gx_logits, ga_logits, a_param.contiguous(), reset, c,  # read with stride 1
                                   max_sqrt_gradient)


register_triton("rg_lru_gates", rg_lru_gates)
