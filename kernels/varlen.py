"""Packed-document helpers shared by the ops: host copies of the offsets (read once per
batch, see ``offsets_to``) and the chunked reference ops' padding.

A packed batch is ``[1, T, ...]`` with ``cu_seqlens`` offsets ``[N+1]``. The chunked forms
scatter it into a right-padded ``[N, L_max, ...]`` batch, run the batched algorithm, and
gather back. Right padding is harmless when the padded steps are identity transitions
(zero input, unit decay), which every caller arranges by choosing the pad values.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

MEMO_ENTRIES = 8  # offsets tensors remembered at once (micro-batches in flight, e.g. under a pipeline)


class _Offsets:
    """One offsets tensor's values on the host, and what ops derived from them."""

    def __init__(self, t: torch.Tensor, values: list[int] | None = None) -> None:
        self.ref, self.version, self.ptr = weakref.ref(t), _version(t), t.data_ptr()
        self.values: list[int] = t.tolist() if values is None else values
        self.nondecreasing = all(b >= a for a, b in zip(self.values, self.values[1:]))
        self.derived: dict[Hashable, Any] = {}

    def matches(self, t: torch.Tensor) -> bool:
        return self.ref() is t and self.version == _version(t) and self.ptr == t.data_ptr()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: its version is not tracked
        return None


# Reading a CUDA tensor on the host waits for all the work queued before it; reading the
# offsets in every op drained the GPU's queue about ten times per layer and step. So the ops
# take the host values from one of two places, and read the tensor themselves otherwise:
# - tensors made by ``offsets_to`` (the trainer's batches): new tensors that nothing writes,
#   their values taken from the host copy they were made from; kept until evicted;
# - the tensor of a model forward in progress (``offsets_read_once``), read once at its start
#   and forgotten at its end (a caller may refill its buffer for the next batch in ways the
#   version counter does not see, e.g. a collective writing into it).
_memo: OrderedDict[int, _Offsets] = OrderedDict()
_memo_lock = threading.Lock()
_scoped: contextvars.ContextVar[tuple[_Offsets, ...]] = contextvars.ContextVar("linrnn_offsets", default=())


def _known(cu_seqlens: torch.Tensor) -> _Offsets | None:
    for entry in reversed(_scoped.get()):
        if entry.matches(cu_seqlens):
            return entry
    with _memo_lock:
        entry = _memo.get(id(cu_seqlens))
        if entry is not None and entry.matches(cu_seqlens):
            _memo.move_to_end(id(cu_seqlens))
            return entry
    return None


def _offsets(cu_seqlens: torch.Tensor) -> _Offsets:
    """The known entry of ``cu_seqlens``, else a fresh read (not remembered)."""
    return _known(cu_seqlens) or _Offsets(cu_seqlens)


def offsets_to(cu_seqlens: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch's ``cu_seqlens`` (on the host) on ``device``, moved without blocking, its values
    noted for the ops so that none reads them back from the GPU (the trainer's batches).
    The returned tensor (``cu_seqlens`` itself when already there) must not be written after."""
    moved = cu_seqlens.to(device, non_blocking=True)
    if _version(moved) is not None:
        entry = _Offsets(moved, cu_seqlens.tolist())
        with _memo_lock:
            _memo[id(moved)] = entry
            _memo.move_to_end(id(moved))
            while len(_memo) > MEMO_ENTRIES:
                _memo.popitem(last=False)
    return moved


@contextlib.contextmanager
def offsets_read_once(cu_seqlens: torch.Tensor | None) -> Iterator[None]:
    """While a model's forward runs: its ops share one host read of ``cu_seqlens`` (none when
    ``offsets_to`` made it), and what they derive from it."""
    if cu_seqlens is None or _known(cu_seqlens) is not None:
        yield
        return
    token = _scoped.set((*_scoped.get(), _Offsets(cu_seqlens)))
    try:
        yield
    finally:
        _scoped.reset(token)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on ``device``: from page-locked memory without blocking on a GPU
    (a copy from pageable memory first waits for the GPU's queue to drain)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens.tolist()``, from the known values where there are some; do not modify it."""
    return _offsets(cu_seqlens).values


def derived_from_offsets(cu_seqlens: torch.Tensor, key: Hashable, make: Callable[[list[int]], Any]) -> Any:
    """``make(offsets)`` (e.g. an op's chunk tables on a device), made once per known offsets
    tensor and ``key`` and shared by every layer and the backward; per call otherwise."""
    entry = _offsets(cu_seqlens)
    if key not in entry.derived:
        entry.derived[key] = make(entry.values)
    return entry.derived[key]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, batch: int, op: str) -> None:
    if batch != 1:
        raise ValueError(f"{op}: cu_seqlens needs batch size 1 (packed documents), got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with at least 2 entries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    entry = _offsets(cu_seqlens)
    cs = entry.values
    if cs[0] != 0 or cs[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at T={total}, got {cs[0]}..{cs[-1]}")
    if not entry.nondecreasing:
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
    cs = host_offsets(cu_seqlens)
    return [(i, cs[i], cs[i + 1]) for i in range(len(cs) - 1)]
