"""Small configs of every model family, shared by the model tests (fast on a CPU)."""
from __future__ import annotations

from pretrain.model_config import (AttentionConfig, DeltaProductConfig, Mamba2Config, ModelConfig,
                                   RGLRUConfig)

FAMILIES = ("gated_deltaproduct", "gated_deltanet", "mamba2", "griffin", "hawk")


def small_config(family: str, *, vocab_size: int = 48, d_model: int = 32, n_layers: int = 3,
                 window: int = 5) -> ModelConfig:
    """A few-thousand-parameter model of ``family``; attention windows shorter than tests' T."""
    base = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers)
    if family in ("gated_deltaproduct", "gated_deltanet"):
        n_h = 2 if family == "gated_deltaproduct" else 1
        return ModelConfig(**base, pattern="D", deltaproduct=DeltaProductConfig(
            num_heads=2, head_dim=16, expand_v=1.0, num_householder=n_h))
    if family == "mamba2":
        return ModelConfig(**base, pattern="M", mlp_type="none", mamba2=Mamba2Config(
            d_state=8, head_dim=16, expand=2))
    if family in ("griffin", "hawk"):
        return ModelConfig(**base, pattern="RRA" if family == "griffin" else "R", mlp_type="geglu",
                           mlp_expand=3.0, embedding_scale=True, rglru=RGLRUConfig(num_heads=2),
                           attention=AttentionConfig(num_heads=2, num_kv_heads=1, window=window))
    raise ValueError(f"unknown family {family!r}")


