"""Chunked SSD (fp32) against the naive per-token recurrence (float64 oracle).

Compared: output, final state and the gradient of every input, as max|diff| / max|ref|.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernel_checks import TOL, assert_close, compare_results, run_with_grads  # noqa: F401
from kernels.reference.ssd import chunk_ssd, decay, naive_ssd

NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def log_decays(shape, regime: str, neg: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-step log(exp(dt A)) targets; 'extreme' mixes a_t near 0, near 1 (and near -1)."""
    mixed = -0.01 - 2.0 * torch.rand(shape, generator=gen, dtype=torch.float64)
    if regime == "mixed":
        return mixed
    if regime == "flip":  # a_t = 2 exp(-25) - 1, i.e. -1 to fp32 precision
        return torch.full(shape, -25.0, dtype=torch.float64)
    near0 = (-math.log(2) + 1e-4 * torch.randn(shape, generator=gen, dtype=torch.float64)
             if neg else torch.full(shape, -30.0, dtype=torch.float64))
    near1 = -1e-4 * torch.rand(shape, generator=gen, dtype=torch.float64)
    choices = [mixed, near0, near1] + ([torch.full(shape, -25.0, dtype=torch.float64)] if neg else [])
    pick = torch.randint(len(choices), shape, generator=gen)
    return torch.stack(choices).gather(0, pick[None])[0]


def make_inputs(Bsz, T, H, P, G, N, *, neg, regime="mixed", with_D=True, n_state=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = -(0.5 + 1.5 * torch.rand(H, generator=gen, dtype=torch.float64))
    dt = log_decays((Bsz, T, H), regime, neg, gen) / A  # dt > 0, dt A hits the target
    inp = dict(
        x=torch.randn(Bsz, T, H, P, generator=gen, dtype=torch.float64),
        dt=dt, A=A,
        B=torch.randn(Bsz, T, G, N, generator=gen, dtype=torch.float64) * N**-0.5,
        C=torch.randn(Bsz, T, G, N, generator=gen, dtype=torch.float64) * N**-0.5,
        D=torch.randn(H, generator=gen, dtype=torch.float64) if with_D else None,
    )
    if n_state is not None:
        inp["initial_state"] = torch.randn(n_state, H, P, N, generator=gen, dtype=torch.float64)
    return inp


def run(fn, inputs: dict, dtype: torch.dtype, seed: int = 1, **kwargs):
    """Output, final state and gradients of a fixed random projection of both."""
    return run_with_grads(lambda leaves: fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                                      D=leaves.get("D"), initial_state=leaves.get("initial_state"),
                                      **kwargs),
                          inputs, NAMES, dtype, seed)


def compare(res, ref) -> None:
    compare_results(res, ref, "y", same_state_presence=False)


# (T, H, G, P, N, neg, regime, with_D, with_init, chunk_size): a spread, not a full product
CASES = [
    (1, 2, 1, 4, 8, False, "mixed", True, True, 64),
    (1, 4, 2, 8, 4, True, "extreme", False, False, 64),
    (63, 2, 2, 4, 8, False, "extreme", False, True, 64),
    (63, 4, 1, 8, 4, True, "mixed", True, True, 16),
    (65, 4, 2, 4, 8, True, "extreme", False, True, 64),
    (65, 2, 1, 8, 8, False, "mixed", True, False, 64),
    (200, 4, 2, 4, 4, True, "flip", True, True, 64),
    (200, 2, 1, 4, 8, False, "extreme", False, True, 32),
    (200, 2, 2, 8, 4, True, "extreme", True, True, 8),
]


@pytest.mark.parametrize("T,H,G,P,N,neg,regime,with_D,with_init,chunk", CASES)
def test_chunk_matches_naive(T, H, G, P, N, neg, regime, with_D, with_init, chunk):
    inp = make_inputs(2, T, H, P, G, N, neg=neg, regime=regime, with_D=with_D,
                      n_state=2 if with_init else None, seed=T + H)
    kw = dict(allow_neg_eigval=neg, output_final_state=True)
    ref = run(naive_ssd, inp, torch.float64, **kw)
    res = run(chunk_ssd, inp, torch.float32, chunk_size=chunk, **kw)
    assert res[0].dtype == torch.float32 and res[1].dtype == torch.float32
    compare(res, ref)


