"""cu_seqlens is read back to the host once per tensor, not once per op: every layer of a packed
forward and its backward share the read (and GatedDeltaProduct's chunk tables), since on a GPU
each read waits for all the work queued before it."""
from __future__ import annotations

import collections

import pytest
import torch

from kernels import varlen
from kernels.varlen import check_cu_seqlens, derived_from_offsets, host_offsets


@pytest.fixture
def reads(monkeypatch):
    """Counts ``tolist`` calls on int tensors (offsets), by tensor id."""
    counts: collections.Counter = collections.Counter()
    real = torch.Tensor.tolist

    def tolist(self):
        if not self.is_floating_point():
            counts[id(self)] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(varlen, "_memo", collections.OrderedDict())
    return counts


def test_offsets_are_read_per_op_unless_known(reads) -> None:
    """A tensor nobody vouches for is read by every op (a caller may refill its buffer in ways
    the version counter misses); within a model forward's scope it is read once."""
    from kernels.varlen import offsets_read_once

    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    for _ in range(2):
        check_cu_seqlens(cu, 10, 1, "op")
    assert reads[id(cu)] == 2
    with offsets_read_once(cu):
        for _ in range(3):
            check_cu_seqlens(cu, 10, 1, "op")
            assert host_offsets(cu) == [0, 3, 7, 10]
        cu[1] = 4  # in place: the version counter moves, so it is read again
        assert host_offsets(cu) == [0, 4, 7, 10]
    assert reads[id(cu)] == 4
    host_offsets(cu)  # the scope is over: read again
    assert reads[id(cu)] == 5
    with torch.inference_mode():  # untracked versions: one read for the scope all the same
        frozen = torch.tensor([0, 5], dtype=torch.int32)
        with offsets_read_once(frozen):
            host_offsets(frozen), host_offsets(frozen)
    assert reads[id(frozen)] == 1


def test_a_buffer_refilled_behind_the_version_counter_is_read_afresh(reads) -> None:
    """A collective or ``.data`` write leaves ``_version`` as it was: outside a forward's scope
    nothing is remembered, so the next forward sees the new values."""
    from kernels.varlen import offsets_read_once

    buf = torch.tensor([0, 1, 8], dtype=torch.int32)
    with offsets_read_once(buf):
        assert host_offsets(buf) == [0, 1, 8]
    version = buf._version
    buf.data[1] = 5
    assert buf._version == version
    with offsets_read_once(buf):
        assert host_offsets(buf) == [0, 5, 8]


def test_checks_still_refuse_bad_offsets(reads) -> None:
    from kernels.varlen import offsets_read_once

    bad = torch.tensor([0, 5, 3, 8])
    with offsets_read_once(bad):
        for _ in range(2):
            with pytest.raises(ValueError, match="non-decreasing"):
                check_cu_seqlens(bad, 8, 1, "op")
    with pytest.raises(ValueError, match="end at T=9"):
        check_cu_seqlens(torch.tensor([0, 3, 8]), 9, 1, "op")
    assert reads[id(bad)] == 1


def test_derived_values_are_made_once_per_known_tensor_and_key_and_entries_are_bounded(reads) -> None:
    from kernels.varlen import offsets_to

    made = []

    def make(cs):
        made.append(list(cs))
        return len(cs)

    cu = offsets_to(torch.tensor([0, 2, 6]), "meta")  # noted: never read back
    assert [derived_from_offsets(cu, ("k", n), make) for n in (1, 1, 2, 2)] == [3, 3, 3, 3]
    assert len(made) == 2
    keep = [offsets_to(torch.tensor([0, i + 1]), "meta") for i in range(varlen.MEMO_ENTRIES)]
    assert len(varlen._memo) == varlen.MEMO_ENTRIES and id(cu) not in varlen._memo  # the oldest went
    assert keep and derived_from_offsets(torch.tensor([0, 2, 6]), ("k", 1), make) == 3  # unknown: made per call
    assert len(made) == 3


def test_offsets_moved_by_the_trainer_are_known_without_a_read_back(reads) -> None:
    """``offsets_to`` notes the host values for the moved tensor (on "meta" a read would fail)."""
    from kernels.varlen import offsets_read_once, offsets_to, upload

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    moved = offsets_to(cu, "meta")
    assert moved.is_meta and host_offsets(moved) == [0, 3, 8]
    check_cu_seqlens(moved, 8, 1, "op")
    with offsets_read_once(moved):  # known already: the scope reads nothing
        assert host_offsets(moved) == [0, 3, 8]
    assert reads[id(cu)] == 1  # the host copy, once
    assert offsets_to(cu, "cpu") is cu and reads[id(cu)] == 2  # already there: noted as it is
    check_cu_seqlens(cu, 8, 1, "op")
    assert reads[id(cu)] == 2
    with torch.inference_mode():
        assert offsets_to(cu, "meta").is_meta  # an inference tensor: moved, not noted
    assert torch.equal(upload(cu, torch.device("cpu")), cu)


@pytest.fixture(scope="module")
def triton_backend():
    pytest.importorskip("triton")
    from kernel_checks import interpreted_module
    from kernels.triton.aot import KERNEL_MODULES

    with interpreted_module(*KERNEL_MODULES), pytest.MonkeyPatch.context() as mp:
        mp.setenv("LINRNN_KERNEL_BACKEND", "triton")
        yield


