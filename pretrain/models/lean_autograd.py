"""Autograd functions that keep only their (half-precision) inputs for backward.

Written as plain PyTorch compositions, the norms and gates of a bf16 model compute in fp32
and autograd keeps every fp32 intermediate: an RMSNorm over ``d_model`` keeps 16 bytes per
element instead of the 2 of its input, RG-LRU's gate math keeps ten fp32 tensors. These
functions save their inputs in their own dtype plus a per-row fp32 ``rstd`` and recompute
the rest in backward (cheap elementwise work), which cuts a 1.3B model's activation memory
by a third to a half. Gradients are those of the plain compositions (tested against them);
outputs are computed in fp32 and rounded once.

Parameters (norm weights, ``a_param``) are passed in by the module that owns them, so
ZeRO-3 has gathered them in that module's forward hook.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: fp32 for half precision, fp64 stays fp64 (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the leading dims that broadcasting added."""
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


class _RMSNorm(torch.autograd.Function):
    """``RMSNorm`` over groups of ``group`` channels, optionally with a SiLU gate.

    ``gate_first`` False: ``norm(x) * w * silu(gate)`` (fla's gated o-norm);
    True: ``norm(x * silu(gate)) * w`` (Mamba2's gated norm). Saves x, gate and fp32 rstd.
    """

    @staticmethod
    def forward(ctx, x, gate, weight, eps: float, group: int, gate_first: bool):  # type: ignore[override]
        xf = acc(x)
        if gate is not None and gate_first:
            xf = xf * F.silu(acc(gate))
        xg = xf.unflatten(-1, (-1, group))
        rstd = torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
        y = (xg * rstd).flatten(-2) * acc(weight)
        if gate is not None and not gate_first:
            y = y * F.silu(acc(gate))
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.group, ctx.gate_first = group, gate_first
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, gate, weight, rstd = ctx.saved_tensors
        group, gate_first = ctx.group, ctx.gate_first
        dy, xf, w = acc(dy), acc(x), acc(weight)
        gf = acc(gate) if gate is not None else None
        u = xf * F.silu(gf) if gf is not None and gate_first else xf
        xhat = (u.unflatten(-1, (-1, group)) * rstd).flatten(-2)
        dgate = None
        if gf is not None and not gate_first:
            dgate = dy * xhat * w * _silu_grad(gf)
            dy = dy * F.silu(gf)
        dw = _sum_to(dy * xhat, weight.shape)
        dxhat = (dy * w).unflatten(-1, (-1, group))
        xh = xhat.unflatten(-1, (-1, group))
        du = (rstd * (dxhat - xh * (dxhat * xh).mean(-1, keepdim=True))).flatten(-2)
        if gf is not None and gate_first:
            dgate = du * xf * _silu_grad(gf)
            du = du * F.silu(gf)
        return (du.to(x.dtype), dgate.to(gate.dtype) if dgate is not None else None,
                dw.to(weight.dtype), None, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gate: torch.Tensor | None = None,
             group: int | None = None, gate_first: bool = False) -> torch.Tensor:
    """RMSNorm of ``x`` (per ``group`` channels, default all) times ``weight``, optionally gated."""
    return _RMSNorm.apply(x, gate, weight, eps, group or x.shape[-1], gate_first)


class _L2Normalize(torch.autograd.Function):
    """``x / sqrt(sum x² + eps)``; saves its output and fp32 rstd (as fla's l2norm does).

    The output is what the delta-rule kernel saves anyway, so the two share one tensor.
    """

    @staticmethod
    def forward(ctx, x, eps: float):  # type: ignore[override]
        xf = acc(x)
        rstd = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)
        y = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        y, rstd = ctx.saved_tensors
        dy, yf = acc(dy), acc(y)
        dx = rstd * (dy - yf * (dy * yf).sum(-1, keepdim=True))
        return dx.to(y.dtype), None


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _L2Normalize.apply(x, eps)


class _GatedActivation(torch.autograd.Function):
    """``act(gate) * up``; saves gate and up, recomputes ``act(gate)`` in backward.

    Uses the same aten forward/backward ops as ``F.silu``/``F.gelu`` in the inputs' dtype, so
    gradients are bit-identical to the plain composition's.
    """

    @staticmethod
    def forward(ctx, gate, up, kind: str):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        ctx.kind = kind
        return _activation(gate, kind) * up

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        dact = dout * up
        if ctx.kind == "silu":
            dgate = torch.ops.aten.silu_backward(dact, gate)
        else:
            dgate = torch.ops.aten.gelu_backward(dact, gate, approximate="tanh")
        return dgate, dout * _activation(gate, ctx.kind), None


def _activation(gate: torch.Tensor, kind: str) -> torch.Tensor:
    return F.silu(gate) if kind == "silu" else F.gelu(gate, approximate="tanh")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """``silu(gate) * up`` (SwiGLU) or ``gelu_tanh(gate) * up`` (GeGLU); kind 'silu' or 'gelu'."""
    if kind not in ("silu", "gelu"):
        raise ValueError(f"gated activation must be 'silu' or 'gelu', got {kind!r}")
    return _GatedActivation.apply(gate, up, kind)
