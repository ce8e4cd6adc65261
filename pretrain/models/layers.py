"""Small building blocks shared by the mixers: norms and the document-aware short conv."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .base import MixerCache
from .lean_autograd import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * SiLU(gate), normalising over the last dim (per head when reshaped).

    With ``group`` and ``gate_first`` it is Mamba2's ``RMSNorm(x * SiLU(gate))`` normalised
    over each group of ``group`` channels.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, group: int | None = None, gate_first: bool = False):
        super().__init__(dim, eps)
        self.group, self.gate_first = group or dim, gate_first

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return rms_norm(x, self.weight, self.eps, gate=gate, group=self.group, gate_first=self.gate_first)


class ShortConvolution(nn.Module):
    """Depthwise causal conv (width <= 4) with optional SiLU; never mixes documents.

    Its cache entry is the last ``width - 1`` inputs, ``[B, dim, width - 1]``.
    """

    def __init__(self, dim: int, width: int, activation: str | None = "silu", bias: bool = False):
        super().__init__()
        self.dim, self.width, self.activation = dim, width, activation
        self.weight = nn.Parameter(torch.empty(dim, width))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        nn.init.kaiming_uniform_(self.weight.view(dim, 1, width), a=5**0.5)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: MixerCache | None = None, key: str = "conv") -> torch.Tensor:
        init = cache[key] if cache is not None else None
        y, final = kernels.causal_conv1d(
            x, self.weight, self.bias, activation=self.activation, cu_seqlens=cu_seqlens,
            initial_state=init, output_final_state=cache is not None,
        )
        if cache is not None:
            cache[key].copy_(final)
        return y

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.width - 1, device=device, dtype=torch.float32)

    def step(self, x: torch.Tensor, cache: MixerCache, key: str = "conv") -> torch.Tensor:
        """One token ``[B, dim]``: the same window arithmetic as the parallel op."""
        window = torch.cat([cache[key], x.float()[:, :, None]], dim=-1)
        y = (window * self.weight.float()).sum(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        cache[key].copy_(window[:, :, 1:])
        return (F.silu(y) if self.activation == "silu" else y).to(x.dtype)