def test_exact_zero_decay_is_finite_and_exact():
    """a_t == 0 exactly (2 exp(-ln 2) - 1 in fp32) and an underflowed exp(dt A) == 0."""
    inp = make_inputs(1, 70, 2, 4, 1, 4, neg=True, n_state=1, seed=3)
    dt32 = torch.tensor(math.log(2), dtype=torch.float32)
    inp["A"] = torch.tensor([-1.0, -1.5], dtype=torch.float64)
    inp["dt"][0, ::5, 0] = dt32.double()
    inp["dt"][0, 40:, 1] = 200.0  # exp(-300) underflows to 0 in fp32
    zero = decay(inp["dt"].float(), inp["A"].float(), True)
    assert (zero[0, ::5, 0] == 0).all(), "test set-up: decay should be exactly zero"
    for neg in (True, False):
        kw = dict(allow_neg_eigval=neg, output_final_state=True)
        compare(run(chunk_ssd, inp, torch.float32, chunk_size=16, **kw),
                run(naive_ssd, inp, torch.float32, **kw))
        compare(run(chunk_ssd, inp, torch.float32, chunk_size=16, **kw),
                run(naive_ssd, inp, torch.float64, **kw))


@pytest.mark.parametrize("neg,with_states", [(False, False), (True, False), (False, True), (True, True)])
def test_packed_documents_equal_separate_runs(neg, with_states):
    """Without states the documents restart in place; with states they are padded."""
    lengths = [1, 1, 38, 1, 0, 70]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    n = len(lengths)
    inp = make_inputs(1, sum(lengths), 4, 4, 2, 8, neg=neg, regime="extreme",
                      n_state=n if with_states else None, seed=7)
    kw = dict(allow_neg_eigval=neg, output_final_state=with_states)
    res = run(chunk_ssd, inp, torch.float32, cu_seqlens=cu, chunk_size=16, **kw)

    # oracle: each document on its own through the naive recurrence, in float64
    def separate(x, dt, A, B, C, *, D=None, initial_state=None, **_):
        ys, states = [], []
        for i in range(n):
            s, e = int(cu[i]), int(cu[i + 1])
            h0 = initial_state[i:i + 1] if initial_state is not None else None
            y, st = naive_ssd(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D=D,
                              allow_neg_eigval=neg, initial_state=h0, output_final_state=True)
            ys.append(y)
            states.append(st)
        return torch.cat(ys, dim=1), (torch.cat(states) if with_states else None)

    compare(res, run(separate, inp, torch.float64))
    compare(res, run(naive_ssd, inp, torch.float64, cu_seqlens=cu, **kw))


def test_public_op_uses_chunked_torch_path():
    inp = make_inputs(2, 65, 4, 4, 2, 8, neg=True, regime="extreme", n_state=2, seed=11)

    def op(x, dt, A, B, C, **kw):
        return kernels.ssd(x, dt, A, B, C, backend="torch", **kw)

    kw = dict(allow_neg_eigval=True, output_final_state=True)
    compare(run(op, inp, torch.float32, **kw), run(naive_ssd, inp, torch.float64, **kw))


def test_low_precision_inputs_keep_dtype_and_fp32_state():
    inp = make_inputs(1, 40, 2, 4, 1, 4, neg=False, n_state=1, seed=5)
    args = [inp[k].to(torch.bfloat16) for k in ("x", "dt", "A", "B", "C")]
    y, state = chunk_ssd(*args, output_final_state=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_ref, state_ref = naive_ssd(*args, output_final_state=True)
    assert_close(y.float(), y_ref.float(), "bf16 y", tol=2e-2)
    assert_close(state, state_ref, "bf16 state")


@pytest.mark.parametrize("name,bad,match", [
    ("dt", lambda i: i["dt"][..., :1], "dt"),
    ("A", lambda i: i["A"][None], "A must"),
    ("C", lambda i: i["C"][:, :, :, :2], "B and C"),
    ("D", lambda i: i["D"][:1], "D must"),
    ("initial_state", lambda i: torch.zeros(3, 4, 4, 8), "initial_state"),
])
def test_bad_shapes_name_the_argument(name, bad, match):
    inp = make_inputs(2, 5, 4, 4, 2, 8, neg=False)
    inp[name] = bad(inp)
    with pytest.raises(ValueError, match=match):
        kernels.ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"],
                    initial_state=inp.get("initial_state"), backend="torch")


def test_saved_state_interval_must_be_a_multiple_of_64():
    inp = make_inputs(1, 5, 4, 4, 1, 8, neg=False)
    with pytest.raises(ValueError, match="save_state_every must be a positive multiple of 64, got 32"):
        kernels.ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], save_state_every=32, backend="torch")


def test_groups_must_divide_heads():
    inp = make_inputs(1, 5, 4, 4, 3, 8, neg=False)
    with pytest.raises(ValueError, match="divisible"):
        kernels.ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], backend="torch")
