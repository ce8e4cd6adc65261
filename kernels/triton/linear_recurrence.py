"""Triton elementwise linear recurrence h_t = a_t h_{t-1} + x_t (the RG-LRU scan).

One program owns one sequence (a row of the batch or a packed document) and a block of
channels, and walks its time axis in tiles of ``BT`` steps: each tile is loaded once,
scanned in registers with ``tl.associative_scan`` (fp32), the carry from the previous tile
folded into its first row, stored once. So the forward reads x and a and writes h exactly
once (memory-bound, no second pass). The backward is the same scan run in reverse time:
dh_t = g_t + a_{t+1} dh_{t+1}, dx_t = dh_t, da_t = dh_t h_{t-1}, dh0 = a_s dh_s, reading
the saved output h for h_{t-1}. Documents are independent programs, so resets are free.

Kernels here call only builtins and our own jit helpers, never ``triton.language.standard``
functions (tl.sum, tl.zeros, tl.sigmoid, tl.cumsum): those are jit-compiled when triton is imported,
so they break under ``TRITON_INTERPRET=1`` set after that import (as in a test session).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_triton


@triton.jit
def _affine_combine(a1, x1, a2, x2):
    """Compose h -> a1 h + x1 then h -> a2 h + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _last_row(v, last):
    """Row BT-1 of a [BT, BD] tile (tl.reduce, not tl.sum: see the module note)."""
    return tl.reduce(tl.where(last, v, 0.0), 0, _add)


@triton.jit
def _seq_channels(cu_ptr, D, BD: tl.constexpr):
    """The sequence n (program 0) with its span [s, e) and the channel block d (program 1)."""
    n = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    s = tl.load(cu_ptr + n).to(tl.int64)
    e = tl.load(cu_ptr + n + 1).to(tl.int64)
    return n, d, dm, s, e


@triton.jit
def _tile_rows(BT: tl.constexpr):
    """Row indices of a time tile and [BT, 1] masks of its first and last rows."""
    rows = tl.arange(0, BT)
    return rows, (rows == 0)[:, None], (rows == BT - 1)[:, None]


@triton.jit
def _state_or_zero(ptr, n, d, dm, D, PRESENT: tl.constexpr, BD: tl.constexpr):
    """Row n of an optional [N, D] state in fp32, zeros when the caller passed none."""
    if PRESENT:
        v = tl.load(ptr + n * D + d, mask=dm, other=0.0).to(tl.float32)
    else:
        v = tl.full([BD], 0.0, tl.float32)
    return v


@triton.jit
def _scan_tile(a, x, carry, first):
    """Scan one [BT, BD] tile of y_r = a_r y_{r-1} + x_r, from ``carry`` before row 0."""
    x = x + tl.where(first, a * carry[None, :], 0.0)
    _, y = tl.associative_scan((a, x), 0, _affine_combine)
    return y


@triton.jit
def _lr_fwd_kernel(x_ptr, a_ptr, h0_ptr, h_ptr, hT_ptr, cu_ptr, D,
                   HAS_H0: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, PREFETCH: tl.constexpr):
    n, d, dm, s, e = _seq_channels(cu_ptr, D, BD)
    rows, first, last = _tile_rows(BT)
    carry = _state_or_zero(h0_ptr, n, d, dm, D, HAS_H0, BD)
    if PREFETCH:  # the next tile's loads are issued before this tile's scan waits on nothing
        m = (s + rows < e)[:, None] & dm[None, :]
        off = (s + rows)[:, None] * D + d[None, :]
        xn = tl.load(x_ptr + off, mask=m, other=0.0)
        an = tl.load(a_ptr + off, mask=m, other=1.0)
    for t0 in range(s, e, BT):
        t = t0 + rows
        m = (t < e)[:, None] & dm[None, :]
        off = t[:, None] * D + d[None, :]
        if PREFETCH:
            xv = xn.to(tl.float32)
            av = an.to(tl.float32)
            mn = (t + BT < e)[:, None] & dm[None, :]
            xn = tl.load(x_ptr + off + BT * D, mask=mn, other=0.0)
            an = tl.load(a_ptr + off + BT * D, mask=mn, other=1.0)
        else:
            xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + off, mask=m, other=1.0).to(tl.float32)  # padding: identity step
        h = _scan_tile(av, xv, carry, first)
        tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=m)
        carry = _last_row(h, last)
    tl.store(hT_ptr + n * D + d, carry, mask=dm)


