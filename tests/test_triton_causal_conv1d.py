"""Triton causal_conv1d (under TRITON_INTERPRET=1 on the CPU) against the naive loop.

fp32 kernel vs float64 naive oracle: output, final conv state and the gradients of x,
weight, bias and initial state, as max|diff| / max|ref| <= 1e-4; widths 1..4, SiLU on and
off, packed documents shorter than the width. ``gpu`` tests: bf16 vs fp32 references.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import (TOL, assert_close, check_bf16_kernel, compare_results,  # noqa: E402,F401
                           interpreter_fixture, run_with_grads)
import kernels  # noqa: E402
from kernels.reference.causal_conv1d import naive_causal_conv1d  # noqa: E402

NAMES = ("x", "weight", "bias", "initial_state")
# the conv kernels call linear_recurrence's jit helpers: both interpreted, dependency first
tk = interpreter_fixture("kernels.triton.linear_recurrence", "kernels.triton.causal_conv1d")


def make_inputs(Bsz, T, Dm, W, *, bias=True, n_state=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inp = dict(x=torch.randn(Bsz, T, Dm, generator=gen, dtype=torch.float64),
               weight=torch.randn(Dm, W, generator=gen, dtype=torch.float64) / W**0.5)
    if bias:
        inp["bias"] = torch.randn(Dm, generator=gen, dtype=torch.float64)
    if n_state is not None:
        inp["initial_state"] = torch.randn(n_state, Dm, W - 1, generator=gen, dtype=torch.float64)
    return inp


def run(fn, inputs: dict, dtype: torch.dtype, seed: int = 1, device="cpu", **kwargs):
    return run_with_grads(lambda leaves: fn(leaves["x"], leaves["weight"], leaves.get("bias"),
                                      initial_state=leaves.get("initial_state"), **kwargs),
                          inputs, NAMES, dtype, seed, device)


def compare(res, ref, tol: float = TOL) -> None:
    compare_results(res, ref, "y", tol)


# (B, T, D, W, silu, bias, with_init)
CASES = [
    (2, 1, 8, 4, True, True, True),
    (1, 2, 5, 4, False, False, True),
    (2, 37, 16, 4, True, True, True),
    (1, 33, 70, 3, True, False, False),
    (2, 19, 8, 2, False, True, True),
    (1, 17, 8, 1, True, True, True),
]


@pytest.mark.parametrize("Bsz,T,Dm,W,silu,bias,with_init", CASES)
def test_matches_naive(tk, Bsz, T, Dm, W, silu, bias, with_init):
    inp = make_inputs(Bsz, T, Dm, W, bias=bias, n_state=Bsz if with_init else None, seed=T + W)
    kw = dict(activation="silu" if silu else None, output_final_state=True)
    res = run(tk.causal_conv1d, inp, torch.float32, block_t=16, **kw)
    assert res[0].dtype == torch.float32 and res[1].dtype == torch.float32
    compare(res, run(naive_causal_conv1d, inp, torch.float64, **kw))


@pytest.mark.parametrize("W,with_states", [(4, True), (4, False), (3, True)])
def test_packed_documents_shorter_than_width(tk, W, with_states):
    """Documents of length 0..3 next to long ones: no tap may cross into a neighbour."""
    lengths = [1, 2, 23, 1, 0, 3, 1, 9, 2]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inp = make_inputs(1, sum(lengths), 8, W, n_state=len(lengths) if with_states else None, seed=W)
    kw = dict(cu_seqlens=cu, activation="silu", output_final_state=True)
    compare(run(tk.causal_conv1d, inp, torch.float32, block_t=16, **kw),
            run(naive_causal_conv1d, inp, torch.float64, **kw))


def test_public_op_dispatches_without_final_state(tk):
    inp = make_inputs(2, 21, 8, 4, n_state=2, seed=12)

    def op(x, w, b, **kw):
        return kernels.causal_conv1d(x, w, b, backend="triton", **kw)

    res = run(op, inp, torch.float32, activation="silu")
    assert res[1] is None
    compare(res, run(naive_causal_conv1d, inp, torch.float64, activation="silu"))


def test_bf16_keeps_dtype_and_fp32_state(tk):
    inp = make_inputs(1, 20, 8, 4, seed=2)
    x, w, b = (inp[k].to(torch.bfloat16) for k in ("x", "weight", "bias"))
    y, state = tk.causal_conv1d(x, w, b, activation="silu", output_final_state=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_ref, state_ref = naive_causal_conv1d(x, w, b, activation="silu", output_final_state=True)
    assert_close(state, state_ref, "bf16 state")
    assert_close(y.float(), y_ref.float(), "bf16 y", tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("cu", [None, [0, 1, 3, 700, 701, 2048]])
def test_gpu_bf16_against_fp32_reference(cu):
    from kernels.reference.causal_conv1d import chunk_causal_conv1d
    from kernels.triton.causal_conv1d import causal_conv1d

    Bsz = 2 if cu is None else 1
    cu_t = torch.tensor(cu, device="cuda") if cu is not None else None
    n = Bsz if cu is None else len(cu) - 1
    inp = make_inputs(Bsz, 2048, 512, 4, n_state=n, seed=3)
    check_bf16_kernel(run, causal_conv1d, chunk_causal_conv1d, inp, compare, activation="silu",
                      output_final_state=True, cu_seqlens=cu_t, device="cuda")
