"""Triton RG-LRU gating (under TRITON_INTERPRET=1 on the CPU) against the torch reference.

fp32 kernel vs the float64 reference: x̃, a and the gradients of x, both gate logits and Λ
within 1e-5 relative (max|diff| / max|ref|), over widths that leave partial channel blocks,
token counts that leave partial row tiles and several programs, resets at row starts and
inside rows, Λ at its init range (softplus ~ 1e-4: needs an exact log1p), large Λ
(softplus's linear branch), a → 1 (1 - a² ~ 1e-7: an exact expm1 and the capped sqrt
derivative) and a → 0. ``gpu``: bf16 inputs against the fp32 reference at Griffin-1.3B's width (2048).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import interpreter_fixture, rel_rmse  # noqa: E402
import kernels  # noqa: E402
from kernels.reference.rg_lru_gates import rg_lru_gates as reference  # noqa: E402

tk = interpreter_fixture("kernels.triton.jit_math", "kernels.triton.rg_lru_gates")
C, CAP = 8.0, 1000.0


def _inputs(B, T, W, *, lam="init", ga_shift=0.0, seed=0, bf16=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, W, generator=gen, dtype=torch.float64)
    gx = torch.randn(B, T, W, generator=gen, dtype=torch.float64) * 2
    ga = torch.randn(B, T, W, generator=gen, dtype=torch.float64) * 2 + ga_shift
    if lam == "init":  # softplus(Λ) in [1.25e-4, 0.013]: a in [0.9, 0.999] at gate 1
        sp = torch.empty(W, dtype=torch.float64).uniform_(1.25e-4, 0.013, generator=gen)
        lam_t = torch.log(torch.expm1(sp))
    else:  # a spread from softplus's exponential tail to its linear branch (Λ > 20)
        lam_t = torch.linspace(-12.0, 30.0, W, dtype=torch.float64)
    reset = torch.zeros(B, T, 1, dtype=torch.bool)
    reset[:, 0] = True
    reset[-1, T // 2] = True  # a document start inside a row
    dxn = torch.randn(B, T, W, generator=gen, dtype=torch.float64)
    da = torch.randn(B, T, W, generator=gen, dtype=torch.float64)
    if bf16:
        x, gx, ga = (t.to(torch.bfloat16).double() for t in (x, gx, ga))
    return (x, gx, ga, lam_t, reset), (dxn, da)


def _run(fn, inputs, upstream, dtype, device="cpu"):
    x, gx, ga, lam, reset = inputs
    leaves = [t.to(device, dtype).requires_grad_() for t in (x, gx, ga)]
    lam_leaf = lam.to(device, torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
    xn, a = fn(*leaves, lam_leaf, reset.to(device), C, CAP)
    ((xn.double() * upstream[0].to(device)).sum() + (a.double() * upstream[1].to(device)).sum()).backward()
    return [xn.detach(), a.detach()] + [t.grad for t in leaves] + [lam_leaf.grad]


CASES = {
    "partial tiles": dict(shape=(2, 9, 200)),         # 200 channels: a partial 128-wide block
    "several programs": dict(shape=(3, 100, 24)),     # 300 tokens: two 256-token programs
    "large and tiny lambda": dict(shape=(2, 7, 64), lam="spread"),
    "a -> 1": dict(shape=(2, 7, 40), ga_shift=-14.0),  # gate_a ~ 1e-6: 1 - a² ~ 1e-7, sqrt grad capped
    "a -> 0": dict(shape=(2, 7, 40), lam="spread", ga_shift=8.0),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(tk, case):
    kw = dict(CASES[case])
    inputs, upstream = _inputs(*kw.pop("shape"), **kw)
    got = _run(tk.rg_lru_gates, inputs, upstream, torch.float32)
    want = _run(reference, inputs, upstream, torch.float64)
    names = ["x_norm", "a", "dx", "dgx", "dga", "dlambda"]
    assert got[0].dtype == got[1].dtype == torch.float32
    for name, g, w in zip(names, got, want):
        assert torch.isfinite(g).all(), name
        err = ((g.double() - w).abs().max() / w.abs().max()).item()
        assert err <= 1e-5, f"{case}: {name} relative error {err:.1e}"


def test_resets_zero_the_decay_and_pass_the_gated_input(tk):
    (x, gx, ga, lam, reset), _ = _inputs(2, 5, 16)
    xn, a = tk.rg_lru_gates(x.float(), gx.float(), ga.float(), lam.float(), reset, C, CAP)
    r = reset[..., 0]
    assert (a[r] == 0).all() and (a[~r] > 0).all()
    torch.testing.assert_close(xn[r], (x.float() * torch.sigmoid(gx.float()))[r])


def test_public_op_dispatches_and_checks_its_arguments(tk):
    (x, gx, ga, lam, reset), _ = _inputs(1, 4, 8)
    x, gx, ga, lam = x.float(), gx.float(), ga.float(), lam.float()
    want = reference(x, gx, ga, lam, reset, C, CAP)
    for backend in ("triton", "torch"):
        for g, w in zip(kernels.rg_lru_gates(x, gx, ga, lam, reset, backend=backend), want):
            torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="a_param must be \\[8\\]"):
        kernels.rg_lru_gates(x, gx, ga, lam[:4], reset)
    with pytest.raises(ValueError, match="reset must be a bool tensor of shape \\[1, 4, 1\\]"):
        kernels.rg_lru_gates(x, gx, ga, lam, reset.float())
    with pytest.raises(ValueError, match="must have x's shape"):
        kernels.rg_lru_gates(x, gx[:, :2], ga, lam, reset)
    empty = tk.rg_lru_gates(x[:, :0], gx[:, :0], ga[:, :0], lam, reset[:, :0], C, CAP)
    assert empty[0].shape == (1, 0, 8)
    # a strided a_param (every other entry of a longer one) is read by its values, and its
    # gradient lands on the right entries
    wide = torch.stack([lam, lam + 1], -1).reshape(-1).requires_grad_()
    strided = wide[::2]
    assert not strided.is_contiguous()
    got = tk.rg_lru_gates(x, gx, ga, strided, reset, C, CAP)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    (got[0].sum() + got[1].sum()).backward()
    lam_leaf = lam.clone().requires_grad_()
    ref = reference(x, gx, ga, lam_leaf, reset, C, CAP)
    (ref[0].sum() + ref[1].sum()).backward()
    torch.testing.assert_close(wide.grad[::2], lam_leaf.grad)
    torch.testing.assert_close(wide.grad[1::2], torch.zeros(8))


@pytest.mark.gpu
def test_gpu_bf16_against_fp32_reference():
    from kernels.triton.rg_lru_gates import rg_lru_gates

    inputs, upstream = _inputs(2, 4096, 2048, bf16=True)
    got = _run(rg_lru_gates, inputs, upstream, torch.bfloat16, device="cuda")
    want = _run(reference, inputs, upstream, torch.float32, device="cuda")
    for g, w in zip(got[:2], want[:2]):
        assert rel_rmse(g, w) <= 5e-3
    for g, w in zip(got[2:], want[2:]):
        assert rel_rmse(g, w) <= 1e-2
