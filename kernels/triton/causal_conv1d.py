"""Triton document-aware depthwise causal convolution (width <= 4) with fused SiLU.

Each program owns a tile of tokens x channels of the flattened [B*T, D] input. A token
finds its sequence through a per-token sequence id and the sequence offsets, so a tap that
would reach before its sequence's start reads that sequence's initial conv state (or
zero) instead: documents never mix, however short. The backward recomputes the
pre-activation (no activation is saved), writes dz = dy * silu'(z) once in fp32 with
per-tile partial sums for dweight and dbias, then gathers dx from dz (plus the final-state
gradient for the last W-1 tokens); a small kernel collects the initial-state gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_triton
from .linear_recurrence import _add, _seq_channels, seq_offsets


@triton.jit
def _state_row(ptr, n, d, D, W: tl.constexpr):
    """Entry 0 of channel d of sequence n in the [N, D, W-1] conv state at ``ptr``."""
    return ptr + n * (D * (W - 1)) + d * (W - 1)


@triton.jit
def _tap_weight(w_ptr, d, dm, j: tl.constexpr, W: tl.constexpr):
    """Weight of tap j for channels d, in fp32."""
    return tl.load(w_ptr + d * W + j, mask=dm, other=0.0).to(tl.float32)


@triton.jit
def _token_tile(L, D, BT: tl.constexpr, BD: tl.constexpr):
    """Tokens t (program 0) and channels d (program 1) of a [BT, BD] tile, and their masks."""
    t = tl.program_id(0) * BT + tl.arange(0, BT).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    return t, d, t < L, d < D


@triton.jit
def _window_tap(x_ptr, st_ptr, t, s, doc, d, tm, dm, D, j: tl.constexpr, W: tl.constexpr,
                HAS_STATE: tl.constexpr):
    """Input seen by tap j of tokens t: x[t-(W-1)+j] inside the sequence, else its state."""
    pos = t - (W - 1) + j
    inside = pos >= s
    m = (tm & inside)[:, None] & dm[None, :]
    v = tl.load(x_ptr + pos[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_STATE:
        ms = (tm & (pos < s))[:, None] & dm[None, :]
        # one integer offset, not _state_row's pointer sum: the same address, but this hot
        # loop's code (and bwd_dz's spills) stay as measured
        soff = doc[:, None] * (D * (W - 1)) + d[None, :] * (W - 1) + (W - 1 + pos - s)[:, None]
        v += tl.load(st_ptr + soff, mask=ms, other=0.0).to(tl.float32)
    return v


@triton.jit
def _preact(x_ptr, w_ptr, b_ptr, st_ptr, t, s, doc, d, tm, dm, D, W: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    z = tl.full([BT, BD], 0.0, tl.float32)
    for j in tl.static_range(W):
        wj = _tap_weight(w_ptr, d, dm, j, W)
        z += _window_tap(x_ptr, st_ptr, t, s, doc, d, tm, dm, D, j, W, HAS_STATE) * wj[None, :]
    if HAS_BIAS:
        z += tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, st_ptr, y_ptr, doc_ptr, cu_ptr, L, D,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                     SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    t, d, tm, dm = _token_tile(L, D, BT, BD)
    doc = tl.load(doc_ptr + t, mask=tm, other=0).to(tl.int64)
    s = tl.load(cu_ptr + doc, mask=tm, other=0).to(tl.int64)
    z = _preact(x_ptr, w_ptr, b_ptr, st_ptr, t, s, doc, d, tm, dm, D, W, HAS_BIAS, HAS_STATE, BT, BD)
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    tl.store(y_ptr + t[:, None] * D + d[None, :], z.to(y_ptr.dtype.element_ty),
             mask=tm[:, None] & dm[None, :])


@triton.jit
def _conv_final_state_kernel(x_ptr, st_ptr, fin_ptr, cu_ptr, D, W: tl.constexpr,
                             HAS_STATE: tl.constexpr, BD: tl.constexpr):
    """final[n, :, k] = input at position e-(W-1)+k of sequence n (state if before its start)."""
    n, d, dm, s, e = _seq_channels(cu_ptr, D, BD)
    for k in tl.static_range(W - 1):
        pos = e - (W - 1) + k
        v = tl.load(x_ptr + pos * D + d, mask=dm & (pos >= s), other=0.0).to(tl.float32)
        if HAS_STATE:
            v += tl.load(_state_row(st_ptr, n, d, D, W) + W - 1 + pos - s,
                         mask=dm & (pos < s), other=0.0).to(tl.float32)
        tl.store(_state_row(fin_ptr, n, d, D, W) + k, v, mask=dm)


@triton.jit
def _conv_bwd_dz_kernel(x_ptr, w_ptr, b_ptr, st_ptr, dy_ptr, dz_ptr, dwp_ptr, dbp_ptr, doc_ptr,
                        cu_ptr, L, D, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_STATE: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr):
    pid = tl.program_id(0)
    t, d, tm, dm = _token_tile(L, D, BT, BD)
    m = tm[:, None] & dm[None, :]
    doc = tl.load(doc_ptr + t, mask=tm, other=0).to(tl.int64)
    s = tl.load(cu_ptr + doc, mask=tm, other=0).to(tl.int64)
    dz = tl.load(dy_ptr + t[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    if SILU:
        z = _preact(x_ptr, w_ptr, b_ptr, st_ptr, t, s, doc, d, tm, dm, D, W, HAS_BIAS, HAS_STATE, BT, BD)
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    tl.store(dz_ptr + t[:, None] * D + d[None, :], dz, mask=m)
    for j in tl.static_range(W):
        v = _window_tap(x_ptr, st_ptr, t, s, doc, d, tm, dm, D, j, W, HAS_STATE)
        tl.store(dwp_ptr + (pid * W + j) * D + d, tl.reduce(dz * v, 0, _add), mask=dm)
    tl.store(dbp_ptr + pid * D + d, tl.reduce(dz, 0, _add), mask=dm)


@triton.jit
def _conv_bwd_dx_kernel(dz_ptr, w_ptr, dfin_ptr, dx_ptr, doc_ptr, cu_ptr, L, D, W: tl.constexpr,
                        HAS_DFIN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dx_p = sum_j w_j dz_{p+W-1-j} over outputs of p's own sequence, + final-state grad."""
    t, d, tm, dm = _token_tile(L, D, BT, BD)
    doc = tl.load(doc_ptr + t, mask=tm, other=0).to(tl.int64)
    e = tl.load(cu_ptr + doc + 1, mask=tm, other=0).to(tl.int64)
    dx = tl.full([BT, BD], 0.0, tl.float32)
    for j in tl.static_range(W):
        out = t + (W - 1) - j
        wj = _tap_weight(w_ptr, d, dm, j, W)
        g = tl.load(dz_ptr + out[:, None] * D + d[None, :], mask=(tm & (out < e))[:, None] & dm[None, :],
                    other=0.0)
        dx += g * wj[None, :]
    if HAS_DFIN:
        k = t - e + (W - 1)  # index of this token in its sequence's final state, if >= 0
        fm = (tm & (k >= 0))[:, None] & dm[None, :]
        dx += tl.load(_state_row(dfin_ptr, doc[:, None], d[None, :], D, W) + k[:, None],
                      mask=fm, other=0.0).to(tl.float32)
    tl.store(dx_ptr + t[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=tm[:, None] & dm[None, :])


@triton.jit
def _conv_bwd_dstate_kernel(dz_ptr, w_ptr, dfin_ptr, dst_ptr, cu_ptr, D, W: tl.constexpr,
                            HAS_DFIN: tl.constexpr, BD: tl.constexpr):
    """State entry m (position s-(W-1)+m) feeds outputs s+m-j for taps j <= m."""
    n, d, dm, s, e = _seq_channels(cu_ptr, D, BD)
    for m in tl.static_range(W - 1):
        acc = tl.full([BD], 0.0, tl.float32)
        for j in tl.static_range(m + 1):
            out = s + m - j
            wj = _tap_weight(w_ptr, d, dm, j, W)
            acc += wj * tl.load(dz_ptr + out * D + d, mask=dm & (out < e), other=0.0)
        if HAS_DFIN:
            k = s - e + m
            acc += tl.load(_state_row(dfin_ptr, n, d, D, W) + k, mask=dm & (k >= 0),
                           other=0.0).to(tl.float32)
        tl.store(_state_row(dst_ptr, n, d, D, W) + m, acc, mask=dm)


def _blocks(D: int, block_t: int | None) -> tuple[int, int]:
    return (block_t or 64), min(64, max(16, triton.next_power_of_2(D)))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, doc, cu, silu, block_t, want_final):
        L, D = x.shape
        W = weight.shape[1]
        N = cu.numel() - 1
        BT, BD = _blocks(D, block_t)
        y = torch.empty_like(x)
        dummy = y
        _conv_fwd_kernel[(triton.cdiv(L, BT), triton.cdiv(D, BD))](
            x, weight, bias if bias is not None else dummy, state if state is not None else dummy,
            y, doc, cu, L, D, W=W, HAS_BIAS=bias is not None, HAS_STATE=state is not None,
            SILU=silu, BT=BT, BD=BD)
        ctx.save_for_backward(x, weight, bias, state, doc, cu)
        ctx.cfg = (silu, BT, BD)
        ctx.set_materialize_grads(False)
        if not want_final:  # training: no state to hand on, so none is made
            return y, None
        final = torch.zeros(N, D, W - 1, device=x.device, dtype=torch.float32)
        if W > 1 and N > 0:
            _conv_final_state_kernel[(N, triton.cdiv(D, BD))](
                x, state if state is not None else dummy, final, cu, D, W=W,
                HAS_STATE=state is not None, BD=BD)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, state, doc, cu = ctx.saved_tensors
        silu, BT, BD = ctx.cfg
        L, D = x.shape
        W = weight.shape[1]
        N = cu.numel() - 1
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        has_dfin = dfinal is not None and W > 1
        dfin = dfinal.float().contiguous() if has_dfin else dy
        nt = triton.cdiv(L, BT)
        dz = torch.empty(L, D, device=x.device, dtype=torch.float32)
        dwp = torch.empty(nt, W, D, device=x.device, dtype=torch.float32)
        dbp = torch.empty(nt, D, device=x.device, dtype=torch.float32)
        st = state if state is not None else dz
        if L > 0:
            _conv_bwd_dz_kernel[(nt, triton.cdiv(D, BD))](
                x, weight, bias if bias is not None else dz, st, dy, dz, dwp, dbp, doc, cu, L, D,
                W=W, HAS_BIAS=bias is not None, HAS_STATE=state is not None, SILU=silu, BT=BT, BD=BD)
        dx = torch.empty_like(x)
        if L > 0:
            _conv_bwd_dx_kernel[(nt, triton.cdiv(D, BD))](
                dz, weight, dfin, dx, doc, cu, L, D, W=W, HAS_DFIN=has_dfin, BT=BT, BD=BD)
        dstate = None
        if state is not None:
            dstate = torch.zeros(N, D, W - 1, device=x.device, dtype=torch.float32)
            if W > 1 and N > 0:
                _conv_bwd_dstate_kernel[(N, triton.cdiv(D, BD))](
                    dz, weight, dfin, dstate, cu, D, W=W, HAS_DFIN=has_dfin, BD=BD)
            dstate = dstate.to(state.dtype)
        dw = dwp.sum(0).t().to(weight.dtype)
        db = dbp.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, dstate, None, None, None, None, None


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  activation: str | None = None, cu_seqlens: torch.Tensor | None = None,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                  block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of ``kernels.causal_conv1d`` (inputs already validated by ops.py).

    y comes back in x's dtype, the final conv state [N, D, W-1] in fp32 (fp64 for fp64
    inputs). ``block_t`` (a power of two) overrides the token tile for tests.
    """
    Bsz, T, D = x.shape
    cu = seq_offsets(Bsz, T, cu_seqlens, x.device)
    N = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(N, device=x.device, dtype=torch.int32), lengths,
                                  output_size=Bsz * T)
    state = initial_state.contiguous() if initial_state is not None else None
    y, final = _CausalConv1d.apply(x.reshape(Bsz * T, D).contiguous(), weight.contiguous(),
                                   bias.contiguous() if bias is not None else None, state, doc, cu,
                                   activation == "silu", block_t, output_final_state)
    final = final.to(torch.promote_types(x.dtype, torch.float32)) if output_final_state else None
    return y.view(Bsz, T, D), final


register_triton("causal_conv1d", causal_conv1d)
