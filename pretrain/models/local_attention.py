"""Sliding-window causal multi-query / grouped-query attention with RoPE (Griffin's local attention).

Token t attends to positions ``max(doc_start, t - window + 1) .. t``. The parallel path is
blockwise and exact: queries are cut into blocks of ``min(window, T)`` tokens and each block
attends to its own keys plus the ``window - 1`` keys before it, under a mask that encodes
the window, causality and document boundaries. Cost is O(T · window) rather than O(T²),
through ``scaled_dot_product_attention``.

Decoding keeps the last ``window - 1`` keys/values (after RoPE, oldest first) and the
number of tokens seen per sequence; the next token attends to those plus itself, so a
one-token ``forward`` with the cache is the step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model_config import ModelConfig
from .base import MixerCache, check_cache_or_packed

_PAD_DOC, _EMPTY_DOC = -2, -1  # doc ids of block padding and of not-yet-filled cache slots


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[..., head_dim // 2]`` for integer positions (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv_freq
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of ``x [B, T, heads, head_dim]``; cos/sin ``[B, T, head_dim/2]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class LocalAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.attention
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"attention: num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}"
            )
        self.head_dim = cfg.head_dim or config.d_model // cfg.num_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"attention: head_dim must be even for RoPE, got {self.head_dim}")
        if cfg.window < 1:
            raise ValueError(f"attention: window must be >= 1, got {cfg.window}")
        self.window, self.rope_theta = cfg.window, cfg.rope_theta
        self.q_proj = nn.Linear(self.d_model, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, self.d_model, bias=False)

    def reset_mixer_parameters(self) -> None:
        """Nothing beyond the LM's generic Linear init: attention has no special parameters."""

    def activation_bytes_per_token(self, elem: int, seq_len: int) -> float:
        """Bytes per token kept for backward (``elem``: bytes of an activation element).

        The input; attention's q, the blocked keys and values (each block of ``bs`` queries
        sees ``span`` keys, repeated to every query head for MQA/GQA), its output and fp32
        log-sum-exp, and the mask as an additive bias of ``span`` per query; RoPE's fp32
        cos/sin; the output projection's input. Memory-efficient attention on a GPU keeps the
        same set.
        """
        H, hd, w, T = self.num_heads, self.head_dim, self.window, max(seq_len, 1)
        bs = min(w, T)
        nb = -(-T // bs)
        span = bs + (w - 1 if T > w else 0)
        padded = nb * bs / T  # the last query block is padded to bs
        copy = H * hd if nb * bs != T else 0  # the padded output is sliced, then copied for out_proj
        half = elem * (self.d_model + padded * (2 * H * hd + span) + 2 * H * hd * nb * span / T + copy)
        return half + 4 * (H * padded + hd)

    # ---------------------------------------------------------------- helpers
    def _doc_and_pos(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None,
                     start: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token document id and RoPE position, ``[B, T]`` each."""
        Bsz, T, _ = x.shape
        ar = torch.arange(T, device=x.device)
        if cu_seqlens is not None:
            cs = cu_seqlens.to(device=x.device, dtype=torch.long)
            doc = torch.repeat_interleave(torch.arange(cs.numel() - 1, device=x.device), cs[1:] - cs[:-1],
                                          output_size=T)  # sized here, not by a read back from the GPU
            return doc[None], (ar - cs[doc])[None]
        doc = torch.zeros(Bsz, T, dtype=torch.long, device=x.device)
        pos = ar[None].expand(Bsz, T) if start is None else start[:, None] + ar[None]
        return doc, pos

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_doc: torch.Tensor,
                k_doc: torch.Tensor, prefix: int) -> torch.Tensor:
        """Blockwise windowed attention.

        q ``[B, T, H, hd]``; k, v ``[B, prefix + T, KV, hd]`` whose first ``prefix`` rows
        precede the queries in time; q_doc ``[B, T]``, k_doc ``[B, prefix + T]``.
        Returns ``[B, T, H, hd]``.
        """
        Bsz, T, H, hd = q.shape
        w = self.window
        bs = max(min(w, T), 1)
        nb = -(-T // bs)
        pad = nb * bs - T
        span = bs + prefix  # keys seen by one query block
        if pad:
            q = F.pad(q, (0, 0, 0, 0, 0, pad))
            k, v = F.pad(k, (0, 0, 0, 0, 0, pad)), F.pad(v, (0, 0, 0, 0, 0, pad))
            q_doc = F.pad(q_doc, (0, pad), value=_PAD_DOC)
            k_doc = F.pad(k_doc, (0, pad), value=_PAD_DOC)
        # [B, nb, span, KV, hd] -> [B*nb, KV, span, hd]
        kb = k.unfold(1, span, bs).permute(0, 1, 4, 2, 3).reshape(Bsz * nb, span, -1, hd).transpose(1, 2)
        vb = v.unfold(1, span, bs).permute(0, 1, 4, 2, 3).reshape(Bsz * nb, span, -1, hd).transpose(1, 2)
        qb = q.reshape(Bsz * nb, bs, H, hd).transpose(1, 2)
        rep = H // kb.shape[1]
        if rep > 1:
            kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        # Mask in the queries' time frame: query i*bs + r, key i*bs + c - prefix.
        q_time = torch.arange(nb * bs, device=q.device).view(nb, bs)
        k_time = (torch.arange(prefix + nb * bs, device=q.device) - prefix).unfold(0, span, bs)
        dt = q_time[:, :, None] - k_time[:, None, :]  # [nb, bs, span]
        in_window = (dt >= 0) & (dt < w)
        same_doc = q_doc.view(Bsz, nb, bs)[..., None] == k_doc.unfold(1, span, bs)[:, :, None, :]
        mask = (same_doc & in_window).reshape(Bsz * nb, 1, bs, span)
        o = F.scaled_dot_product_attention(qb, kb.to(qb.dtype), vb.to(qb.dtype), attn_mask=mask)
        return o.transpose(1, 2).reshape(Bsz, nb * bs, H, hd)[:, :T]

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: MixerCache | None = None,
    ) -> torch.Tensor:
        check_cache_or_packed("local_attention", cache, cu_seqlens)
        Bsz, T, _ = x.shape
        start = cache["pos"] if cache is not None else None
        q_doc, pos = self._doc_and_pos(x, cu_seqlens, start)
        cos, sin = rope_angles(pos, self.head_dim, self.rope_theta)
        q = apply_rope(self.q_proj(x).view(Bsz, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(Bsz, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(Bsz, T, self.num_kv_heads, self.head_dim)
        if cache is None:
            # Without a cache the first block has nothing before it; later blocks need w-1 keys.
            prefix = self.window - 1 if T > self.window else 0
            k_all = F.pad(k, (0, 0, 0, 0, prefix, 0))
            v_all = F.pad(v, (0, 0, 0, 0, prefix, 0))
            k_doc = F.pad(q_doc, (prefix, 0), value=_EMPTY_DOC)
        else:
            prefix = self.window - 1
            k_all = torch.cat([cache["k"].to(k.dtype), k], dim=1)
            v_all = torch.cat([cache["v"].to(v.dtype), v], dim=1)
            slot_pos = start[:, None] + torch.arange(-prefix, 0, device=x.device)[None]
            k_doc = torch.cat([torch.where(slot_pos >= 0, 0, _EMPTY_DOC), q_doc], dim=1)
            cache["k"].copy_(k_all[:, k_all.shape[1] - prefix:])
            cache["v"].copy_(v_all[:, v_all.shape[1] - prefix:])
            cache["pos"].add_(T)
        o = self._attend(q, k_all, v_all, q_doc, k_doc, prefix)
        return self.out_proj(o.reshape(Bsz, T, self.num_heads * self.head_dim))

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixerCache:
        """Last ``window - 1`` keys/values ``[B, window-1, KV, hd]`` and tokens seen ``[B]``."""
        shape = (batch_size, self.window - 1, self.num_kv_heads, self.head_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.zeros(batch_size, device=device, dtype=torch.long),
        }

    def step(self, x: torch.Tensor, cache: MixerCache) -> torch.Tensor:
        """One token ``[B, d_model]`` attends to the cached window and itself."""
        return self.forward(x[:, None], cache=cache)[:, 0]
