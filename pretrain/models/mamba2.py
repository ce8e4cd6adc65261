"""Mamba2 mixer (Dao & Gu, 2024) on the ``kernels.ssd`` scan.

Layout follows mamba_ssm's ``Mamba2``: one input projection to (z, x, B, C, dt), a
depthwise causal conv + SiLU over (x, B, C), the SSD scan with a D skip, then
``RMSNorm(y * SiLU(z))`` normalised per group, and ``out_proj``. ``allow_neg_eigval``
(Grazzi et al., 2025) widens each head's decay from (0, 1) to (-1, 1), which lets the
layer track parity-like state.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from ..model_config import ModelConfig
from .base import MixerCache, check_cache_or_packed
from .layers import GatedRMSNorm, ShortConvolution




class Mamba2(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.mamba2
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.d_inner = cfg.expand * config.d_model
        if self.d_inner % cfg.head_dim != 0:
            raise ValueError(
                f"mamba2: expand * d_model = {self.d_inner} must be divisible by "
                f"mamba2.head_dim = {cfg.head_dim}"
            )
        self.head_dim = cfg.head_dim
        self.num_heads = self.d_inner // cfg.head_dim
        self.n_groups, self.d_state = cfg.n_groups, cfg.d_state
        if self.num_heads % self.n_groups != 0:
            raise ValueError(
                f"mamba2: number of heads {self.num_heads} must be divisible by "
                f"mamba2.n_groups = {self.n_groups}"
            )
        self.dt_min, self.dt_max, self.dt_init_floor = cfg.dt_min, cfg.dt_max, cfg.dt_init_floor
        self.dt_limit = tuple(cfg.dt_limit)
        self.A_init_range = tuple(cfg.A_init_range)
        self.allow_neg_eigval = cfg.allow_neg_eigval
        self.ssd_state_every = cfg.ssd_state_every

        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(self.d_model, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        # conv_size 0 keeps the SiLU but drops the conv (an ablation knob).
        self.conv = ShortConvolution(self.conv_dim, cfg.conv_size, "silu", bias=True) if cfg.conv_size > 0 else None
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]  # mamba_ssm's convention
        self.norm = GatedRMSNorm(self.d_inner, eps=config.norm_eps, group=self.d_inner // self.n_groups,
                                 gate_first=True)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        """SSM-specific init: dt log-uniform in [dt_min, dt_max], A ~ U(A_init_range), D = 1."""
        dev = self.dt_bias.device
        u = torch.rand(self.num_heads, device=dev, dtype=torch.float64)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        # inverse softplus: softplus(dt + log(1 - exp(-dt))) == dt
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        lo, hi = self.A_init_range
        self.A_log.copy_(torch.empty(self.num_heads, device=dev, dtype=torch.float64).uniform_(lo, hi).log())
        self.D.fill_(1.0)
        if self.conv is not None and self.conv.bias is not None:
            self.conv.bias.zero_()

    def activation_bytes_per_token(self, elem: int, seq_len: int) -> float:
        """Bytes per token kept for backward (``elem``: bytes of an activation element).

        The input; the conv's input (x, B, C); z; the scan's copies of x, B, C; the scan
        output and the output projection's input; dt (2 fp32); and the scan's fp32 chunk
        states, one ``[H, P, N]`` per ``ssd_state_every`` tokens plus one per sequence (per
        document when packed; counted here as one per row of ``seq_len`` tokens).
        """
        GN = self.n_groups * self.d_state
        conv_in = self.conv_dim if self.conv is not None else self.d_inner + self.conv_dim + self.num_heads
        half = elem * (self.d_model + conv_in + 4 * self.d_inner + 2 * GN)
        dt = 2 + (1 if self.dt_limit[0] > 0.0 or self.dt_limit[1] < float("inf") else 0)
        fp32 = 4 * (dt * self.num_heads + self.n_groups)
        states = 4 * self.num_heads * self.head_dim * self.d_state * (1 / self.ssd_state_every + 1 / max(seq_len, 1))
        return half + fp32 + states

    # ---------------------------------------------------------------- helpers
    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)  # type: ignore[return-value]

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        lo, hi = self.dt_limit
        if lo > 0.0 or hi < float("inf"):
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``RMSNorm(y * SiLU(z))`` over each group's channels, as in mamba_ssm (gate first).

        z is a slice of the input projection; a contiguous copy is saved for backward so the
        whole projection output is not kept alive.
        """
        return self.norm(y, z.contiguous())

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: MixerCache | None = None,
    ) -> torch.Tensor:
        check_cache_or_packed("mamba2", cache, cu_seqlens)
        Bsz, T, _ = x.shape
        z, xBC, dt_raw = self._split(self.in_proj(x))
        if self.conv is not None:
            xBC = self.conv(xBC, cu_seqlens=cu_seqlens, cache=cache)
        else:
            xBC = F.silu(xBC)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        y, final = kernels.ssd(
            xs.reshape(Bsz, T, self.num_heads, self.head_dim),
            self._dt(dt_raw),
            self._A(),
            Bm.reshape(Bsz, T, self.n_groups, self.d_state),
            Cm.reshape(Bsz, T, self.n_groups, self.d_state),
            D=self.D,
            allow_neg_eigval=self.allow_neg_eigval,
            initial_state=cache["ssm"] if cache is not None else None,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
            save_state_every=self.ssd_state_every,
        )
        if cache is not None:
            cache["ssm"].copy_(final)
        return self.out_proj(self._gated_norm(y.reshape(Bsz, T, self.d_inner), z))

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixerCache:
        """Conv window and SSM state, both fp32 (the state is accumulated in fp32)."""
        cache = {"ssm": torch.zeros(batch_size, self.num_heads, self.head_dim, self.d_state,
                                    device=device, dtype=torch.float32)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_state(batch_size, device, dtype)
        return cache

    def step(self, x: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        """One token ``[B, d_model]``: the recurrence of ``ssd`` written out for T = 1."""
        Bsz = x.shape[0]
        z, xBC, dt_raw = self._split(self.in_proj(x))
        xBC = self.conv.step(xBC, cache) if self.conv is not None else F.silu(xBC)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        rep = self.num_heads // self.n_groups
        xs = xs.float().reshape(Bsz, self.num_heads, self.head_dim)
        Bm = Bm.float().reshape(Bsz, self.n_groups, self.d_state).repeat_interleave(rep, dim=1)
        Cm = Cm.float().reshape(Bsz, self.n_groups, self.d_state).repeat_interleave(rep, dim=1)
        dt = self._dt(dt_raw)  # [B, H]
        a = torch.exp(dt * self._A())
        if self.allow_neg_eigval:
            a = 2.0 * a - 1.0
        h = a[:, :, None, None] * cache["ssm"] + (dt[:, :, None] * xs)[:, :, :, None] * Bm[:, :, None, :]
        cache["ssm"].copy_(h)
        y = torch.einsum("bhpn,bhn->bhp", h, Cm) + self.D.float()[:, None] * xs
        return self.out_proj(self._gated_norm(y.reshape(Bsz, self.d_inner).to(x.dtype), z))
