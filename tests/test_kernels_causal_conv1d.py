"""Vectorised causal conv (fp32) against the token-by-token window (float64 oracle).

Compared: output, final state (the last W-1 inputs) and the gradient of every input.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernel_checks import TOL, assert_close, compare_results, run_with_grads  # noqa: F401
from kernels.reference.causal_conv1d import chunk_causal_conv1d, naive_causal_conv1d

NAMES = ("x", "weight", "bias", "initial_state")


def make_inputs(Bsz, T, Dm, W, *, with_bias=True, n_state=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inp = dict(x=torch.randn(Bsz, T, Dm, generator=gen, dtype=torch.float64),
               weight=torch.randn(Dm, W, generator=gen, dtype=torch.float64))
    if with_bias:
        inp["bias"] = torch.randn(Dm, generator=gen, dtype=torch.float64)
    if n_state is not None:
        inp["initial_state"] = torch.randn(n_state, Dm, W - 1, generator=gen, dtype=torch.float64)
    return inp


def run(fn, inputs: dict, dtype: torch.dtype, seed: int = 1, **kwargs):
    return run_with_grads(lambda leaves: fn(leaves["x"], leaves["weight"], leaves.get("bias"),
                                      initial_state=leaves.get("initial_state"), **kwargs),
                          inputs, NAMES, dtype, seed)


def compare(res, ref) -> None:
    compare_results(res, ref, "y", same_state_presence=False)


# (T, D, W, activation, with_bias, with_init): T=1, 2 are shorter than the conv state
CASES = [
    (1, 8, 4, "silu", True, True),
    (1, 4, 1, None, False, True),
    (2, 6, 4, None, True, True),
    (2, 8, 3, "silu", False, False),
    (63, 8, 2, "silu", True, True),
    (63, 5, 4, None, True, False),
    (65, 8, 3, None, False, True),
    (65, 4, 1, "silu", True, False),
    (200, 16, 4, "silu", True, True),
    (200, 8, 2, None, True, False),
]


@pytest.mark.parametrize("T,Dm,W,activation,with_bias,with_init", CASES)
def test_vectorised_matches_naive(T, Dm, W, activation, with_bias, with_init):
    inp = make_inputs(2, T, Dm, W, with_bias=with_bias, n_state=2 if with_init else None, seed=T * W)
    kw = dict(activation=activation, output_final_state=True)
    ref = run(naive_causal_conv1d, inp, torch.float64, **kw)
    res = run(chunk_causal_conv1d, inp, torch.float32, **kw)
    assert res[0].dtype == torch.float32 and res[1].dtype == torch.float32
    assert res[1].shape == (2, Dm, W - 1)
    compare(res, ref)


def test_final_state_is_last_inputs():
    """The state is literally the last W-1 inputs, reaching into the initial state when short."""
    x = torch.arange(1.0, 3.0).reshape(1, 2, 1)  # inputs 1, 2
    h0 = torch.tensor([[[-3.0, -2.0, -1.0]]])
    _, state = chunk_causal_conv1d(x, torch.ones(1, 4), initial_state=h0, output_final_state=True)
    assert state.tolist() == [[[-1.0, 1.0, 2.0]]]


@pytest.mark.parametrize("W,with_init,activation", [(4, True, "silu"), (3, False, None), (2, True, None),
                                                    (1, False, "silu")])
def test_packed_documents_equal_separate_runs(W, with_init, activation):
    lengths = [1, 2, 0, 40, 1, 3, 60, 1]  # several shorter than the width
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    n = len(lengths)
    inp = make_inputs(1, sum(lengths), 8, W, n_state=n if with_init else None, seed=W)
    kw = dict(activation=activation, output_final_state=True)
    res = run(chunk_causal_conv1d, inp, torch.float32, cu_seqlens=cu, **kw)

    def separate(x, weight, bias=None, *, initial_state=None, **kwargs):
        ys, states = [], []
        for i in range(n):
            s, e = int(cu[i]), int(cu[i + 1])
            h0 = initial_state[i:i + 1] if initial_state is not None else None
            y, st = naive_causal_conv1d(x[:, s:e], weight, bias, initial_state=h0, **kwargs)
            ys.append(y)
            states.append(st)
        return torch.cat(ys, dim=1), torch.cat(states)

    compare(res, run(separate, inp, torch.float64, **kw))
    compare(res, run(naive_causal_conv1d, inp, torch.float64, cu_seqlens=cu, **kw))


def test_public_op_uses_vectorised_torch_path():
    inp = make_inputs(2, 65, 8, 4, n_state=2, seed=13)

    def op(x, weight, bias=None, **kw):
        return kernels.causal_conv1d(x, weight, bias, backend="torch", **kw)

    kw = dict(activation="silu", output_final_state=True)
    compare(run(op, inp, torch.float32, **kw), run(naive_causal_conv1d, inp, torch.float64, **kw))


def test_low_precision_inputs_keep_dtype_and_fp32_state():
    inp = make_inputs(2, 30, 8, 4, seed=3)
    args = [inp[k].to(torch.bfloat16) for k in ("x", "weight", "bias")]
    y, state = chunk_causal_conv1d(*args, activation="silu", output_final_state=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_ref, _ = naive_causal_conv1d(*args, activation="silu")
    assert_close(y.float(), y_ref.float(), "bf16 y", tol=2e-2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=torch.zeros(4, 5)), "weight"),
    (dict(weight=torch.zeros(3, 4)), "weight"),
    (dict(bias=torch.zeros(3)), "bias"),
    (dict(initial_state=torch.zeros(2, 4, 2)), "initial_state"),
    (dict(activation="gelu"), "activation"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(x=torch.zeros(2, 5, 4), weight=torch.zeros(4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.causal_conv1d(args.pop("x"), args.pop("weight"), backend="torch", **args)
