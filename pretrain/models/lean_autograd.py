"""Autograd functions that keep only their (half-precision) inputs for backward.

Written as plain PyTorch compositions, the norms and gates of a bf16 model compute in fp32
and autograd keeps every fp32 intermediate: an RMSNorm over ``d_model`` keeps 16 bytes per
element instead of the 2 of its input, RG-LRU's gate math keeps ten fp32 tensors. These
functions save their inputs in their own dtype (plus a per-row fp32 ``rstd``) and recompute
the rest in backward (cheap elementwise work), which cuts a 1.3B model's activation memory
by a third to a half. Gradients are those of the plain compositions (tested against them);
outputs are computed in fp32 and rounded once. The norms and the gated activation are
``kernels.rms_norm``, ``kernels.l2_normalize`` and ``kernels.gated_activation``: the same
functions in PyTorch, one fused Triton kernel each way on CUDA tensors.

Parameters (norm weights, ``a_param``) are passed in by the module that owns them, so
ZeRO-3 has gathered them in that module's forward hook.
"""
from __future__ import annotations

import torch

import kernels
from kernels.reference.rms_norm import acc

__all__ = ["acc", "gated_activation", "l2_normalize", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gate: torch.Tensor | None = None,
             group: int | None = None, gate_first: bool = False) -> torch.Tensor:
    """RMSNorm of ``x`` (per ``group`` channels, default all) times ``weight``, optionally
    SiLU-gated: ``kernels.rms_norm`` (a fused Triton kernel on CUDA tensors)."""
    return kernels.rms_norm(x, weight, eps, gate=gate, group=group, gate_first=gate_first)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum x² + eps)`` over the last dim, saving its output (which the delta-rule
    kernel saves anyway, so they share one tensor) and an fp32 rstd: ``kernels.l2_normalize``
    (a fused Triton kernel on CUDA tensors)."""
    return kernels.l2_normalize(x, eps)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """``silu(gate) * up`` (SwiGLU) or ``gelu_tanh(gate) * up`` (GeGLU); kind 'silu' or 'gelu':
    ``kernels.gated_activation`` (one fused Triton kernel each way on CUDA tensors)."""
    return kernels.gated_activation(gate, up, kind)
