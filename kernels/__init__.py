"""Functional sequence-mixing ops with Triton kernels on CUDA and PyTorch references.

Public API: ``gated_delta_product``, ``ssd``, ``linear_recurrence``, ``causal_conv1d``,
``rms_norm``, ``gated_activation``, ``l2_normalize``, ``rg_lru_gates``.
"""
from .ops import (causal_conv1d, gated_activation, gated_delta_product, l2_normalize, linear_recurrence,
                  rg_lru_gates, rms_norm, ssd)

try:  # registers the Triton kernels with kernels.dispatch; absent Triton keeps the torch path
    from . import triton as _triton_kernels  # noqa: F401
except ImportError:
    pass

__all__ = ["gated_delta_product", "ssd", "linear_recurrence", "causal_conv1d", "rms_norm", "gated_activation",
           "l2_normalize", "rg_lru_gates"]
