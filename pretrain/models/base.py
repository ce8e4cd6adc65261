"""The contract every sequence mixer follows, so blocks, the LM and decoding stay generic.

Shapes: ``x`` is ``[B, T, d_model]``. With ``cu_seqlens`` (int32/int64 ``[N+1]``, offsets of
packed documents) the batch is flattened first: ``B == 1`` and ``T`` covers all documents;
state restarts at every document start and no information crosses a boundary.

Decoding: ``init_cache`` returns a dict of tensors for ``batch_size`` sequences. Passing it
to ``forward`` (without ``cu_seqlens``) continues from its state and writes the final state
back into it (prefill); ``step`` advances one token and updates it in place. ``step`` must
equal the parallel forward token by token.
"""
from __future__ import annotations

from typing import Protocol

import torch

MixerCache = dict[str, torch.Tensor]


class Mixer(Protocol):
    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: MixerCache | None = None,
    ) -> torch.Tensor: ...

    def init_cache(
        self, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> MixerCache: ...

    def step(self, x: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        """One token: ``x`` is ``[B, d_model]``; returns ``[B, d_model]``."""
        ...

    def activation_bytes_per_token(self, elem: int, seq_len: int) -> float:
        """Bytes per token ``forward`` keeps for backward, input included (the memory plan;
        ``tests/test_memory_activations.py`` checks it against autograd)."""
        ...


def check_cache_or_packed(mixer: str, cache: MixerCache | None, cu_seqlens: torch.Tensor | None) -> None:
    """A cache continues one stream per row; packed documents restart state inside a row:
    the two cannot be combined in one call."""
    if cache is not None and cu_seqlens is not None:
        raise ValueError(f"{mixer}: pass either cache (decoding) or cu_seqlens (packed training), not both")
