"""Explicit backend choice for every op: Triton on CUDA tensors, PyTorch elsewhere.

``LINRNN_KERNEL_BACKEND=torch|triton`` overrides ``backend="auto"`` for a whole process
(useful to A/B a run, or to force the reference path on a GPU while debugging).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LINRNN_KERNEL_BACKEND"

# op name -> callable, filled by kernels.triton modules as they are implemented.
_TRITON_IMPLS: dict[str, Callable] = {}


def register_triton(op: str, fn: Callable) -> None:
    _TRITON_IMPLS[op] = on_input_device(fn)


def device_guard(device: torch.device, current: Callable[[], int] = torch.cuda.current_device
                 ) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device if it is not. Why: Triton launches on the
    current device, so a forward on ``cuda:1`` tensors (an eval rank's GPU, ``--device
    cuda:1``) would run on ``cuda:0`` otherwise. (Backward needs none: autograd runs each
    device's backward with that device current.)"""
    if device.type != "cuda" or device.index is None or device.index == current():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_input_device(fn: Callable) -> Callable:
    """``fn`` run with its first tensor argument's device current (see ``device_guard``);
    a function wrapped already is returned as it is (re-registering keeps its identity)."""
    if getattr(fn, "on_input_device", False):
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = next(a for a in args if isinstance(a, torch.Tensor))
        with device_guard(first.device):
            return fn(*args, **kwargs)

    run.on_input_device = True  # type: ignore[attr-defined]
    return run


def triton_available(op: str) -> bool:
    return op in _TRITON_IMPLS


def resolve_backend(op: str, backend: str, ref: torch.Tensor) -> str:
    """Return "triton" or "torch" for this call, raising a clear error on a bad request."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced and forced not in ("triton", "torch"):
            raise ValueError(f"{ENV_VAR}={forced!r} is not valid: use 'triton' or 'torch'")
        backend = forced or ("triton" if ref.is_cuda and triton_available(op) else "torch")
    if backend == "triton":
        if not triton_available(op):
            raise NotImplementedError(
                f"{op}: no Triton kernel is available in this build; use backend='torch' "
                f"(or unset {ENV_VAR})"
            )
        if not ref.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests)"
            )
    return backend


def triton_impl(op: str) -> Callable:
    return _TRITON_IMPLS[op]
