"""Chunked (WY) Gated DeltaProduct against the naive per-token recurrence, both fp32.

Compared: output, final state and the gradient of every input, as max|diff| / max|ref|.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernel_checks import TOL, assert_close, compare_results  # noqa: F401
from kernels.reference.gated_delta_product import (
    chunk_gated_delta_product,
    naive_gated_delta_product,
)

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


pytestmark = pytest.mark.usefixtures("single_thread")


def make_inputs(B, T, H, K, V, n_h, *, gates="mild", betas="mid", n_state=None, seed=0):
    """Model-like inputs: L2-normalised q and k, beta in (0, 2), log gates g <= 0."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    inp = dict(
        q=F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        k=F.normalize(torch.randn(B, T, n_h, H, K, generator=gen), dim=-1),
        v=torch.randn(B, T, n_h, H, V, generator=gen),
        beta={"mid": 2 * u(B, T, n_h, H), "near0": 1e-3 * u(B, T, n_h, H),
              "near2": 2 - 1e-3 * u(B, T, n_h, H)}[betas],
    )
    gshape = (B, T, H)
    if gates != "none":
        inp["g"] = {
            "zero": torch.zeros(gshape),
            "mild": -0.5 * u(*gshape),
            "strong": -20 - 10 * u(*gshape),
            "huge": torch.full(gshape, -1e4),
            # per token: exactly 0, mild, or strongly negative
            "mixed": torch.stack([torch.zeros(gshape), -0.5 * u(*gshape), -25 - u(*gshape)])
            .gather(0, torch.randint(3, (1, *gshape), generator=gen))[0],
        }[gates]
    if n_state is not None:
        inp["initial_state"] = torch.randn(n_state, H, K, V, generator=gen)
    return inp


