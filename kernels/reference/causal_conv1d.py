"""Document-aware depthwise causal convolution references.

Both accumulate in at least fp32 (fp64 inputs stay fp64); outputs come back in the input
dtype, states in the accumulation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..varlen import seq_bounds
from .linear_recurrence import acc_dtype


def naive_causal_conv1d(x, weight, bias=None, *, activation=None, cu_seqlens=None,
                        initial_state=None, output_final_state=False):
    """Token by token with an explicit window of the last W inputs (oldest first)."""
    Bsz, T, Dm = x.shape
    W = weight.shape[1]
    acc = acc_dtype(x.dtype)
    xf, wf = x.to(acc), weight.to(acc)
    outs, finals = [], []
    for i, s, e in seq_bounds(cu_seqlens, Bsz, T):
        b = 0 if cu_seqlens is not None else i
        state = initial_state[i].to(acc) if initial_state is not None else x.new_zeros(Dm, W - 1, dtype=acc)
        seq_out = []
        for t in range(s, e):
            window = torch.cat([state, xf[b, t][:, None]], dim=1)
            y = (window * wf).sum(-1)
            if bias is not None:
                y = y + bias.to(acc)
            seq_out.append(F.silu(y) if activation == "silu" else y)
            state = window[:, 1:]
        outs.append(torch.stack(seq_out) if seq_out else x.new_zeros(0, Dm, dtype=acc))
        finals.append(state)
    y = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    return y.to(x.dtype), (torch.stack(finals) if output_final_state else None)


def _conv(x_cf: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 'valid' convolution of channels-first [b, D, W-1+T] to [b, T, D]."""
    return F.conv1d(x_cf, weight[:, None, :], groups=weight.shape[0]).transpose(1, 2)


def chunk_causal_conv1d(x, weight, bias=None, *, activation=None, cu_seqlens=None,
                        initial_state=None, output_final_state=False):
    """Vectorised form of ``naive_causal_conv1d`` (one depthwise F.conv1d, no token loop).

    Each sequence is viewed with its W-1 state entries in front: tap j of token t reads
    position t-(W-1)+j of that view. Packed documents are convolved as one sequence, then
    the first W-1 tokens of each document (the only ones whose window crosses its start)
    are recomputed by a gather whose out-of-document reads go to that document's initial
    state (or zero). Documents never mix and nothing is padded.
    """
    Bsz, T, Dm = x.shape
    W = weight.shape[1]
    acc = acc_dtype(x.dtype)
    xf, wf = x.to(acc), weight.to(acc)
    n_seq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    state = initial_state.to(acc) if initial_state is not None else xf.new_zeros(n_seq, Dm, W - 1)
    if T == 0:  # F.conv1d rejects inputs shorter than the kernel
        y, final = xf, state
    elif cu_seqlens is None:
        xp = torch.cat([state, xf.transpose(1, 2)], dim=2)  # [B, D, W-1+T]
        y = _conv(xp, wf)
        final = xp[:, :, T:]
    else:
        y = _conv(F.pad(xf.transpose(1, 2), (W - 1, 0)), wf)[0]  # as if one document
        cu = cu_seqlens.long()
        d = torch.arange(n_seq, device=x.device)
        # source table: packed tokens, then each document's W-1 state rows (oldest first)
        table = torch.cat([xf[0], state.transpose(1, 2).reshape(n_seq * (W - 1), Dm)], dim=0)

        def source(pos: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
            """Table row of view position pos (absolute, may precede its doc's start)."""
            before = pos - cu[doc]  # < 0: inside the state, -1 is its newest entry
            return torch.where(before >= 0, pos, T + doc * (W - 1) + (W - 1) + before)

        head = cu[:-1, None] + torch.arange(W - 1, device=x.device)  # first W-1 tokens per doc
        inside = head < cu[1:, None]
        pos, doc = head[inside], d[:, None].expand_as(head)[inside]
        taps = torch.arange(W, device=x.device) - (W - 1)
        fixed = (table[source(pos[:, None] + taps, doc[:, None])] * wf.t()).sum(1)
        y = y.index_copy(0, pos, fixed)[None]
        last = torch.arange(W - 1, device=x.device) - (W - 1)
        final = table[source(cu[1:, None] + last, d[:, None])].transpose(1, 2)  # [N, D, W-1]
    if bias is not None:
        y = y + bias.to(acc)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), (final.contiguous() if output_final_state else None)
