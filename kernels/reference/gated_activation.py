"""``act(gate) * up`` (SwiGLU, GeGLU) as an autograd function that keeps gate and up and
recomputes ``act(gate)`` in backward: the gated MLP then keeps three hidden-wide tensors
(gate, up and the product the down projection saves), not four.

The op's torch path and the Triton kernel's oracle. It uses the same aten forward/backward
ops as ``F.silu``/``F.gelu`` in the inputs' dtype, so its gradients are bit-identical to
the plain composition's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("silu", "gelu")  # gelu is the tanh approximation (Griffin's GeGLU)


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
    return _GatedActivation.apply(gate, up, kind)
