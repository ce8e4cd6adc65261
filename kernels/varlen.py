"""Packed-document helpers shared by the chunked reference ops.

A packed batch is ``[1, T, ...]`` with ``cu_seqlens`` offsets ``[N+1]``. The chunked forms
scatter it into a right-padded ``[N, L_max, ...]`` batch, run the batched algorithm, and
gather back. Right padding is harmless when the padded steps are identity transitions
(zero input, unit decay), which every caller arranges by choosing the pad values.
"""
from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, batch: int, op: str) -> None:
    if batch != 1:
        raise ValueError(f"{op}: cu_seqlens needs batch size 1 (packed documents), got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with at least 2 entries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cs = cu_seqlens.tolist()
    if cs[0] != 0 or cs[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at T={total}, got {cs[0]}..{cs[-1]}")
    if any(b < a for a, b in zip(cs, cs[1:])):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing")


def pad_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Index map from packed positions to a padded ``[N, L_max]`` layout.

    Returns (flat_index into N*L_max for each packed token, lengths [N], L_max).
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    max_len = int(lengths.max().item()) if lengths.numel() else 0
    max_len = max(max_len, 1)
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    pos = torch.arange(int(cu_seqlens[-1].item()), device=cu_seqlens.device) - cu_seqlens[:-1].long()[doc]
    return doc * max_len + pos, lengths, max_len


def packed_to_padded(
    x: torch.Tensor, cu_seqlens: torch.Tensor, fill: float = 0.0
) -> torch.Tensor:
    """``[1, T, *rest]`` -> ``[N, L_max, *rest]`` filled with ``fill`` past each document."""
    flat_idx, lengths, max_len = pad_index(cu_seqlens)
    n = lengths.numel()
    rest = x.shape[2:]
    out = x.new_full((n * max_len, *rest), fill)
    out = out.index_copy(0, flat_idx, x[0])
    return out.view(n, max_len, *rest)


def padded_to_packed(y: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[N, L_max, *rest]`` -> ``[1, T, *rest]``, dropping the padding."""
    flat_idx, _, _ = pad_index(cu_seqlens)
    n, max_len = y.shape[:2]
    return y.reshape(n * max_len, *y.shape[2:]).index_select(0, flat_idx).unsqueeze(0)


def seq_bounds(cu_seqlens: torch.Tensor | None, batch: int, length: int) -> list[tuple[int, int, int]]:
    """(sequence index, start, end) for each independent sequence: rows of the batch, or documents."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    cs = cu_seqlens.tolist()
    return [(i, cs[i], cs[i + 1]) for i in range(len(cs) - 1)]
