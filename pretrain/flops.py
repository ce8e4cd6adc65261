"""Model FLOPs per token, per mixer family, for MFU.

Why not ``6 N``: the attention formula (``6N + 12 L d T``) says nothing about a
recurrence, whose sequence-mixing cost grows with the state size, not with the context.
Each family below counts its own work from the config:

* projections and the head: ``2 * fan_in * fan_out`` per token per matrix (multiply-add);
* short causal convolutions: ``2 * width`` per channel per token;
* sequence mixing: the recurrent form's arithmetic per token (the minimal, kernel-agnostic
  count, so a chunked kernel that does extra intra-chunk work cannot inflate MFU);
  local attention: ``QK^T`` and ``AV`` over the mean attended span of a causal window.

Norms, activations and gates are elementwise and left out (as in the usual counts).
Training is forward + backward = 3x the forward (the backward costs two forwards).
"""
from __future__ import annotations

from dataclasses import dataclass

from .model_config import ModelConfig
from .models.mlp import default_hidden


def _lin(fan_in: int, fan_out: int) -> int:
    return 2 * fan_in * fan_out


def _conv(channels: int, width: int) -> int:
    return 2 * channels * width if width > 0 else 0


def gated_deltaproduct_flops(cfg: ModelConfig) -> int:
    """Projections q, k, v (n_h keys/values per token), beta, gate, output gate, out_proj;
    then per head and token: decay ``S *= a`` (KV), ``n_h`` Householder steps
    ``S += beta k (v - S^T k)^T`` (S^T k: 2KV, rank-1 update: 2KV, plus KV for the
    difference and scaling), and the readout ``S^T q`` (2KV)."""
    c, D = cfg.deltaproduct, cfg.d_model
    H, K, n = c.num_heads, c.head_dim, c.num_householder
    V = int(K * c.expand_v)
    proj = _lin(D, H * K) + _lin(D, n * H * K) + _lin(D, n * H * V) + _lin(D, n * H) + _lin(H * V, D)
    if c.use_forget_gate:
        proj += _lin(D, H)
    if c.use_output_gate:
        proj += _lin(D, H * V)
    conv = _conv(H * K, c.conv_size) + _conv(n * H * K, c.conv_size) + _conv(n * H * V, c.conv_size)
    recur = H * (K * V * (1 if c.use_forget_gate else 0) + n * 5 * K * V + 2 * K * V)
    return proj + conv + recur


def mamba2_flops(cfg: ModelConfig) -> int:
    """in_proj (z, x, B, C, dt), conv over x/B/C, out_proj; per head and token the SSD
    recurrence ``h = a h + dt x B^T`` (3PN) and readout ``y = h C`` (2PN), plus ``D x``."""
    c, D = cfg.mamba2, cfg.d_model
    inner = c.expand * D
    H, P, N = inner // c.head_dim, c.head_dim, c.d_state
    conv_dim = inner + 2 * c.n_groups * N
    proj = _lin(D, inner + conv_dim + H) + _lin(inner, D)
    return proj + _conv(conv_dim, c.conv_size) + H * (5 * P * N + P)


def rglru_flops(cfg: ModelConfig) -> int:
    """Griffin's recurrent block: two input branches, conv, two block-diagonal gates, the
    diagonal recurrence ``h = a h + sqrt(1 - a^2) (i x)`` (~6 ops per channel), out_proj."""
    c, D = cfg.rglru, cfg.d_model
    W = c.lru_width or D
    blockdiag = 2 * W * (W // c.num_heads)
    return 2 * _lin(D, W) + _conv(W, c.conv_size) + 2 * blockdiag + 6 * W + _lin(W, D)


def mean_window(seq_len: int, window: int) -> float:
    """Mean number of keys a query sees under a causal sliding window of ``window`` tokens."""
    w = min(window, seq_len)
    # positions 0..w-1 see 1..w keys; the remaining seq_len - w positions see w each
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def local_attention_flops(cfg: ModelConfig, seq_len: int) -> int:
    """q/k/v/o projections (multi-query: few kv heads) and QK^T + AV over the mean span."""
    c, D = cfg.attention, cfg.d_model
    hd = c.head_dim or D // c.num_heads
    proj = _lin(D, c.num_heads * hd) + 2 * _lin(D, c.num_kv_heads * hd) + _lin(c.num_heads * hd, D)
    return int(proj + 2 * 2 * c.num_heads * hd * mean_window(seq_len, c.window))


def mlp_flops(cfg: ModelConfig) -> int:
    """Gated MLP (SwiGLU/GeGLU): gate, up, down."""
    if cfg.mlp_type == "none":
        return 0
    F = default_hidden(cfg)
    return 3 * _lin(cfg.d_model, F)


def head_flops(cfg: ModelConfig) -> int:
    """The output projection to the vocabulary (the embedding lookup is free)."""
    return _lin(cfg.d_model, cfg.vocab_size)


def mixer_flops(name: str, cfg: ModelConfig, seq_len: int) -> int:
    if name == "gated_deltaproduct":
        return gated_deltaproduct_flops(cfg)
    if name == "mamba2":
        return mamba2_flops(cfg)
    if name == "rglru":
        return rglru_flops(cfg)
    if name == "local_attention":
        return local_attention_flops(cfg, seq_len)
    raise ValueError(f"no FLOP count for mixer {name!r}")


@dataclass
class FlopBreakdown:
    mixers: dict[str, int]  # forward FLOPs per token summed over the layers of each family
    mlp: int
    head: int

    @property
    def forward(self) -> int:
        return sum(self.mixers.values()) + self.mlp + self.head

    @property
    def train(self) -> int:
        """Forward + backward FLOPs per token."""
        return 3 * self.forward


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopBreakdown:
    mixers: dict[str, int] = {}
    for name in cfg.layer_types():
        mixers[name] = mixers.get(name, 0) + mixer_flops(name, cfg, seq_len)
    return FlopBreakdown(mixers, cfg.n_layers * mlp_flops(cfg), head_flops(cfg))


# Dense peak FLOP/s per device, for MFU. CPU has no meaningful peak: MFU is reported as None.
PEAK_FLOPS = {"bf16": {"H100": 989e12, "H200": 989e12, "A100": 312e12},
              "fp32": {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}}


def device_peak_flops(precision: str) -> float | None:
    """Peak dense FLOP/s of this process's GPU for ``precision``, if it is a known model."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    table = PEAK_FLOPS["fp32" if precision == "fp32" else "bf16"]
    for key, peak in table.items():
        if key in name:
            return peak
    return None
