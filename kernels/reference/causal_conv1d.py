"""Document-aware depthwise causal convolution references.

Both accumulate in at least fp32 (fp64 inputs stay fp64); outputs come back in the input
dtype, states in the accumulation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..varlen import seq_bounds
from .ssd import acc_dtype


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


def chunk_causal_conv1d(x, weight, bias=None, *, activation=None, cu_seqlens=None,
                        initial_state=None, output_final_state=False):
    """Vectorised form of ``naive_causal_conv1d``: W shifted multiply-adds, no per-token loop.

    Each sequence (batch row or packed document) is viewed with its W-1 state entries in
    front: tap j of token t reads position t-(W-1)+j of that view. For packed documents the
    view is built by a gather whose out-of-document reads go to the document's initial
    state (or zero), so documents never mix and nothing is padded.
    """
    Bsz, T, Dm = x.shape
    W = weight.shape[1]
    acc = acc_dtype(x.dtype)
    xf, wf = x.to(acc), weight.to(acc)
    n_seq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    state = (initial_state.to(acc) if initial_state is not None
             else xf.new_zeros(n_seq, Dm, W - 1)).transpose(1, 2)  # [N, W-1, D]
    if cu_seqlens is None:
        xp = torch.cat([state, xf], dim=1)  # [B, W-1+T, D]
        y = sum(xp[:, j:j + T] * wf[:, j] for j in range(W))
        final = xp[:, T:]
    else:
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(n_seq, device=x.device), lengths)
        # source table: packed tokens, then each document's W-1 state rows
        table = torch.cat([xf[0], state.reshape(n_seq * (W - 1), Dm)], dim=0)

        def source(pos: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            """Table row of view position pos (absolute, may precede the doc start) of doc d."""
            before = pos - cu[d]  # < 0: inside the state, -1 is its newest entry
            return torch.where(before >= 0, pos, T + d * (W - 1) + (W - 1) + before)

        t = torch.arange(T, device=x.device)
        taps = torch.arange(W, device=x.device) - (W - 1)
        idx = source(t[:, None] + taps, doc[:, None])  # [T, W]
        y = (table[idx] * wf.t()).sum(1)[None]
        d = torch.arange(n_seq, device=x.device)
        last = torch.arange(W - 1, device=x.device) - (W - 1)
        final = table[source(cu[1:, None] + last, d[:, None])]  # [N, W-1, D]
    if bias is not None:
        y = y + bias.to(acc)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), (final.transpose(1, 2).contiguous() if output_final_state else None)
