"""Mamba2 SSD references: naive per-token recurrence and chunked (matrix) form.

Both accumulate in at least fp32 (fp64 inputs stay fp64, so the naive form can serve as a
float64 oracle); outputs come back in the input dtype, states in the accumulation dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..varlen import packed_to_padded, padded_to_packed, seq_bounds
from .linear_recurrence import acc_dtype, scan

CHUNK_SIZE = 32


def decay(dt: torch.Tensor, A: torch.Tensor, allow_neg_eigval: bool) -> torch.Tensor:
    """Per-step decay a_t from dt [...,H] and A [H]; in (-1, 1) with negative eigenvalues."""
    a = torch.exp(dt * A)
    return 2.0 * a - 1.0 if allow_neg_eigval else a


def naive_ssd(x, dt, A, B, C, *, D=None, allow_neg_eigval=False, initial_state=None,
              output_final_state=False, cu_seqlens=None):
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    rep = H // G
    acc = acc_dtype(x.dtype)
    xf, dtf, Af = x.to(acc), dt.to(acc), A.to(acc)
    Bf = B.to(acc).repeat_interleave(rep, dim=2)
    Cf = C.to(acc).repeat_interleave(rep, dim=2)
    outs, finals = [], []
    for i, s, e in seq_bounds(cu_seqlens, Bsz, T):
        b = 0 if cu_seqlens is not None else i
        h = initial_state[i].to(acc) if initial_state is not None else x.new_zeros(H, P, N, dtype=acc)
        seq_out = []
        for t in range(s, e):
            a = decay(dtf[b, t], Af, allow_neg_eigval)
            h = a[:, None, None] * h + (dtf[b, t][:, None] * xf[b, t])[:, :, None] * Bf[b, t][:, None, :]
            y = torch.einsum("hpn,hn->hp", h, Cf[b, t])
            if D is not None:
                y = y + D.to(acc)[:, None] * xf[b, t]
            seq_out.append(y)
        outs.append(torch.stack(seq_out) if seq_out else x.new_zeros(0, H, P, dtype=acc))
        finals.append(h)
    y = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    return y.to(x.dtype), (torch.stack(finals) if output_final_state else None)


def segment_decay(v: torch.Tensor, log_space: bool) -> torch.Tensor:
    """M[..., l, s] = prod_{k=s+1..l} a_k for s <= l, and 0 above the diagonal.

    ``v`` [..., L] holds log a_k (log_space) or a_k itself. Built as a masked cumsum
    (cumprod) down the rows, never as a difference of prefix sums (prefix products), so it
    stays exact when a_k is 0 (log a_k = -inf) or negative, and its gradient stays finite.
    """
    L = v.shape[-1]
    idx = torch.arange(L, device=v.device)
    strict = idx[:, None] > idx[None, :]
    lower = idx[:, None] >= idx[None, :]
    rows = v.unsqueeze(-1).expand(*v.shape, L)  # rows[..., l, s] = v[l]
    if log_space:
        seg = torch.where(strict, rows, torch.zeros((), dtype=v.dtype, device=v.device)).cumsum(-2)
        return torch.exp(torch.where(lower, seg, torch.full((), -math.inf, dtype=v.dtype, device=v.device)))
    seg = torch.where(strict, rows, torch.ones((), dtype=v.dtype, device=v.device)).cumprod(-2)
    return torch.where(lower, seg, torch.zeros((), dtype=v.dtype, device=v.device))


def _ssd_core(x, dt, A, Bm, Cm, h0, neg: bool, reset, chunk: int):
    """Chunked SSD over [b, T, ...] in the accumulation dtype; returns (y without D, final).

    x [b,T,H,P], dt [b,T,H], A [H], Bm/Cm [b,T,G,N], h0 [b,H,P,N] or None, reset [b,T] bool
    or None (a_t forced to 0 there: a state restart for packed documents without
    initial state). T is padded to whole chunks with identity steps (dt = 0, x = B = C = 0).
    """
    b, T, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    R = H // G
    if T == 0:
        return x.new_zeros(b, 0, H, P), (h0 if h0 is not None else x.new_zeros(b, H, P, N))
    L = min(chunk, T)
    nc = -(-T // L)
    pad = nc * L - T
    if pad:
        x, dt, Bm, Cm = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, Bm, Cm))
        if reset is not None:
            reset = torch.cat([reset, reset.new_zeros(b, pad)], dim=1)
    x = x.reshape(b, nc, L, G, R, P)
    dt = dt.reshape(b, nc, L, G, R)
    Bm = Bm.reshape(b, nc, L, G, N)
    Cm = Cm.reshape(b, nc, L, G, N)
    if neg:
        step = decay(dt, A.reshape(G, R), True)
        if reset is not None:
            step = step.masked_fill(reset.reshape(b, nc, L, 1, 1), 0.0)
    else:
        step = dt * A.reshape(G, R)  # log a_t
        if reset is not None:
            step = step.masked_fill(reset.reshape(b, nc, L, 1, 1), -math.inf)
    v = step.permute(0, 1, 3, 4, 2)  # [b, c, g, r, l]
    M = segment_decay(v, log_space=not neg)  # [b, c, g, r, l, s]
    cum = v.cumprod(-1) if neg else v.cumsum(-1).exp()  # decay from chunk start, inclusive
    xdt = x * dt[..., None]
    # intra-chunk (quadratic) part: y_l = sum_{s<=l} (C_l . B_s) M[l, s] dt_s x_s
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cm, Bm)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * M, xdt)
    # per-chunk states from zero, then exact state passing over chunks: the chunk end states
    # obey h_c = total_c h_{c-1} + S_c, the elementwise linear recurrence
    to_end = M[..., -1, :].permute(0, 1, 4, 2, 3)  # [b, c, s, g, r]
    states = torch.einsum("bcsgrp,bcsgn->bcgrpn", xdt * to_end[..., None], Bm)
    total = cum[..., -1][..., None, None]  # [b, c, g, r, 1, 1]
    if h0 is not None:
        h0 = h0.reshape(b, 1, G, R, P, N)
        states = torch.cat([states[:, :1] + total[:, :1] * h0, states[:, 1:]], dim=1)
    ends = scan(total.expand_as(states), states)
    start = torch.zeros_like(ends[:, :1]) if h0 is None else h0
    carried = torch.cat([start, ends[:, :-1]], dim=1)  # state entering each chunk
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cm, carried) * cum.permute(0, 1, 4, 2, 3)[..., None]
    y = y.reshape(b, nc * L, H, P)[:, :T]
    return y, ends[:, -1].reshape(b, H, P, N)


def chunk_ssd(x, dt, A, B, C, *, D=None, allow_neg_eigval=False, initial_state=None,
              output_final_state=False, cu_seqlens=None, chunk_size: int = CHUNK_SIZE):
    """Chunkwise SSD: C.B^T within chunks, states passed between chunks; see ``naive_ssd``.

    Packed documents without initial or final states restart the state in place (no
    padding); otherwise documents are scattered into a right-padded batch whose padding is
    an identity step (dt = 0 gives a = 1 with and without negative eigenvalues).
    """
    acc = acc_dtype(x.dtype)
    xf, dtf, Af, Bf, Cf = (t.to(acc) for t in (x, dt, A, B, C))
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        y, final = _ssd_core(xf, dtf, Af, Bf, Cf, h0, allow_neg_eigval, None, chunk_size)
    elif h0 is None and not output_final_state:
        starts = cu_seqlens[:-1].long()
        reset = torch.zeros(1, x.shape[1], dtype=torch.bool, device=x.device)
        reset[0, starts[starts < x.shape[1]]] = True
        y, final = _ssd_core(xf, dtf, Af, Bf, Cf, None, allow_neg_eigval, reset, chunk_size)
    else:
        pads = [packed_to_padded(t, cu_seqlens) for t in (xf, dtf, Bf, Cf)]
        y, final = _ssd_core(pads[0], pads[1], Af, pads[2], pads[3], h0, allow_neg_eigval, None, chunk_size)
        y = padded_to_packed(y, cu_seqlens)
    if D is not None:
        y = y + D.to(acc)[:, None] * xf
    return y.to(x.dtype), (final if output_final_state else None)
