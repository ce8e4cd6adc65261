"""Typed model configuration: the stack (block pattern) and each mixer family's knobs.

Kept apart from the run config so that models, presets and evals can use it without
pulling in training concerns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# One letter per layer. The pattern is repeated (and cut) to ``n_layers``.
MIXER_LETTERS = {
    "D": "gated_deltaproduct",  # GatedDeltaProduct (GatedDeltaNet when num_householder == 1)
    "M": "mamba2",
    "R": "rglru",  # Griffin/Hawk recurrent block
    "A": "local_attention",  # sliding-window multi-query attention
}


@dataclass
class DeltaProductConfig:
    num_heads: int = 4
    head_dim: int = 64  # key dimension K per head
    expand_v: float = 1.0  # V = head_dim * expand_v
    num_householder: int = 2  # n_h; 1 gives GatedDeltaNet
    use_forget_gate: bool = True
    allow_neg_eigval: bool = True  # beta in (0, 2): eigenvalues in [-1, 1]
    conv_size: int = 4  # short conv on q, k, v (0 disables)
    use_output_gate: bool = True  # gated RMSNorm on the output


@dataclass
class Mamba2Config:
    d_state: int = 128
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    conv_size: int = 4
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    A_init_range: tuple[float, float] = (1.0, 16.0)
    allow_neg_eigval: bool = False  # a_t = 2 exp(dt A) - 1 in (-1, 1)
    # Tokens per fp32 chunk state the Triton scan keeps for backward (a multiple of 64): 128
    # halves that memory (~16 KiB/token/layer at the 1.3B shapes), the backward recomputes
    # the states in between. No effect on the result or on the torch path.
    ssd_state_every: int = 64


@dataclass
class RGLRUConfig:
    lru_width: int | None = None  # defaults to d_model
    num_heads: int = 4  # blocks of the block-diagonal gate linears
    conv_size: int = 4
    # Λ's initial range, uniform in a² over [0.9², 0.999²]. "paper" (Griffin, §2.4): the decay at
    # gate 1, a^c. "recurrentgemma" (its released code): the base a = exp(-softplus(Λ)), so the
    # decay at gate 1, a^8, starts in [0.43, 0.992]: shorter memories at initialisation.
    a_init: Literal["paper", "recurrentgemma"] = "paper"


@dataclass
class AttentionConfig:
    num_heads: int = 4
    num_kv_heads: int = 1  # 1 = multi-query attention
    head_dim: int | None = None  # defaults to d_model // num_heads
    window: int = 2048
    rope_theta: float = 10000.0


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    pattern: str = "D"
    mlp_type: Literal["swiglu", "geglu", "none"] = "swiglu"
    mlp_hidden: int | None = None  # None: family default (see models.mlp.default_hidden)
    mlp_expand: float = 4.0  # used when mlp_hidden is None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    embedding_scale: bool = False  # Griffin multiplies embeddings by sqrt(d_model)
    deltaproduct: DeltaProductConfig = field(default_factory=DeltaProductConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    rglru: RGLRUConfig = field(default_factory=RGLRUConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def layer_types(self) -> list[str]:
        """The mixer name of every layer, from the repeated pattern."""
        letters = (self.pattern * (self.n_layers // max(len(self.pattern), 1) + 1))[: self.n_layers]
        return [MIXER_LETTERS[c] for c in letters]

    def check(self) -> None:
        """Cross-field checks; raises ValueError("<key>: <problem and fix>")."""
        for name in ("vocab_size", "d_model", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.pattern or any(c not in MIXER_LETTERS for c in self.pattern):
            raise ValueError(
                f"pattern: {self.pattern!r} must be a non-empty string of the letters "
                f"{sorted(MIXER_LETTERS)} ({', '.join(f'{k}={v}' for k, v in MIXER_LETTERS.items())})"
            )
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden: must be >= 1 or null, got {self.mlp_hidden}")
        if self.mlp_type != "none" and self.mlp_hidden is None and not self.mlp_expand > 0:
            raise ValueError(f"mlp_expand: must be > 0 (or set mlp_hidden), got {self.mlp_expand}")
        if self.norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("norm_eps / initializer_range: must be > 0")
        used = set(self.layer_types())
        dp, m2, rg, at = self.deltaproduct, self.mamba2, self.rglru, self.attention
        if "gated_deltaproduct" in used:
            if dp.num_heads < 1 or dp.head_dim < 1 or dp.num_householder < 1:
                raise ValueError("deltaproduct.num_heads/head_dim/num_householder: must be >= 1")
            if dp.expand_v <= 0 or (dp.head_dim * dp.expand_v) % 1:
                raise ValueError("deltaproduct.expand_v: head_dim * expand_v must be a positive integer")
            if not 0 <= dp.conv_size <= 4:
                raise ValueError(f"deltaproduct.conv_size: must be in 0..4, got {dp.conv_size}")
        if "mamba2" in used:
            if m2.expand < 1 or m2.d_state < 1:
                raise ValueError(f"mamba2.expand/d_state: must be >= 1, got {m2.expand}/{m2.d_state}")
            if not 0 <= m2.dt_limit[0] <= m2.dt_limit[1]:
                raise ValueError(f"mamba2.dt_limit: need 0 <= low <= high, got {list(m2.dt_limit)}")
            inner = m2.expand * self.d_model
            if m2.head_dim < 1 or inner % m2.head_dim:
                raise ValueError(
                    f"mamba2.head_dim: expand*d_model={inner} must be divisible by head_dim={m2.head_dim}")
            if m2.n_groups < 1 or (inner // m2.head_dim) % m2.n_groups:
                raise ValueError(f"mamba2.n_groups: must divide the number of heads {inner // m2.head_dim}")
            if not 0 < m2.dt_min <= m2.dt_max:
                raise ValueError("mamba2.dt_min/dt_max: need 0 < dt_min <= dt_max")
            if not 0 < m2.A_init_range[0] <= m2.A_init_range[1]:
                raise ValueError("mamba2.A_init_range: need 0 < low <= high")
            if not 1 <= m2.conv_size <= 4:
                raise ValueError(f"mamba2.conv_size: must be in 1..4, got {m2.conv_size}")
            if m2.ssd_state_every < 64 or m2.ssd_state_every % 64:
                raise ValueError(
                    f"mamba2.ssd_state_every: must be a positive multiple of 64, got {m2.ssd_state_every}")
        if "rglru" in used:
            width = rg.lru_width or self.d_model
            if rg.num_heads < 1 or width % rg.num_heads:
                raise ValueError(f"rglru.num_heads: must divide lru_width={width}")
            if not 1 <= rg.conv_size <= 4:
                raise ValueError(f"rglru.conv_size: must be in 1..4, got {rg.conv_size}")
        if "local_attention" in used:
            hd = at.head_dim or self.d_model // max(at.num_heads, 1)
            if at.num_heads < 1 or at.num_kv_heads < 1 or at.num_heads % at.num_kv_heads:
                raise ValueError("attention.num_kv_heads: must be >= 1 and divide num_heads")
            if at.head_dim is None and self.d_model % at.num_heads:
                raise ValueError("attention.num_heads: must divide d_model (or set attention.head_dim)")
            if hd % 2:
                raise ValueError(f"attention.head_dim: must be even for RoPE, got {hd}")
            if at.window < 1:
                raise ValueError(f"attention.window: must be >= 1, got {at.window}")
            if not at.rope_theta > 0:
                raise ValueError(f"attention.rope_theta: must be > 0, got {at.rope_theta}")
