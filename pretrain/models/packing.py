"""Packed-document offsets for the LM: ``cu_seqlens`` over the flattened ``B*T`` tokens.

The data pipeline stores, per fixed-length row, where its documents start (or how long
they are); these helpers turn either into the offsets the mixers take, always including
every row boundary so that no state flows from one row into the next.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.varlen import host_offsets

Rows = Sequence[Sequence[int]] | torch.Tensor


def _rows(values: Rows) -> list[list[int]]:
    """Nested ints; a 2-D tensor may be right-padded with negative values."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 2:
            raise ValueError(f"expected a 2-D tensor [B, max_docs], got {list(values.shape)}")
        return [[int(v) for v in row if v >= 0] for row in values.tolist()]
    return [[int(v) for v in row] for row in values]


def cu_seqlens_from_lengths(lengths: Rows, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-row document lengths (each row summing to ``seq_len``) -> int32 offsets."""
    offsets = [0]
    for b, row in enumerate(_rows(lengths)):
        if any(n <= 0 for n in row) or sum(row) != seq_len:
            raise ValueError(f"row {b}: document lengths {row} must be positive and sum to seq_len={seq_len}")
        for n in row:
            offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def cu_seqlens_from_starts(starts: Rows, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-row document start offsets inside the row -> int32 offsets.

    0 may be omitted and ``seq_len`` (an end marker) is ignored; duplicates collapse.
    """
    offsets: list[int] = []
    rows = _rows(starts)
    for b, row in enumerate(rows):
        cuts = sorted(set(row) | {0})
        if cuts[0] < 0 or cuts[-1] > seq_len:
            raise ValueError(f"row {b}: document starts {row} must lie in [0, seq_len={seq_len}]")
        offsets.extend(b * seq_len + c for c in cuts if c < seq_len)
    offsets.append(len(rows) * seq_len)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def check_row_boundaries(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """Raise unless ``cu_seqlens`` spans ``batch*seq_len`` tokens and contains every row boundary."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of at least 2 offsets")
    cs = host_offsets(cu_seqlens)  # read once per batch, shared with the kernels (no extra sync)
    if cs[-1] != batch * seq_len or not set(range(0, batch * seq_len + 1, seq_len)) <= set(cs):
        raise ValueError(
            f"cu_seqlens must end at B*T={batch * seq_len} and contain every row boundary "
            f"(multiples of T={seq_len}); build it with cu_seqlens_from_lengths/_from_starts"
        )