def run(fn, inputs: dict, seed: int = 1, **kwargs):
    """Output, final state and the gradients of a fixed random projection of both."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    o, state = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves.get("g"),
                  initial_state=leaves.get("initial_state"), **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen)).sum()
    names = [n for n in NAMES if n in leaves]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], materialize_grads=True)
    return o.detach(), (state.detach() if state is not None else None), dict(zip(names, grads))


def compare(res, ref) -> None:
    compare_results(res, ref, "o", state_dtype=torch.float32)


# (B, T, H, K, V, n_h, gates, betas, with_init, chunk): a spread, not a full product.
# chunk None is the default size; small chunks force many chunks and chunk sizes that
# n_h does not divide.
CASES = [
    (2, 1, 1, 16, 16, 1, "mild", "mid", True, None),
    (1, 1, 3, 32, 16, 3, "strong", "near0", False, None),
    (1, 63, 3, 16, 32, 2, "mild", "near2", True, None),
    (2, 63, 1, 32, 32, 3, "zero", "near0", True, 16),
    (2, 65, 1, 32, 16, 3, "none", "near0", False, None),
    (1, 65, 3, 16, 16, 3, "mixed", "near2", True, 8),
    (1, 65, 1, 16, 16, 2, "huge", "mid", True, None),
    (1, 200, 1, 16, 16, 2, "strong", "near2", True, None),
    (1, 200, 3, 32, 32, 1, "mild", "mid", False, None),
    (1, 200, 1, 16, 32, 3, "none", "near2", True, 64),
    (1, 200, 3, 16, 16, 1, "mixed", "near0", True, 8),
    (3, 65, 3, 32, 32, 2, "strong", "mid", True, 32),
    (1, 200, 3, 32, 16, 2, "mixed", "near2", True, None),
    (1, 200, 1, 32, 32, 3, "huge", "near0", False, None),
    (1, 65, 1, 16, 16, 3, "mild", "mid", True, 2),
    (1, 1000, 2, 16, 16, 1, "zero", "near2", True, None),
    (1, 1000, 1, 32, 16, 2, "mild", "near2", False, None),
]


@pytest.mark.parametrize("B,T,H,K,V,n_h,gates,betas,with_init,chunk", CASES)
def test_chunk_matches_naive(B, T, H, K, V, n_h, gates, betas, with_init, chunk):
    torch.manual_seed(0)
    inp = make_inputs(B, T, H, K, V, n_h, gates=gates, betas=betas,
                      n_state=B if with_init else None, seed=T + 7 * n_h + H)
    kw = dict(scale=K**-0.5, output_final_state=True)
    ref = run(naive_gated_delta_product, inp, **kw)
    res = run(chunk_gated_delta_product, inp, chunk_size=chunk, **kw)
    assert res[0].dtype == torch.float32
    compare(res, ref)


def test_huge_negative_gates_forget_exactly():
    """g = -1e4: exp underflows to 0, so every token sees only its own n_h steps."""
    torch.manual_seed(0)
    T = 70
    inp = make_inputs(1, T, 2, 16, 16, 2, gates="huge", n_state=1, seed=3)
    o, state, grads = run(chunk_gated_delta_product, inp, scale=1.0, output_final_state=True)
    assert all(torch.isfinite(x).all() for x in (o, state, *grads.values()))
    assert (grads["initial_state"] == 0).all() and (grads["g"] == 0).all()
    # each token on its own (a batch of T length-1 sequences from zero states, no gate)
    per_token = [inp[n].reshape(T, 1, *inp[n].shape[2:]) for n in ("q", "k", "v", "beta")]
    o_tok, s_tok = naive_gated_delta_product(*per_token, scale=1.0, output_final_state=True)
    assert_close(o, o_tok.reshape(o.shape), "o with no memory")
    assert_close(state, s_tok[-1:], "final state with no memory")


def test_packed_documents_equal_separate_runs():
    """Documents (length 1 and 0 included) restart from their own initial state."""
    torch.manual_seed(0)
    lengths = [1, 17, 1, 0, 65, 3]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    n, H, K, V, n_h = len(lengths), 2, 16, 32, 2
    inp = make_inputs(1, sum(lengths), H, K, V, n_h, gates="mixed", betas="near2", n_state=n, seed=9)
    kw = dict(scale=K**-0.5, output_final_state=True)

    def separate(q, k, v, beta, g, *, initial_state, **_):
        outs, states = [], []
        for i in range(n):
            s, e = int(cu[i]), int(cu[i + 1])
            o, st = naive_gated_delta_product(q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e], g[:, s:e],
                                              initial_state=initial_state[i:i + 1], **kw)
            outs.append(o)
            states.append(st)
        return torch.cat(outs, 1), torch.cat(states)

    res = run(chunk_gated_delta_product, inp, cu_seqlens=cu, chunk_size=16, **kw)
    compare(res, run(separate, inp))
    compare(res, run(naive_gated_delta_product, inp, cu_seqlens=cu, **kw))
    # without initial states every document starts from zeros
    inp.pop("initial_state")
    compare(run(chunk_gated_delta_product, inp, cu_seqlens=cu, **kw),
            run(naive_gated_delta_product, inp, cu_seqlens=cu, **kw))


def test_public_op_uses_chunked_torch_path():
    torch.manual_seed(0)
    inp = make_inputs(2, 65, 3, 32, 16, 2, gates="mixed", betas="mid", n_state=2, seed=11)

    def op(q, k, v, beta, g, **kw):
        return kernels.gated_delta_product(q, k, v, beta, g, backend="torch", **kw)

    # default scale is K**-0.5
    compare(run(op, inp, output_final_state=True),
            run(naive_gated_delta_product, inp, scale=32**-0.5, output_final_state=True))
    o, state = op(*(inp[n] for n in ("q", "k", "v", "beta", "g")))
    assert state is None and o.shape == (2, 65, 3, 16)


def test_low_precision_inputs_keep_dtype_and_fp32_state():
    torch.manual_seed(0)
    inp = make_inputs(1, 40, 2, 16, 16, 2, n_state=1, seed=5)
    args = [inp[n].to(torch.bfloat16) for n in ("q", "k", "v", "beta", "g")]
    o, state = kernels.gated_delta_product(*args, initial_state=inp["initial_state"],
                                           output_final_state=True, backend="torch")
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, state_ref = naive_gated_delta_product(*args, scale=0.25, initial_state=inp["initial_state"],
                                                 output_final_state=True)
    assert_close(o.float(), o_ref.float(), "bf16 o", tol=2e-2)
    assert_close(state, state_ref, "bf16 state")


@pytest.mark.parametrize("name,bad,match", [
    ("k", lambda i: i["k"][..., :8], "k must"),
    ("k", lambda i: i["k"][:, :, 0], "k must"),
    ("v", lambda i: i["v"][:, :, :1], "v must"),
    ("beta", lambda i: i["beta"][..., 0], "beta must"),
    ("g", lambda i: i["g"][:, :-1], "g must"),
    ("initial_state", lambda i: torch.zeros(2, 2, 8, 16), "initial_state"),
])
def test_bad_shapes_name_the_argument(name, bad, match):
    inp = make_inputs(2, 5, 2, 16, 8, 2)
    inp[name] = bad(inp)
    with pytest.raises(ValueError, match=match):
        kernels.gated_delta_product(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"],
                                    initial_state=inp.get("initial_state"), backend="torch")


def test_packed_documents_need_batch_one():
    inp = make_inputs(2, 5, 2, 16, 8, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernels.gated_delta_product(inp["q"], inp["k"], inp["v"], inp["beta"], inp["g"],
                                    cu_seqlens=torch.tensor([0, 5]), backend="torch")