@pytest.mark.parametrize("family", ["gated_deltaproduct", "mamba2", "griffin"])
def test_a_packed_forward_and_backward_read_the_offsets_once(triton_backend, reads, family) -> None:
    """Two layers, each with several varlen ops (convolutions, the mixer's scan), under
    activation checkpointing (the backward runs every op again): one read in all, the host
    copy's when the trainer moves the batch (``offsets_to``), else once per forward."""
    from kernels.varlen import offsets_to
    from model_families import small_config
    from pretrain.engine import apply_activation_checkpointing
    from pretrain.models.lm import LanguageModel
    from pretrain.models.packing import cu_seqlens_from_lengths

    torch.manual_seed(0)
    cfg = small_config(family, n_layers=2 if family != "griffin" else 3, window=8)  # griffin: R, R, A
    lm = LanguageModel(cfg)
    apply_activation_checkpointing(lm)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    cu = offsets_to(cu_seqlens_from_lengths([[9, 1, 14], [24]], 24), "cpu")  # as the trainer moves a batch
    lm.loss(ids, ids, cu_seqlens=cu).backward()
    assert reads[id(cu)] == 1
    if family == "gated_deltaproduct":  # a caller's own tensor: one read per forward and one per block
        plain = cu_seqlens_from_lengths([[9, 1, 14], [24]], 24)  # recomputed in the backward (whose kernels
        lm.loss(ids, ids, cu_seqlens=plain).backward()  # take the forward's chunk tables)
        assert reads[id(plain)] == 1 + cfg.n_layers
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gated_deltaproduct", "mamba2", "griffin"])
def test_a_packed_step_on_a_gpu_syncs_a_few_times_whatever_the_depth(family, monkeypatch) -> None:
    """CUDA's sync debug mode counts the host waits of one forward and backward of a batch
    moved as the trainer moves it (``offsets_to``): none per layer, and none to read the
    offsets or to upload GatedDeltaProduct's chunk tables (page-locked, non-blocking)."""
    import warnings

    from kernels.varlen import offsets_to
    from model_families import small_config
    from pretrain.models.lm import LanguageModel
    from pretrain.models.packing import cu_seqlens_from_lengths

    monkeypatch.setenv("LINRNN_KERNEL_BACKEND", "triton")
    torch.manual_seed(0)
    syncs = {}
    for layers in (2, 6):
        lm = LanguageModel(small_config(family, n_layers=layers, d_model=64, window=16)).cuda()
        ids = torch.randint(0, lm.config.vocab_size, (4, 256), device="cuda")
        for attempt in range(2):  # the first compiles (and may sync while loading kernels)
            cu = offsets_to(cu_seqlens_from_lengths([[100, 156], [256], [1, 255], [128, 128]], 256), "cuda")
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    lm.loss(ids, ids, cu_seqlens=cu).backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        syncs[layers] = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs[6]) == len(syncs[2]) <= 1, syncs


@pytest.fixture
def host_waits(monkeypatch):
    """Counts the calls that wait for a GPU's queue when their tensors are on one (reads to the
    host, data-dependent sizes, a Python scalar uploaded by an indexed assignment), made outside
    Triton's interpreter (which copies every kernel argument): ``(name, file:line)`` each."""
    import sys
    from pathlib import Path

    import triton

    triton_dir = str(Path(triton.__file__).parent)
    calls: list[tuple[str, str]] = []

    def where() -> str | None:
        frame, site = sys._getframe(2), None
        while frame is not None:
            if frame.f_code.co_filename.startswith(triton_dir):
                return None
            site = site or f"{frame.f_code.co_filename}:{frame.f_lineno}"
            frame = frame.f_back
        return site

    def count(owner, name, syncs=lambda *a, **k: True):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if syncs(*args, **kwargs) and (site := where()) is not None:
                calls.append((name, site))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def has_tensor(index, kinds=None) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and (kinds is None or i.dtype in kinds) for i in items)

    masks = (torch.bool, torch.uint8)
    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "unique", "masked_select",
                 "__bool__", "__int__", "__float__", "__index__"):
        count(torch.Tensor, name)
    for name in ("nonzero", "unique", "masked_select"):
        count(torch, name)

    def sized_late(t, repeats, *args, output_size=None, **kwargs) -> bool:  # its size read back
        return isinstance(repeats, torch.Tensor) and output_size is None

    count(torch, "repeat_interleave", sized_late)
    count(torch.Tensor, "repeat_interleave", sized_late)
    count(torch.Tensor, "__getitem__", lambda t, index: has_tensor(index, masks))  # nonzero
    # A Python scalar into tensor-indexed places is uploaded from pageable memory (blocking).
    count(torch.Tensor, "__setitem__", lambda t, index, value: has_tensor(index, masks)
          or (has_tensor(index) and not isinstance(value, torch.Tensor)))
    return calls


def test_a_packed_griffin_step_waits_for_the_gpu_no_more_with_depth(triton_backend, host_waits) -> None:
    """The CPU twin of the GPU test above (which counts CUDA's sync warnings): the calls that
    would wait for the GPU in one forward and backward, at 2 layers (R, R) and at 4 (R, R,
    A, R), so that every recurrent and attention layer's ops are counted."""
    from kernels.varlen import offsets_to
    from model_families import small_config
    from pretrain.models.lm import LanguageModel
    from pretrain.models.packing import cu_seqlens_from_lengths

    torch.manual_seed(0)
    seen = {}
    for layers in (2, 4):
        lm = LanguageModel(small_config("griffin", n_layers=layers, window=8))
        ids = torch.randint(0, lm.config.vocab_size, (2, 24))
        cu = offsets_to(cu_seqlens_from_lengths([[9, 1, 14], [24]], 24), "cpu")
        host_waits.clear()
        lm.loss(ids, ids, cu_seqlens=cu).backward()
        seen[layers] = list(host_waits)
    assert len(seen[4]) == len(seen[2]) <= 1, seen
