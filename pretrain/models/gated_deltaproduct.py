"""GatedDeltaProduct mixer (Siems et al. 2025); GatedDeltaNet is ``num_householder == 1``.

Per token: one query, ``n_h`` keys/values/betas; the state first decays by ``exp(g)`` and
then takes ``n_h`` generalised Householder steps (``kernels.gated_delta_product``).
Keys and queries are L2-normalised so each step ``I - beta k k^T`` has eigenvalues in
``[1 - beta, 1]``: beta in (0, 1), or (0, 2) with ``allow_neg_eigval`` (state tracking).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from ..model_config import ModelConfig
from .base import MixerCache, check_cache_or_packed
from .layers import GatedRMSNorm, RMSNorm, ShortConvolution
from .lean_autograd import l2_normalize


class GatedDeltaProduct(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config.deltaproduct
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.num_heads, self.head_k = c.num_heads, c.head_dim
        self.head_v = int(c.head_dim * c.expand_v)
        if self.head_v <= 0 or c.num_householder < 1:
            raise ValueError("deltaproduct: head_dim * expand_v and num_householder must be >= 1")
        self.n_h = c.num_householder
        self.allow_neg_eigval = c.allow_neg_eigval
        self.use_forget_gate = c.use_forget_gate
        self.use_output_gate = c.use_output_gate
        self.scale = self.head_k**-0.5
        H, K, V, n_h, D = self.num_heads, self.head_k, self.head_v, self.n_h, config.d_model
        self.key_dim, self.value_dim = H * K, H * V

        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, n_h * H * K, bias=False)
        self.v_proj = nn.Linear(D, n_h * H * V, bias=False)
        self.b_proj = nn.Linear(D, n_h * H, bias=False)
        if self.use_forget_gate:
            self.a_proj = nn.Linear(D, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
            self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        self.conv_size = c.conv_size
        if self.conv_size > 0:
            self.q_conv = ShortConvolution(H * K, c.conv_size, activation="silu")
            self.k_conv = ShortConvolution(n_h * H * K, c.conv_size, activation="silu")
            self.v_conv = ShortConvolution(n_h * H * V, c.conv_size, activation="silu")
        if self.use_output_gate:
            self.g_proj = nn.Linear(D, H * V, bias=False)
            self.o_norm: RMSNorm = GatedRMSNorm(V, eps=config.norm_eps)
        else:
            self.o_norm = RMSNorm(V, eps=config.norm_eps)
        self.out_proj = nn.Linear(H * V, D, bias=False)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        """fla / Mamba2 init: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1] stored as softplus^-1."""
        if not self.use_forget_gate or self.A_log.is_meta:
            return
        A = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0, 16)
        self.A_log.copy_(torch.log(A))
        dt_min, dt_max, floor = 1e-3, 0.1, 1e-4
        u = torch.rand_like(self.dt_bias, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def activation_bytes_per_token(self, elem: int, seq_len: int) -> float:
        """Bytes per token kept for backward (``elem``: bytes of an activation element).

        The input (shared by the projections); the q/k/v projections (the conv's input);
        q, k after the L2 norm (also the kernel's q, k) and v; the o-norm's input and gate
        and the output projection's input; beta (the sigmoid's fp32 output, which the kernel
        also keeps); the log gate (3 fp32 tensors); fp32 rstds. The kernel keeps no chunk states.
        """
        H, K, V, n = self.num_heads, self.head_k, self.head_v, self.n_h
        half = elem * (self.d_model + 2 * H * K * (1 + n) + 2 * n * H * V
                       + H * V * (3 if self.use_output_gate else 2))
        fp32 = 4 * (H * (1 + n) + n * H + H + (3 * H if self.use_forget_gate else 0))
        return half + fp32

    # ------------------------------------------------------------------ shared pieces

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """beta [..., n_h, H] and the log forget gate g [..., H] (fp32, <= 0) or None."""
        beta = torch.sigmoid(self.b_proj(x).float()).unflatten(-1, (self.n_h, self.num_heads))
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = None
        if self.use_forget_gate:
            g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return beta, g

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head (gated) RMSNorm, then the output projection. o [..., H, V]."""
        if self.use_output_gate:
            gate = self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v))
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        return self.out_proj(o.flatten(-2).to(x.dtype))

    # ------------------------------------------------------------------ Mixer contract

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: MixerCache | None = None) -> torch.Tensor:
        check_cache_or_packed("GatedDeltaProduct", cache, cu_seqlens)
        B, T, _ = x.shape
        H, K, V, n_h = self.num_heads, self.head_k, self.head_v, self.n_h
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv_size > 0:
            q = self.q_conv(q, cu_seqlens=cu_seqlens, cache=cache, key="conv_q")
            k = self.k_conv(k, cu_seqlens=cu_seqlens, cache=cache, key="conv_k")
            v = self.v_conv(v, cu_seqlens=cu_seqlens, cache=cache, key="conv_v")
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = l2_normalize(q.view(B, T, H, K))
        k = l2_normalize(k.view(B, T, n_h, H, K))
        v = v.view(B, T, n_h, H, V)
        beta, g = self._gates(x)
        o, final = kernels.gated_delta_product(
            q, k, v, beta, g, scale=self.scale,  # beta in fp32, as the step path uses it (the kernels read any dtype)
            initial_state=cache["state"] if cache is not None else None,
            output_final_state=cache is not None, cu_seqlens=cu_seqlens,
        )
        if cache is not None:
            cache["state"].copy_(final)
        return self._output(o, x)

    def init_cache(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> MixerCache:
        device = device if device is not None else self.out_proj.weight.device
        dtype = dtype if dtype is not None else self.out_proj.weight.dtype
        cache: MixerCache = {
            "state": torch.zeros(batch_size, self.num_heads, self.head_k, self.head_v,
                                 device=device, dtype=torch.float32),
        }
        if self.conv_size > 0:
            cache["conv_q"] = self.q_conv.init_state(batch_size, device, dtype)
            cache["conv_k"] = self.k_conv.init_state(batch_size, device, dtype)
            cache["conv_v"] = self.v_conv.init_state(batch_size, device, dtype)
        return cache

    def step(self, x: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        """One token x [B, D]: the op's recurrence applied directly to the cached state."""
        B = x.shape[0]
        H, K, V, n_h = self.num_heads, self.head_k, self.head_v, self.n_h
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv_size > 0:
            q = self.q_conv.step(q, cache, key="conv_q")
            k = self.k_conv.step(k, cache, key="conv_k")
            v = self.v_conv.step(v, cache, key="conv_v")
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = l2_normalize(q.view(B, H, K)).float()
        k = l2_normalize(k.view(B, n_h, H, K)).float()
        v = v.view(B, n_h, H, V).float()
        beta, g = self._gates(x)
        S = cache["state"]
        if g is not None:
            S = S * g.exp()[:, :, None, None]
        for j in range(n_h):
            kj = k[:, j]
            err = v[:, j] - torch.einsum("bhk,bhkv->bhv", kj, S)
            S = S + beta[:, j, :, None, None] * kj[..., :, None] * err[..., None, :]
        cache["state"].copy_(S)
        o = self.scale * torch.einsum("bhk,bhkv->bhv", q, S)
        return self._output(o.to(x.dtype), x)
