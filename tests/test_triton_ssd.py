"""Triton SSD (under TRITON_INTERPRET=1 on the CPU) against the naive recurrence.

fp32 kernel vs float64 naive oracle: output, final state and the gradient of every input
(x, dt, A, B, C, D, initial state), as max|diff| / max|ref| <= 1e-4, with both eigenvalue
ranges and decays near 0, near 1 and near -1 ('extreme', 'flip'); chunks of 16 so short
sequences cross chunk edges. ``gpu`` tests: bf16 against fp32 references.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import TOL, assert_close, compare_results, interpreted_module, rel_rmse, run_with_grads  # noqa: E402,F401
import kernels  # noqa: E402
from kernels.reference.ssd import naive_ssd  # noqa: E402
from test_kernels_ssd import make_inputs  # noqa: E402  (same input regimes as the reference tests)

NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
MODULE = "kernels.triton.ssd"


@pytest.fixture
def tk():
    """The kernel module re-imported under the interpreter, for this test only."""
    with interpreted_module(MODULE) as mod:
        yield mod


def run(fn, inputs: dict, dtype: torch.dtype, seed: int = 1, device="cpu", **kwargs):
    return run_with_grads(lambda leaves: fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                                      D=leaves.get("D"), initial_state=leaves.get("initial_state"),
                                      **kwargs),
                          inputs, NAMES, dtype, seed, device)


def compare(res, ref, tol: float = TOL) -> None:
    compare_results(res, ref, "y", tol)


# (B, T, H, P, G, N, neg, regime, with_D, with_init)
CASES = [
    (2, 37, 4, 8, 2, 16, False, "mixed", True, True),
    (1, 37, 2, 5, 1, 7, True, "extreme", False, True),
    (1, 20, 2, 16, 2, 16, False, "extreme", True, False),
    (1, 33, 2, 4, 1, 16, True, "flip", True, True),
    (1, 1, 2, 4, 1, 4, True, "mixed", True, True),
]


@pytest.mark.parametrize("Bsz,T,H,P,G,N,neg,regime,with_D,with_init", CASES)
def test_matches_naive(tk, Bsz, T, H, P, G, N, neg, regime, with_D, with_init):
    inp = make_inputs(Bsz, T, H, P, G, N, neg=neg, regime=regime, with_D=with_D,
                      n_state=Bsz if with_init else None, seed=T + P + N)
    kw = dict(allow_neg_eigval=neg, output_final_state=True)
    res = run(tk.ssd, inp, torch.float32, block_l=16, **kw)
    assert res[0].dtype == torch.float32 and res[1].dtype == torch.float32
    compare(res, run(naive_ssd, inp, torch.float64, **kw))


def test_exact_zero_decays(tk):
    """a_t = 2 exp(dt A) - 1 == 0 exactly in fp32 (dt A = -fp32(ln 2)): one zero in a chunk,
    two zeros in another, a zero first in a chunk; the gradient is taken without that factor."""
    inp = make_inputs(1, 40, 2, 4, 1, 8, neg=True, n_state=1, seed=21)
    inp["A"][0] = -1.0
    ln2 = float(torch.tensor(0.6931472, dtype=torch.float32))
    for t in (3, 16, 20, 27, 35):
        inp["dt"][0, t, 0] = ln2
    a = 2.0 * torch.exp(inp["dt"].float() * inp["A"].float()) - 1.0
    assert (a[0, :, 0] == 0).sum() == 5  # exact zeros in fp32 (the fp64 oracle sees ~1e-8)
    kw = dict(allow_neg_eigval=True, output_final_state=True)
    compare(run(tk.ssd, inp, torch.float32, block_l=16, **kw), run(naive_ssd, inp, torch.float64, **kw))


@pytest.mark.parametrize("neg,with_states", [(True, True), (False, False)])
def test_packed_documents(tk, neg, with_states):
    lengths = [1, 18, 0, 1, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inp = make_inputs(1, sum(lengths), 2, 4, 1, 8, neg=neg, regime="extreme",
                      n_state=len(lengths) if with_states else None, seed=5)
    kw = dict(allow_neg_eigval=neg, cu_seqlens=cu, output_final_state=True)
    compare(run(tk.ssd, inp, torch.float32, block_l=16, **kw), run(naive_ssd, inp, torch.float64, **kw))


def test_public_op_dispatches_without_final_state(tk):
    inp = make_inputs(1, 21, 2, 4, 1, 8, neg=True, n_state=1, seed=12)

    def op(*args, **kw):
        return kernels.ssd(*args, backend="triton", **kw)

    res = run(op, inp, torch.float32, allow_neg_eigval=True)
    assert res[1] is None
    compare(res, run(naive_ssd, inp, torch.float64, allow_neg_eigval=True))


@pytest.mark.gpu
@pytest.mark.parametrize("neg,cu", [(False, None), (True, None), (True, [0, 1, 300, 301, 1024])])
def test_gpu_bf16_against_fp32_reference(neg, cu):
    from kernels.reference.ssd import chunk_ssd
    from kernels.triton.ssd import ssd

    Bsz = 2 if cu is None else 1
    cu_t = torch.tensor(cu, device="cuda") if cu is not None else None
    n = Bsz if cu is None else len(cu) - 1
    inp = make_inputs(Bsz, 1024, 4, 64, 2, 128, neg=neg, n_state=n, seed=3)
    kw = dict(allow_neg_eigval=neg, output_final_state=True, cu_seqlens=cu_t, device="cuda")
    # both sides see the same bf16-rounded inputs: this measures the kernel, not the rounding
    inp = {k: (v.to(torch.bfloat16).double() if v is not None else None) for k, v in inp.items()}
    res = run(ssd, inp, torch.bfloat16, **kw)
    ref = run(chunk_ssd, inp, torch.float32, **kw)
    assert rel_rmse(res[0], ref[0]) <= 5e-3 and rel_rmse(res[1], ref[1]) <= 5e-3
    for k in ref[2]:
        assert rel_rmse(res[2][k], ref[2][k]) <= 1e-2, k
    compare(run(ssd, inp, torch.float32, **kw), ref, tol=1e-4)
