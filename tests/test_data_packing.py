"""Packing, labels and collate: exact boundaries at sequence edges (no I/O)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.packing import (
    IGNORE_INDEX,
    Packer,
    collate_packed,
    example_from_sample,
    labels_for,
    row_cu_seqlens,
    token_dtype,
)
from data.prepare import validation_mask

EOS = 2


def _docs(lengths, start=10):
    """Documents with distinct ids ending in EOS: doc i = [start+i]*(len-1) + [EOS]."""
    return [np.array([start + i] * (n - 1) + [EOS], dtype=np.uint32) for i, n in enumerate(lengths)]


def _pack(docs, T, batches=1):
    p = Packer(T, np.uint16)
    out = []
    for chunk in np.array_split(np.arange(len(docs)), batches):
        if len(chunk) == 0:
            continue
        sel = [docs[i] for i in chunk]
        out += [(t.copy(), cu.copy()) for t, cu in p.add(np.concatenate(sel), np.array([len(d) for d in sel]))]
    return p, out


def test_boundaries_at_sequence_edges():
    T = 8
    # doc0 ends exactly at the first edge; doc1 spans three sequences; doc2/3 are length 1.
    docs = _docs([8, 19, 1, 1, 3])
    p, seqs = _pack(docs, T)
    stream = np.concatenate(docs)
    assert len(seqs) == len(stream) // T and p.dropped_tokens == len(stream) % T
    assert np.array_equal(np.concatenate([t for t, _ in seqs]), stream[: len(seqs) * T])
    assert [cu.tolist() for _, cu in seqs] == [[0, 8], [0, 8], [0, 8], [0, 3, 4, 5, 8]]
    for t, cu in seqs:
        assert cu.dtype == np.int32 and t.dtype == np.uint16


def test_boundaries_independent_of_batching():
    rng = np.random.default_rng(0)
    docs = _docs(rng.integers(1, 40, size=200).tolist())
    _, one = _pack(docs, 16, batches=1)
    _, many = _pack(docs, 16, batches=23)
    assert len(one) == len(many)
    for (a, ca), (b, cb) in zip(one, many):
        assert np.array_equal(a, b) and np.array_equal(ca, cb)
    # every interior boundary sits right after an EOS, and every EOS not at an edge is a boundary
    for t, cu in one:
        eos_ends = {i + 1 for i in np.flatnonzero(t == EOS)}
        assert set(cu[1:-1].tolist()) == eos_ends - {16}


def test_labels_never_cross_a_segment():
    tokens = np.array([5, 6, EOS, 7, EOS, 8, 9, 10], dtype=np.uint16)
    cu = np.array([0, 3, 5, 8], dtype=np.int32)
    labels = labels_for(tokens, cu)
    assert labels.tolist() == [6, EOS, IGNORE_INDEX, EOS, IGNORE_INDEX, 9, 10, IGNORE_INDEX]
    ex = example_from_sample({"tokens": tokens, "cu_seqlens": cu})
    assert ex["input_ids"].dtype == np.int64 and ex["input_ids"].tolist() == tokens.tolist()


def test_collate_builds_global_offsets():
    T = 8
    exs = [example_from_sample({"tokens": np.arange(T, dtype=np.uint16), "cu_seqlens": np.array(cu, np.int32)})
           for cu in ([0, 8], [0, 3, 8], [0, 1, 2, 8])]
    batch = collate_packed(exs)
    assert batch["input_ids"].shape == (3, T) and batch["labels"].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 8, 11, 16, 17, 18, 24]
    rows = row_cu_seqlens(batch["cu_seqlens"], 3, T)
    assert [c.tolist() for c in rows] == [[0, 8], [0, 3, 8], [0, 1, 2, 8]]
    # flattened labels are -100 exactly before every global boundary
    flat = batch["labels"].view(-1)
    ends = batch["cu_seqlens"][1:].long() - 1
    assert (flat[ends] == IGNORE_INDEX).all()
    assert (flat == IGNORE_INDEX).sum() == len(ends)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_validation_mask_is_stable_and_sized(fraction):
    idx = np.arange(20000)
    m = validation_mask(idx, fraction, seed=3)
    assert np.array_equal(m[5000:6000], validation_mask(idx[5000:6000], fraction, seed=3))
    assert abs(m.mean() - fraction) < 0.02
    if fraction:
        assert not np.array_equal(m, validation_mask(idx, fraction, seed=4))
