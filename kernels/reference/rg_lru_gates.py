"""The RG-LRU's gating (Griffin, De et al. 2024) as an autograd function that keeps its three
half-precision inputs and recomputes the gates in backward.

    gate_x = σ(gx),  gate_a = σ(ga),  log a = -c · gate_a · softplus(Λ)
    x̃ = x · gate_x · sqrt(1 - a²)   (multiplier 1 at a reset),   a = 0 at a reset

Written out, autograd would keep about ten fp32 ``W``-wide tensors per token. The sqrt's
derivative, 1 / (2 sqrt(1 - a²)), blows up as a → 1; as in recurrentgemma it is capped at
``max_sqrt_gradient``. The op's torch path and the Triton kernel's oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rms_norm import acc


def sqrt_bound_denominator(x: torch.Tensor, max_gradient: float) -> torch.Tensor:
    """``2 sqrt(x)``, floored so that ``1 / it`` (sqrt's derivative) is at most ``max_gradient``."""
    return torch.sqrt(torch.clamp(4.0 * x, min=1.0 / max_gradient**2))


class _RGLRUGates(torch.autograd.Function):
    @staticmethod
    def _gates(gx_logits, ga_logits, a_param, reset, c: float):
        gate_x = torch.sigmoid(acc(gx_logits))
        gate_a = torch.sigmoid(acc(ga_logits))
        softplus_a = F.softplus(acc(a_param))
        log_a = -c * gate_a * softplus_a
        # 1 - a² = -expm1(2 log a): exact near a = 1 where 1 - exp(..)² would cancel.
        one_minus_a2 = -torch.expm1(2.0 * log_a)
        multiplier = torch.sqrt(one_minus_a2).masked_fill(reset, 1.0)
        return gate_x, gate_a, softplus_a, log_a, one_minus_a2, multiplier

    @staticmethod
    def forward(ctx, x, gx_logits, ga_logits, a_param, reset, c: float, max_sqrt_gradient: float):  # type: ignore[override]
        gate_x, _, _, log_a, _, multiplier = _RGLRUGates._gates(gx_logits, ga_logits, a_param, reset, c)
        ctx.save_for_backward(x, gx_logits, ga_logits, a_param, reset)
        ctx.c, ctx.max_sqrt_gradient = c, max_sqrt_gradient
        return acc(x) * gate_x * multiplier, torch.exp(log_a).masked_fill(reset, 0.0)

    @staticmethod
    def backward(ctx, dx_norm, da):  # type: ignore[override]
        x, gx_logits, ga_logits, a_param, reset = ctx.saved_tensors
        c = ctx.c
        gate_x, gate_a, softplus_a, log_a, one_minus_a2, multiplier = _RGLRUGates._gates(
            gx_logits, ga_logits, a_param, reset, c)
        xf = acc(x)
        dx = dx_norm * gate_x * multiplier
        dgate_x = dx_norm * xf * multiplier
        dmultiplier = (dx_norm * xf * gate_x).masked_fill(reset, 0.0)
        # d(1 - a²)/d log a = -2 a²; the sqrt's derivative is capped.
        dsqrt = dmultiplier / sqrt_bound_denominator(one_minus_a2, ctx.max_sqrt_gradient)
        dlog_a = dsqrt * (-2.0 * torch.exp(2.0 * log_a))
        dlog_a = dlog_a + da.masked_fill(reset, 0.0) * torch.exp(log_a)
        dgate_a = dlog_a * (-c * softplus_a)
        dsoftplus = (dlog_a * (-c * gate_a)).reshape(-1, a_param.shape[-1]).sum(0)
        da_param = dsoftplus * torch.sigmoid(acc(a_param))
        # σ'(z) = σ(z)·σ(-z): 1 - σ(z) would cancel for saturated gates
        dgx = dgate_x * gate_x * torch.sigmoid(-acc(gx_logits))
        dga = dgate_a * gate_a * torch.sigmoid(-acc(ga_logits))
        return (dx.to(x.dtype), dgx.to(gx_logits.dtype), dga.to(ga_logits.dtype), da_param.to(a_param.dtype),
                None, None, None)


def rg_lru_gates(x: torch.Tensor, gx_logits: torch.Tensor, ga_logits: torch.Tensor, a_param: torch.Tensor,
                 reset: torch.Tensor, c: float, max_sqrt_gradient: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _RGLRUGates.apply(x, gx_logits, ga_logits, a_param, reset, c, max_sqrt_gradient)
