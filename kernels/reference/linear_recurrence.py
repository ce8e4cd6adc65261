"""Elementwise linear recurrence references: naive loop and chunked parallel scan.

Both accumulate in at least fp32 (fp64 inputs stay fp64); outputs come back in the input
dtype, final states in the accumulation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..varlen import seq_bounds

CHUNK_SIZE = 16


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every reference op: fp32 for half/bf16/fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def naive_linear_recurrence(x, a, *, initial_state=None, output_final_state=False, cu_seqlens=None):
    Bsz, T, Dm = x.shape
    acc = acc_dtype(x.dtype)
    xf, af = x.to(acc), a.to(acc)
    outs, finals = [], []
    for i, s, e in seq_bounds(cu_seqlens, Bsz, T):
        b = 0 if cu_seqlens is not None else i
        h = initial_state[i].to(acc) if initial_state is not None else x.new_zeros(Dm, dtype=acc)
        seq_out = []
        for t in range(s, e):
            h = af[b, t] * h + xf[b, t]
            seq_out.append(h)
        outs.append(torch.stack(seq_out) if seq_out else x.new_zeros(0, Dm, dtype=acc))
        finals.append(h)
    h_all = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    return h_all.to(x.dtype), (torch.stack(finals) if output_final_state else None)


def _local_scan(a: torch.Tensor, x: torch.Tensor, dim: int, with_cum: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Scan every chunk at once along ``dim``: (prod_{k<=t} a_k, h_t from h = 0).

    A short loop over the chunk positions, vectorised over all chunks and channels. Only
    products and sums of the inputs, so zeros and signs of a are exact (no logs); unbind and
    stack keep the backward to a few full-size passes.
    """
    As, Xs = a.unbind(dim), x.unbind(dim)
    h, cum = [Xs[0]], [As[0]]
    for a_l, x_l in zip(As[1:], Xs[1:]):
        h.append(a_l * h[-1] + x_l)
        if with_cum:
            cum.append(a_l * cum[-1])
    return (torch.stack(cum, dim) if with_cum else None), torch.stack(h, dim)


def scan(a: torch.Tensor, x: torch.Tensor, chunk: int = CHUNK_SIZE) -> torch.Tensor:
    """h_t = a_t h_{t-1} + x_t along dim 1 of [b, T, ...] from h = 0, chunked.

    Every chunk is scanned from zero in parallel; the chunk end states obey the same
    recurrence one level up (chunk decay = product of its a) and are solved recursively,
    then carried into each chunk. T/chunk-fold less Python work per level than a token loop.
    """
    b, T = a.shape[:2]
    if T == 0:
        return x
    if T <= chunk:
        return _local_scan(a, x, 1, with_cum=False)[1]
    nc = -(-T // chunk)
    pad = nc * chunk - T
    rest = a.shape[2:]
    a = F.pad(a, (0, 0) * len(rest) + (0, pad), value=1.0).reshape(b, nc, chunk, *rest)
    x = F.pad(x, (0, 0) * len(rest) + (0, pad)).reshape(b, nc, chunk, *rest)
    cum, local = _local_scan(a, x, 2, with_cum=True)
    ends = scan(cum[:, :, -1], local[:, :, -1], chunk)  # state at each chunk end
    carry = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
    h = local + cum * carry[:, :, None]
    return h.reshape(b, nc * chunk, *rest)[:, :T]


def chunk_linear_recurrence(x, a, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                            chunk_size: int = CHUNK_SIZE):
    """Chunked parallel scan; see ``naive_linear_recurrence``.

    Packed documents are scanned in place: at a document start a is replaced by 0 and the
    initial state enters through the input (x + a h0), so nothing is padded.
    """
    Bsz, T, Dm = x.shape
    acc = acc_dtype(x.dtype)
    xf, af = x.to(acc), a.to(acc)
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        if h0 is not None and T:
            xf = torch.cat([xf[:, :1] + af[:, :1] * h0[:, None], xf[:, 1:]], dim=1)
        h = scan(af, xf, chunk_size)
        final = h[:, -1] if T else (h0 if h0 is not None else xf.new_zeros(Bsz, Dm))
        return h.to(x.dtype), (final if output_final_state else None)
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    starts = cu[:-1][lengths > 0]
    is_start = torch.zeros(T, dtype=torch.bool, device=x.device)
    is_start[starts] = True
    is_start = is_start[None, :, None]
    if h0 is not None:
        doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
        xf = xf + torch.where(is_start, af * h0[doc][None], torch.zeros((), dtype=acc, device=x.device))
    af = af.masked_fill(is_start, 0.0)
    h = scan(af, xf, chunk_size)
    final = None
    if output_final_state:
        fallback = h0 if h0 is not None else xf.new_zeros(lengths.numel(), Dm)
        last = h[0].index_select(0, (cu[1:] - 1).clamp(min=0)) if T else fallback
        final = torch.where((lengths > 0)[:, None], last, fallback)
    return h.to(x.dtype), final
