"""Backend choice and the device a Triton forward runs on (the kernels themselves are tested
per op)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from kernels.dispatch import device_guard, on_input_device, resolve_backend


def test_a_forward_on_another_gpu_makes_that_gpu_current() -> None:
    guard = device_guard(torch.device("cuda", 1), current=lambda: 0)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # not entered: no GPU here
    for device in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        assert isinstance(device_guard(device, current=lambda: 0), contextlib.nullcontext)


def test_the_guarded_kernel_gets_its_arguments_and_returns_its_result() -> None:
    x = torch.ones(3)
    fn = on_input_device(lambda scale, t, *, shift: t * scale + shift)
    assert torch.equal(fn(2.0, x, shift=1.0), torch.full((3,), 3.0))
    assert on_input_device(fn) is fn  # registering a registered kernel again keeps it as is


def test_backend_requests_are_checked(monkeypatch) -> None:
    x = torch.ones(2)
    assert resolve_backend("rms_norm", "auto", x) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("rms_norm", "cuda", x)
    monkeypatch.setenv("LINRNN_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="LINRNN_KERNEL_BACKEND='fast' is not valid"):
        resolve_backend("rms_norm", "auto", x)
    monkeypatch.delenv("LINRNN_KERNEL_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("rms_norm", "triton", x)
