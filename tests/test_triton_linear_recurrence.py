"""Triton linear_recurrence (under TRITON_INTERPRET=1 on the CPU) against the naive loop.

fp32 kernel vs float64 naive oracle: output, final state and the gradient of every input,
as max|diff| / max|ref| <= 1e-4. Small time tiles make short sequences cross tile edges.
The ``gpu`` tests run the compiled kernel in bf16 against fp32 references.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import (TOL, assert_close, check_bf16_kernel, compare_results,  # noqa: E402,F401
                           interpreter_fixture, recurrence_inputs, run_with_grads)
import kernels  # noqa: E402
from kernels.reference.linear_recurrence import naive_linear_recurrence  # noqa: E402

NAMES = ("x", "a", "initial_state")
tk = interpreter_fixture("kernels.triton.linear_recurrence")  # re-imported under the interpreter


def run(fn, inputs: dict, dtype: torch.dtype, seed: int = 1, device="cpu", **kwargs):
    return run_with_grads(lambda leaves: fn(leaves["x"], leaves["a"], initial_state=leaves.get("initial_state"), **kwargs),
                          inputs, NAMES, dtype, seed, device)


def compare(res, ref, tol: float = TOL) -> None:
    compare_results(res, ref, "h", tol)


# (B, T, D, regime, with_init, block_t); block_t None: the default tile (_blocks: 64 rows),
# crossed twice at T = 129
CASES = [
    (2, 1, 8, "unit", True, 16),
    (1, 63, 5, "signed", True, 16),
    (2, 65, 16, "near1", True, 16),
    (1, 129, 8, "near0", False, None),
    (2, 47, 12, "near-1", True, 16),
    (1, 130, 70, "signed", True, 32),
]


@pytest.mark.parametrize("Bsz,T,Dm,regime,with_init,block_t", CASES)
def test_matches_naive(tk, Bsz, T, Dm, regime, with_init, block_t):
    inp = recurrence_inputs(Bsz, T, Dm, regime, n_state=Bsz if with_init else None, seed=T + Dm)
    res = run(tk.linear_recurrence, inp, torch.float32, output_final_state=True, block_t=block_t)
    assert res[0].dtype == torch.float32 and res[1].dtype == torch.float32
    compare(res, run(naive_linear_recurrence, inp, torch.float64, output_final_state=True))


@pytest.mark.parametrize("prefetch", [False, True])
def test_channel_block_override_matches_naive(tk, monkeypatch, prefetch):
    """``block_d`` (the bench's ``bd16`` variants) overrides the channel block: 32 here, where
    ``_blocks`` picks 16, with a partial last block (70 = 2 * 32 + 6)."""
    assert tk._blocks(1, 70, None) == (64, 16) and tk._blocks(1, 70, None, 32) == (64, 32)
    seen = []
    for name in ("_lr_fwd_kernel", "_lr_bwd_kernel"):
        monkeypatch.setattr(tk, name, _Spy(getattr(tk, name), seen))
    inp = recurrence_inputs(1, 130, 70, "signed", n_state=1, seed=9)
    res = run(tk.linear_recurrence, inp, torch.float32, output_final_state=True, block_t=32, block_d=32,
              prefetch=prefetch)
    assert seen == [(32, (1, 3))] * 2  # forward and backward: 32 channels a block, 3 blocks
    compare(res, run(naive_linear_recurrence, inp, torch.float64, output_final_state=True))


class _Spy:
    """A kernel whose launches record (BD, grid) before they run."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((kwargs["BD"], grid))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("with_states", [False, True])
def test_prefetched_tiles_match_naive(tk, with_states):
    """``prefetch`` (each tile's loads one step early; its loop-carried tiles are masked past
    the ends) over packed documents, one shorter than a tile and one crossing several."""
    lengths = [1, 37, 0, 20]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inp = recurrence_inputs(1, sum(lengths), 8, "signed", n_state=len(lengths) if with_states else None, seed=5)
    kw = dict(cu_seqlens=cu, output_final_state=True)
    compare(run(tk.linear_recurrence, inp, torch.float32, block_t=16, prefetch=True, **kw),
            run(naive_linear_recurrence, inp, torch.float64, **kw))


def test_exact_zeros_and_minus_one(tk):
    """Exact zeros cut the history and -1 flips it, across a tile edge."""
    inp = recurrence_inputs(1, 40, 6, "signed", n_state=1, seed=4)
    inp["a"][0, ::7] = 0.0
    inp["a"][0, 3::7] = -1.0
    kw = dict(output_final_state=True)
    compare(run(tk.linear_recurrence, inp, torch.float32, block_t=16, **kw),
            run(naive_linear_recurrence, inp, torch.float64, **kw))


@pytest.mark.parametrize("with_states,regime", [(False, "unit"), (True, "signed")])
def test_packed_documents(tk, with_states, regime):
    lengths = [1, 37, 1, 1, 0, 20, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inp = recurrence_inputs(1, sum(lengths), 8, regime, n_state=len(lengths) if with_states else None, seed=9)
    kw = dict(cu_seqlens=cu, output_final_state=True)
    compare(run(tk.linear_recurrence, inp, torch.float32, block_t=16, **kw),
            run(naive_linear_recurrence, inp, torch.float64, **kw))


def test_public_op_dispatches_without_final_state(tk):
    """backend='triton' reaches the kernel; no final state means no dh_T in the backward."""
    inp = recurrence_inputs(2, 33, 8, "signed", n_state=2, seed=12)

    def op(x, a, **kw):
        return kernels.linear_recurrence(x, a, backend="triton", **kw)

    res = run(op, inp, torch.float32)
    assert res[1] is None
    compare(res, run(naive_linear_recurrence, inp, torch.float64))


def test_bf16_keeps_dtype_and_fp32_state(tk):
    inp = recurrence_inputs(1, 20, 8, "unit", seed=2)
    x, a = inp["x"].to(torch.bfloat16), inp["a"].to(torch.bfloat16)
    h, state = tk.linear_recurrence(x, a, output_final_state=True)
    assert h.dtype == torch.bfloat16 and state.dtype == torch.float32
    h_ref, state_ref = naive_linear_recurrence(x, a, output_final_state=True)
    assert_close(state, state_ref, "bf16 state")
    assert_close(h.float(), h_ref.float(), "bf16 h", tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("cu", [None, [0, 1, 700, 701, 2048]])
def test_gpu_bf16_against_fp32_reference(cu):
    from kernels.reference.linear_recurrence import chunk_linear_recurrence
    from kernels.triton.linear_recurrence import linear_recurrence

    Bsz = 2 if cu is None else 1
    cu_t = torch.tensor(cu, device="cuda") if cu is not None else None
    n = Bsz if cu is None else len(cu) - 1
    inp = recurrence_inputs(Bsz, 2048, 512, "unit", n_state=n, seed=3)
    inp["a"] = inp["a"].sqrt().sqrt()  # long memories, the hard case for bf16
    check_bf16_kernel(run, linear_recurrence, chunk_linear_recurrence, inp, compare,
                      output_final_state=True, cu_seqlens=cu_t, device="cuda")
