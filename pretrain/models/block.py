"""Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``.

The mixer class is looked up by name and imported lazily, so a pattern only needs the
modules of the mixers it uses (and new families register with one line).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from kernels.varlen import offsets_read_once

from ..model_config import ModelConfig
from .base import MixerCache
from .layers import RMSNorm
from .mlp import build_mlp

MIXERS: dict[str, str] = {
    "gated_deltaproduct": "pretrain.models.gated_deltaproduct:GatedDeltaProduct",
    "mamba2": "pretrain.models.mamba2:Mamba2",
    "rglru": "pretrain.models.griffin:RGLRUBlock",
    "local_attention": "pretrain.models.local_attention:LocalAttention",
}


def mixer_class(name: str) -> type[nn.Module]:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {sorted(MIXERS)}")
    module, cls = MIXERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, mixer_name: str):
        super().__init__()
        self.layer_idx, self.mixer_name = layer_idx, mixer_name
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = mixer_class(mixer_name)(config, layer_idx)
        self.mlp = build_mlp(config)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps) if self.mlp is not None else None

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: MixerCache | None = None) -> torch.Tensor:
        with offsets_read_once(cu_seqlens):  # a pipeline stage's or a recomputed block's ops share one read
            x = x + self.mixer(self.mixer_norm(x), cu_seqlens=cu_seqlens, cache=cache)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x

    def activation_bytes_per_token(self, elem: int, seq_len: int) -> float:
        """Bytes per token this block keeps for backward without activation checkpointing.

        Each norm keeps its input and an fp32 rstd; the mixer and MLP say what they keep
        (their inputs included). ``elem`` is the activation element size (2 for bf16).
        """
        norm = elem * self.mixer_norm.weight.shape[0] + 4
        total = norm + self.mixer.activation_bytes_per_token(elem, seq_len)
        if self.mlp is not None:
            total += norm + self.mlp.activation_bytes_per_token(elem)
        return total

    def step(self, x: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        """One token x [B, D]."""
        x = x + self.mixer.step(self.mixer_norm(x), cache)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x
