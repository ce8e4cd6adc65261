"""Chunked scan (fp32) against the naive loop (float64 oracle) for h_t = a_t h_{t-1} + x_t.

Compared: output, final state and the gradient of every input, as max|diff| / max|ref|.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernel_checks import TOL, assert_close, compare_results, recurrence_inputs, run_with_grads  # noqa: F401
from kernels.reference.linear_recurrence import chunk_linear_recurrence, naive_linear_recurrence

NAMES = ("x", "a", "initial_state")


def run(fn, inputs: dict, dtype: torch.dtype, seed: int = 1, **kwargs):
    return run_with_grads(lambda leaves: fn(leaves["x"], leaves["a"], initial_state=leaves.get("initial_state"), **kwargs),
                          inputs, NAMES, dtype, seed)


def compare(res, ref) -> None:
    compare_results(res, ref, "h", same_state_presence=False)


# (T, D, regime, with_init, chunk_size): chunk 4 at T=200 recurses three levels deep
CASES = [
    (1, 8, "unit", True, 64),
    (1, 3, "signed", False, 64),
    (63, 16, "near1", True, 64),
    (63, 5, "signed", True, 8),
    (65, 8, "near0", False, 64),
    (65, 16, "signed", True, 64),
    (200, 8, "unit", False, 16),
    (200, 4, "near1", True, 4),
    (200, 12, "signed", True, 64),
]


@pytest.mark.parametrize("T,Dm,regime,with_init,chunk", CASES)
def test_chunk_matches_naive(T, Dm, regime, with_init, chunk):
    inp = recurrence_inputs(2, T, Dm, regime, n_state=2 if with_init else None, seed=T + Dm)
    ref = run(naive_linear_recurrence, inp, torch.float64, output_final_state=True)
    res = run(chunk_linear_recurrence, inp, torch.float32, output_final_state=True, chunk_size=chunk)
    assert res[0].dtype == torch.float32 and res[1].dtype == torch.float32
    compare(res, ref)


def test_exact_zeros_and_minus_one_match_fp32_loop():
    """Same fp32 inputs to both forms: exact zeros cut the history, -1 flips its sign."""
    inp = recurrence_inputs(1, 130, 6, "signed", n_state=1, seed=4)
    inp["a"][0, ::7] = 0.0
    inp["a"][0, 3::7] = -1.0
    kw = dict(output_final_state=True)
    compare(run(chunk_linear_recurrence, inp, torch.float32, chunk_size=16, **kw),
            run(naive_linear_recurrence, inp, torch.float32, **kw))


@pytest.mark.parametrize("with_states,regime", [(False, "unit"), (True, "signed"), (True, "near1")])
def test_packed_documents_equal_separate_runs(with_states, regime):
    lengths = [1, 37, 1, 1, 0, 90, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    n = len(lengths)
    inp = recurrence_inputs(1, sum(lengths), 8, regime, n_state=n if with_states else None, seed=9)
    res = run(chunk_linear_recurrence, inp, torch.float32, cu_seqlens=cu, chunk_size=16,
              output_final_state=True)

    def separate(x, a, *, initial_state=None):
        hs, states = [], []
        for i in range(n):
            s, e = int(cu[i]), int(cu[i + 1])
            h0 = initial_state[i:i + 1] if initial_state is not None else None
            h, st = naive_linear_recurrence(x[:, s:e], a[:, s:e], initial_state=h0, output_final_state=True)
            hs.append(h)
            states.append(st)
        return torch.cat(hs, dim=1), torch.cat(states)

    compare(res, run(separate, inp, torch.float64))
    compare(res, run(naive_linear_recurrence, inp, torch.float64, cu_seqlens=cu, output_final_state=True))


def test_public_op_uses_chunked_torch_path():
    inp = recurrence_inputs(2, 65, 8, "signed", n_state=2, seed=12)

    def op(x, a, **kw):
        return kernels.linear_recurrence(x, a, backend="torch", **kw)

    compare(run(op, inp, torch.float32, output_final_state=True),
            run(naive_linear_recurrence, inp, torch.float64, output_final_state=True))


def test_low_precision_inputs_keep_dtype_and_fp32_state():
    inp = recurrence_inputs(2, 50, 8, "unit", seed=2)
    x, a = inp["x"].to(torch.bfloat16), inp["a"].to(torch.bfloat16)
    h, state = chunk_linear_recurrence(x, a, output_final_state=True)
    assert h.dtype == torch.bfloat16 and state.dtype == torch.float32
    h_ref, state_ref = naive_linear_recurrence(x, a, output_final_state=True)
    assert_close(h.float(), h_ref.float(), "bf16 h", tol=2e-2)
    assert_close(state, state_ref, "bf16 state")


@pytest.mark.parametrize("kwargs,match", [
    (dict(a=torch.zeros(2, 5, 3)), "x and a"),
    (dict(initial_state=torch.zeros(3, 4)), "initial_state"),
    (dict(initial_state=torch.zeros(2, 4), cu_seqlens=torch.tensor([0, 5])), "batch size 1"),
])
def test_bad_shapes_name_the_argument(kwargs, match):
    args = dict(x=torch.zeros(2, 5, 4), a=torch.zeros(2, 5, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.linear_recurrence(args.pop("x"), args.pop("a"), backend="torch", **args)