@triton.jit
def _lr_bwd_tile(a_ptr, h_ptr, dh_ptr, t, s, e, d, dm, D):
    """The loads of one reverse tile for PREFETCH (rows hold times t, descending): the output
    gradient, a_{t+1} (1 past the end, for the dh_T carry) and h_{t-1} (0 before the start)."""
    valid = t >= s
    off = t[:, None] * D + d[None, :]
    g = tl.load(dh_ptr + off, mask=valid[:, None] & dm[None, :], other=0.0)
    an = tl.load(a_ptr + off + D, mask=(valid & (t + 1 < e))[:, None] & dm[None, :], other=1.0)
    hp = tl.load(h_ptr + off - D, mask=((t - 1 >= s) & valid)[:, None] & dm[None, :], other=0.0)
    return g, an, hp


@triton.jit
def _lr_bwd_kernel(a_ptr, h_ptr, h0_ptr, dh_ptr, dhT_ptr, dx_ptr, da_ptr, dh0_ptr, cu_ptr, D,
                   HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                   PREFETCH: tl.constexpr):
    n, d, dm, s, e = _seq_channels(cu_ptr, D, BD)
    rows, first, last = _tile_rows(BT)
    carry = _state_or_zero(dhT_ptr, n, d, dm, D, HAS_DHT, BD)
    h0 = _state_or_zero(h0_ptr, n, d, dm, D, HAS_H0, BD)
    if PREFETCH:
        gn, ann, hpn = _lr_bwd_tile(a_ptr, h_ptr, dh_ptr, e - 1 - rows, s, e, d, dm, D)
    for i in range(0, e - s, BT):
        t = e - 1 - i - rows  # row r holds time t, descending
        m = (t >= s)[:, None] & dm[None, :]
        off = t[:, None] * D + d[None, :]
        if PREFETCH:
            g, an, hp = gn, ann, hpn
            gn, ann, hpn = _lr_bwd_tile(a_ptr, h_ptr, dh_ptr, t - BT, s, e, d, dm, D)
            dh = _scan_tile(an.to(tl.float32), g.to(tl.float32), carry, first)
            hp = hp.to(tl.float32)
        else:  # as timed on 2026-11-29: h_{t-1} loaded after the scan
            valid = t >= s
            g = tl.load(dh_ptr + off, mask=m, other=0.0).to(tl.float32)
            # a_{t+1} multiplies dh_{t+1}; 1 past the end (dh_T carry) and before the start
            an = tl.load(a_ptr + off + D, mask=(valid & (t + 1 < e))[:, None] & dm[None, :],
                         other=1.0).to(tl.float32)
            dh = _scan_tile(an, g, carry, first)
            hp = tl.load(h_ptr + off - D, mask=((t - 1 >= s) & valid)[:, None] & dm[None, :],
                         other=0.0).to(tl.float32)
        if HAS_H0:
            hp = hp + tl.where((t == s)[:, None], h0[None, :], 0.0)
        tl.store(dx_ptr + off, dh.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(da_ptr + off, (dh * hp).to(da_ptr.dtype.element_ty), mask=m)
        carry = _last_row(dh, last)
    if HAS_H0:
        a_s = tl.load(a_ptr + s * D + d, mask=dm & (s < e), other=1.0).to(tl.float32)
        tl.store(dh0_ptr + n * D + d, a_s * carry, mask=dm)


def seq_offsets(batch: int, length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """int32 start offsets [N+1] of each independent sequence in the flattened [B*T] axis."""
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    return (torch.arange(batch + 1, device=device, dtype=torch.int32) * length).contiguous()


def _blocks(n_seq: int, D: int, block_t: int | None, block_d: int | None = None) -> tuple[int, int]:
    """(time tile BT, channel block BD). BD: as wide as 64 while that still leaves a few
    hundred programs (``block_d`` overrides it: the bench's ``bd16`` variants halve it for
    twice the programs, so twice the warps per SM wait on loads at once).

    BT = 64 by default. The scan is latency-bound: each sequential step of a program loads
    one [BT, BD] tile of x and a, waits, scans and stores it, so one tile per program is in
    flight (at B*T = 32K, D = 2560, BD = 32: 640 programs, ~39 KB per SM on an H200's 132
    SMs; the forward reached 1756 GB/s, 44% of copy bandwidth, 2026-11-29). 128 rows double
    the bytes per step but, held in registers (155-157 per thread in the forward against
    64-71, sm_90 compile), fit 3 blocks of 4 warps per SM instead of 7-8, so the bytes in
    flight per SM barely move; the bench's ``--variants bt64,bt128,bt256`` settles it on a
    GPU. Prefetching the next tile during the scan is the likelier fix.
    """
    bd = min(64, max(16, triton.next_power_of_2(D)))
    while bd > 16 and n_seq * triton.cdiv(D, bd) < 512:
        bd //= 2
    return (block_t or 64), (block_d or bd)


class _LinearRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, h0, cu, block_t, block_d, prefetch):
        L, D = x.shape
        N = cu.numel() - 1
        BT, BD = _blocks(N, D, block_t, block_d)
        h = torch.empty_like(x)
        hT = torch.empty(N, D, device=x.device, dtype=torch.float32)
        grid = (N, triton.cdiv(D, BD))
        _lr_fwd_kernel[grid](x, a, h0 if h0 is not None else hT, h, hT, cu, D,
                             HAS_H0=h0 is not None, BT=BT, BD=BD, PREFETCH=prefetch)
        ctx.save_for_backward(a, h, h0, cu)
        ctx.blocks = (BT, BD, prefetch)
        ctx.set_materialize_grads(False)
        return h, hT

    @staticmethod
    def backward(ctx, dh, dhT):
        a, h, h0, cu = ctx.saved_tensors
        L, D = a.shape
        N = cu.numel() - 1
        BT, BD, prefetch = ctx.blocks
        dh = torch.zeros_like(h) if dh is None else dh.contiguous()
        dx = torch.empty(L, D, device=a.device, dtype=h.dtype)
        da = torch.empty_like(a)
        dh0 = torch.empty(N, D, device=a.device, dtype=torch.float32) if h0 is not None else None
        dhT_arg = dhT.float().contiguous() if dhT is not None else dx
        grid = (N, triton.cdiv(D, BD))
        _lr_bwd_kernel[grid](a, h, h0 if h0 is not None else dx, dh, dhT_arg, dx, da,
                             dh0 if dh0 is not None else dx, cu, D,
                             HAS_H0=h0 is not None, HAS_DHT=dhT is not None, BT=BT, BD=BD,
                             PREFETCH=prefetch)
        dh0 = dh0.to(h0.dtype) if dh0 is not None else None
        return dx, da, dh0, None, None, None, None


def linear_recurrence(x: torch.Tensor, a: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                      output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                      block_t: int | None = None, block_d: int | None = None,
                      prefetch: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of ``kernels.linear_recurrence`` (inputs already validated by ops.py).

    h comes back in x's dtype, the final state [N, D] in fp32 (fp64 for fp64 inputs,
    though the kernel itself accumulates in fp32). ``block_t`` (a power of two) overrides
    the time tile (default ``_blocks``), for tests that must cross tile boundaries at small T
    and for the bench's ``--variants``, as ``block_d`` (a power of two) the channel block;
    ``prefetch`` issues each tile's loads one step early
    (the ``prefetch`` variant: more bytes in flight per program, a GPU decides the default).
    """
    Bsz, T, D = x.shape
    cu = seq_offsets(Bsz, T, cu_seqlens, x.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    h, hT = _LinearRecurrence.apply(x.reshape(Bsz * T, D).contiguous(),
                                    a.reshape(Bsz * T, D).contiguous(), h0, cu, block_t, block_d, prefetch)
    final = hT.to(torch.promote_types(x.dtype, torch.float32)) if output_final_state else None
    return h.view(Bsz, T, D), final


register_triton("linear_recurrence", linear_recurrence)
