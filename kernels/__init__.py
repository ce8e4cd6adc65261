"""Functional sequence-mixing ops with Triton kernels on CUDA and PyTorch references.

Public API: ``gated_delta_product``, ``ssd``, ``linear_recurrence``, ``causal_conv1d``.
"""
from .ops import causal_conv1d, gated_delta_product, linear_recurrence, ssd

__all__ = ["gated_delta_product", "ssd", "linear_recurrence", "causal_conv1d"]
