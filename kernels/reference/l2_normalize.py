"""L2 normalisation over the last dim, ``x / sqrt(sum x² + eps)``, as an autograd function
that saves its output and an fp32 rstd per row (as flash-linear-attention's l2norm does).

GatedDeltaProduct normalises q and k with it; the normalised k and q are what the
delta-rule kernel saves anyway, so the norm and the kernel share one tensor and the norm
adds only the rstd. The op's torch path and the Triton kernel's oracle.
"""
from __future__ import annotations

import torch

from .rms_norm import acc


class _L2Normalize(torch.autograd.Function):
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


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return _L2Normalize.apply(x, eps)
