"""Triton jit helpers shared by the fused elementwise kernels (norms, gates, activations).

Kernels call these and builtins only, never ``triton.language.standard`` functions (see
``linear_recurrence``). A test that runs a kernel module under ``TRITON_INTERPRET=1``
reloads this module first (``aot.KERNEL_MODULES`` lists it before its users), so the
helpers a kernel calls are interpreted too.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add(a, b):
    """The combine function of ``tl.reduce`` sums."""
    return a + b


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))
