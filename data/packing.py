"""Packing documents into fixed-length sequences, and the label / boundary conventions.

Layout. Documents (each ending in EOS, optionally starting with BOS) are concatenated in
corpus order and cut every ``seq_len`` tokens; a document may continue in the next
sequence. The tail that does not fill a last sequence is dropped (counted in the
manifest). Beside each sequence we store its document boundaries as ``cu_seqlens``
(int32 offsets ``[0, ..., seq_len]``): one segment per document piece in the sequence.
A piece of a document cut by a sequence edge is its own segment, because the model's
recurrent state starts from zero at every sequence and every segment.

Labels. ``labels[t] = input_ids[t + 1]`` inside a segment, and -100 (ignored) at the last
position of every segment: at a document's EOS the next token belongs to another document
(the state is reset there, so it is not predictable), and at a sequence's last position
the next token is in another sample. So the model learns to predict EOS, and never
predicts across a boundary.

Batches. The models take packed input: ``[1, B*T]`` tokens with global ``cu_seqlens``
over the flattened batch; ``collate_packed`` builds those offsets (int32) together with
``input_ids``/``labels`` of shape ``[B, T]`` (flatten with ``.view(1, -1)``);
``row_cu_seqlens`` gives each row's own offsets back.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

IGNORE_INDEX = -100


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (halves shard size for vocabularies < 65536)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class Packer:
    """Streams documents into ``(tokens[seq_len], cu_seqlens)`` sequences.

    ``add`` takes a batch of documents as one flat id array plus per-document lengths, the
    form tokenizer workers return, and is vectorised over the batch.
    """

    def __init__(self, seq_len: int, dtype: np.dtype) -> None:
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self._carry = np.zeros(0, dtype=self.dtype)
        self._carry_ends = np.zeros(0, dtype=np.int64)  # document ends inside the carry
        self.documents = 0
        self.document_tokens = 0
        self.sequences = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if len(lengths) == 0:
            return
        self.documents += len(lengths)
        self.document_tokens += int(lengths.sum())
        T = self.seq_len
        tokens = np.concatenate([self._carry, flat.astype(self.dtype, copy=False)])
        ends = np.concatenate([self._carry_ends, len(self._carry) + np.cumsum(lengths)])
        n_full = len(tokens) // T
        if n_full:
            starts = np.arange(n_full, dtype=np.int64) * T
            lo = np.searchsorted(ends, starts, side="right")  # first end strictly inside
            hi = np.searchsorted(ends, starts + T, side="left")  # ends before the edge
            for i in range(n_full):
                inner = ends[lo[i]:hi[i]] - starts[i]
                cu = np.empty(len(inner) + 2, dtype=np.int32)
                cu[0], cu[-1] = 0, T
                cu[1:-1] = inner
                self.sequences += 1
                yield tokens[starts[i]:starts[i] + T], cu
        cut = n_full * T
        self._carry = tokens[cut:].copy()
        self._carry_ends = ends[ends > cut] - cut

    @property
    def dropped_tokens(self) -> int:
        """Tokens waiting for a next sequence: dropped if no more documents come."""
        return len(self._carry)


def labels_for(tokens: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """Next-token labels with -100 at the last position of each segment (see module doc)."""
    labels = np.empty(len(tokens), dtype=np.int64)
    labels[:-1] = tokens[1:]
    labels[np.asarray(cu_seqlens[1:], dtype=np.int64) - 1] = IGNORE_INDEX
    return labels


def example_from_sample(sample: dict) -> dict[str, np.ndarray]:
    """A stored MDS sample -> ``input_ids``, ``labels`` (int64) and ``cu_seqlens`` (int32)."""
    tokens = sample["tokens"]
    cu = np.array(sample["cu_seqlens"], dtype=np.int32)  # copy: MDS hands out read-only views
    return {"input_ids": tokens.astype(np.int64), "labels": labels_for(tokens, cu), "cu_seqlens": cu}


def collate_packed(examples: Sequence[dict[str, np.ndarray]]) -> dict:
    """Stack examples; ``cu_seqlens`` becomes global offsets over the flattened ``B*T`` batch.

    Every row edge ``i*T`` is one of the offsets, so ``row_cu_seqlens`` recovers each row's
    own offsets. Three tensors per batch keep the worker -> trainer transfer cheap.
    """
    import torch  # lazily: prepare's tokenizer workers import this module without needing torch

    input_ids = torch.from_numpy(np.stack([e["input_ids"] for e in examples]))
    labels = torch.from_numpy(np.stack([e["labels"] for e in examples]))
    T = input_ids.shape[1]
    parts = [e["cu_seqlens"][:-1].astype(np.int64) + i * T for i, e in enumerate(examples)]
    parts.append(np.array([len(examples) * T], dtype=np.int64))
    cu = torch.from_numpy(np.concatenate(parts).astype(np.int32))
    return {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu}


def row_cu_seqlens(cu_seqlens, batch: int, seq_len: int) -> list:
    """Global offsets over ``[B*T]`` -> each row's offsets ``[0, ..., T]`` (int32 tensors)."""
    import torch

    cu = cu_seqlens.long()
    out = []
    for i in range(batch):
        lo, hi = i * seq_len, (i + 1) * seq_len
        sel = cu[(cu >= lo) & (cu <= hi)] - lo
        out.append(sel.to(torch.int32))
    return out
