"""RMSNorm (optionally SiLU-gated, per channel group) as an autograd function that keeps only
its input, the gate and an fp32 rstd per row, recomputing the rest in backward.

This is the op's torch path and the Triton kernel's oracle. Written as a plain composition,
a bf16 norm would keep fp32 copies of its input and output (16 bytes per element instead of
2); recomputing ``x * rstd`` in backward is cheap elementwise work.
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None, group: int,
             gate_first: bool) -> torch.Tensor:
    return _RMSNorm.apply(x, gate, weight, eps, group, gate_first)
