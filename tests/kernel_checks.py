"""Helpers shared by the kernel tests (test_kernels_*.py and test_triton_*.py).

A run returns ``(output, final_state, {input name: gradient})``; ``compare_results`` checks
one such triple against another with ``assert_close`` (max|diff| / max|ref| <= tol).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, Iterator

import torch

TOL = 1e-4


@contextlib.contextmanager
def interpreted_module(*names: str) -> Iterator[object]:
    """The modules ``names`` re-imported (in that order) under ``TRITON_INTERPRET=1``.

    Yields the last one; on exit the variable is restored and the modules re-imported again.
    ``triton.jit`` picks interpreter or compiler when a kernel is defined, so setting the
    variable at import time is not enough once another test module imported ``kernels``.
    """
    def reload_all() -> object:
        mod = None
        for name in names:
            mod = importlib.reload(importlib.import_module(name))
        return mod

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield reload_all()
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
        reload_all()


def run_with_grads(call: Callable, inputs: dict, names, dtype: torch.dtype, seed: int = 1,
                   device=None):
    """``call(leaves)`` -> (output, state); returns them with the gradients of a fixed random
    projection of both, for the inputs in ``names`` order (``None`` inputs are left out).

    ``device=None``: leaves cast to ``dtype`` and the projection taken in ``dtype``;
    otherwise leaves moved to ``device`` and the projection taken in float64.
    """
    if device is None:
        leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items() if v is not None}
    else:
        leaves = {k: v.detach().to(device, dtype).requires_grad_() for k, v in inputs.items() if v is not None}
    out, state = call(leaves)
    gen = torch.Generator().manual_seed(seed)

    def project(t: torch.Tensor) -> torch.Tensor:
        w = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        return (t * w.to(dtype)).sum() if device is None else (t.double() * w.to(device)).sum()

    loss = project(out)
    if state is not None:
        loss = loss + project(state)
    names = [k for k in names if k in leaves]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], materialize_grads=True)
    return out.detach(), (state.detach() if state is not None else None), dict(zip(names, grads))


def assert_close(got, ref, what: str, tol: float = TOL, *, floor: float = 1e-30) -> None:
    """Same shape, finite, and max|got - ref| / max|ref| <= tol (an empty ref passes)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {list(got.shape)} vs {list(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if ref.numel():
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()
        assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def compare_results(res, ref, out: str, tol: float = TOL, *, floor: float = 1e-30,
                    same_state_presence: bool = True, dtype: torch.dtype | None = None,
                    state_dtype: torch.dtype | None = None) -> None:
    """(output, final_state, grads) against the reference triple.

    ``same_state_presence``: both or neither return a final state. ``dtype``: the output,
    state and gradients all have it; ``state_dtype``: the state has it.
    """
    state_dtype = state_dtype or dtype
    if dtype is not None:
        assert res[0].dtype == dtype
    assert_close(res[0], ref[0], out, tol, floor=floor)
    if same_state_presence:
        assert (res[1] is None) == (ref[1] is None)
    if ref[1] is not None:
        if state_dtype is not None:
            assert res[1].dtype == state_dtype
        assert_close(res[1], ref[1], "final_state", tol, floor=floor)
    assert res[2].keys() == ref[2].keys()
    for k in ref[2]:
        if dtype is not None:
            assert res[2][k].dtype == dtype, f"grad {k} dtype"
        assert_close(res[2][k], ref[2][k], f"grad {k}", tol, floor=floor)


def rel_rmse(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def recurrence_decays(shape, regime: str, gen: torch.Generator) -> torch.Tensor:
    """float64 decays a for h_t = a_t h_{t-1} + x_t: the RG-LRU range [0, 1] ("unit"), its
    edges ("near0", "near1"), just above -1 ("near-1"), or any sign with exact 0 and -1 and
    values near 1 ("signed")."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if regime == "unit":
        return u
    if regime == "near0":
        return 1e-6 * u
    if regime == "near1":
        return 1.0 - 1e-5 * u
    if regime == "near-1":
        return -1.0 + 1e-5 * u
    if regime == "signed":
        a = 2.0 * u - 1.0
        pick = torch.randint(6, shape, generator=gen)
        a = torch.where(pick == 0, torch.zeros_like(a), a)
        a = torch.where(pick == 1, -torch.ones_like(a), a)
        return torch.where(pick == 2, 1.0 - 1e-5 * u, a)
    raise ValueError(f"unknown decay regime {regime!r}: use unit, near0, near1, near-1 or signed")


def recurrence_inputs(Bsz: int, T: int, Dm: int, regime: str, *, n_state: int | None = None,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 x and a [Bsz, T, Dm] (a from ``recurrence_decays``) and, with ``n_state``, an
    initial state [n_state, Dm], all drawn from one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    inp = dict(x=torch.randn(Bsz, T, Dm, generator=gen, dtype=torch.float64),
               a=recurrence_decays((Bsz, T, Dm), regime, gen))
    if n_state is not None:
        inp["initial_state"] = torch.randn(n_state, Dm, generator=gen, dtype=torch.float64)
    return inp


def check_bf16_kernel(run: Callable, kernel: Callable, reference: Callable, inputs: dict,
                      compare: Callable, **kwargs) -> None:
    """A compiled kernel in bf16 against ``reference`` in fp32: relative RMSE <= 5e-3 for the
    output and final state, <= 1e-2 for each gradient; then the kernel in fp32 within 1e-4.

    Both sides see the same bf16-rounded inputs, so this measures the kernel, not the
    rounding. ``run(fn, inputs, dtype, **kwargs)`` returns (output, state, grads);
    ``compare(res, ref, tol=...)`` checks two such triples.
    """
    inputs = {k: (v.to(torch.bfloat16).double() if v is not None else None) for k, v in inputs.items()}
    res = run(kernel, inputs, torch.bfloat16, **kwargs)
    ref = run(reference, inputs, torch.float32, **kwargs)
    assert rel_rmse(res[0], ref[0]) <= 5e-3 and rel_rmse(res[1], ref[1]) <= 5e-3
    for k in ref[2]:
        assert rel_rmse(res[2][k], ref[2][k]) <= 1e-2, k
    compare(run(kernel, inputs, torch.float32, **kwargs), ref, tol=1e-4)


def interpreter_fixture(*names: str):
    """A pytest fixture yielding ``interpreted_module(*names)`` for one test (assign it to the
    fixture's name in the test module: ``tk = interpreter_fixture("kernels.triton.x")``)."""
    import pytest

    @pytest.fixture
    def fixture() -> Iterator[object]:
        with interpreted_module(*names) as mod:
            yield mod

    return fixture
