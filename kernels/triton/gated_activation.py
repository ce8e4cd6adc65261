"""Triton ``act(gate) * up`` (SwiGLU / GeGLU): one fused elementwise kernel each way.

Eager PyTorch makes the MLP's widest tensors (hidden = 2.75-3 x d_model) pass through memory
five times forward (activation, then product) and about eleven times backward; fused, the
forward reads gate and up and writes the product once, the backward reads dout, gate, up
and writes dgate, dup once. Arithmetic in fp32, each output rounded once. Saves gate and
up, like ``kernels.reference.gated_activation`` (the oracle).

Kernels call only builtins and jit helpers of this module and ``jit_math`` (see
``linear_recurrence``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_triton
from ..reference import gated_activation as _ref
from .jit_math import sigmoid

BLOCK = 1024


@triton.jit
def _act_and_grad(g, GELU: tl.constexpr):
    """(act(g), act'(g)) in fp32: SiLU, or GeLU with the tanh approximation."""
    if GELU:  # sqrt(2 / pi) = 0.7978845608028654, cubic coefficient 0.044715
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * sigmoid(2.0 * inner) - 1.0  # tanh(inner)
        act = 0.5 * g * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = sigmoid(g)
        act = g * s
        grad = s * (1.0 + g * (1.0 - s))
    return act, grad


@triton.jit
def _gated_act_fwd_kernel(g_ptr, u_ptr, out_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, GELU)
    tl.store(out_ptr + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(g_ptr, u_ptr, dout_ptr, dg_ptr, du_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, grad = _act_and_grad(g, GELU)
    tl.store(dg_ptr + offs, (dout * u * grad).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dout * act).to(du_ptr.dtype.element_ty), mask=mask)


class _GatedActivationTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind: str):  # type: ignore[override]
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _gated_act_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, GELU=kind == "gelu", BLOCK=BLOCK,
                                                        num_warps=4)
        ctx.save_for_backward(gate, up)
        ctx.gelu = kind == "gelu"
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _gated_act_bwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, dout.contiguous(), dgate, dup, n,
                                                        GELU=ctx.gelu, BLOCK=BLOCK, num_warps=4)
        return dgate, dup, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """``kernels.gated_activation``'s Triton path (arguments checked there)."""
    if gate.numel() == 0 or gate.numel() >= 2**31:  # int32 offsets
        return _ref.gated_activation(gate, up, kind)
    return _GatedActivationTriton.apply(gate, up, kind)


register_triton("gated_activation", gated_activation)
