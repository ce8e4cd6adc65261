"""Gated MLPs: SwiGLU (LLaMA / fla) and GeGLU (Griffin's gated GeLU MLP).

Both are ``down(act(gate(x)) * up(x))``; only the activation and the default hidden width
differ, so one class serves both and the LM's init can find ``down_proj`` by name.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model_config import ModelConfig
from .lean_autograd import gated_activation


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


def default_hidden(config: ModelConfig) -> int:
    """Hidden width when ``config.mlp_hidden`` is None.

    SwiGLU: 2/3 of ``mlp_expand * d_model`` (three matrices cost what two of the ungated
    width would), rounded up to a multiple of 256 as LLaMA and fla do; tiny models round
    to 32 so the rounding does not dominate their size. GeGLU: Griffin's
    ``mlp_expand * d_model`` (expansion 3 in the Griffin presets), rounded to 32.
    """
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    if config.mlp_type == "swiglu":
        multiple = 256 if config.d_model >= 512 else 32
        return _round_up(int(2 * config.mlp_expand * config.d_model / 3), multiple)
    if config.mlp_type == "geglu":
        return _round_up(int(config.mlp_expand * config.d_model), 32)
    raise ValueError(f"mlp_type {config.mlp_type!r} has no hidden width")


class GatedMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.mlp_type not in ("swiglu", "geglu"):
            raise ValueError(f"mlp_type must be 'swiglu' or 'geglu' for GatedMLP, got {config.mlp_type!r}")
        hidden = default_hidden(config)
        self.mlp_type = config.mlp_type
        self.gate_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=False)

    def activation_bytes_per_token(self, elem: int) -> float:
        """The input, gate and up projections (the gated activation recomputes act(gate)) and
        the down projection's input, ``elem`` bytes each."""
        return elem * (self.gate_proj.in_features + 3 * self.gate_proj.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = "silu" if self.mlp_type == "swiglu" else "gelu"
        return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), kind))


def build_mlp(config: ModelConfig) -> nn.Module | None:
    """The block's MLP, or None for ``mlp_type == "none"`` (e.g. the original Mamba2 stack)."""
    return None if config.mlp_type == "none" else GatedMLP(config)
