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
