"""The language model: embedding -> blocks (from the pattern) -> final RMSNorm -> head.

Packed documents: ``cu_seqlens`` are offsets over the flattened ``B*T`` tokens; every row
boundary must be one of them, so no state crosses rows. The blocks then run on
``[1, B*T, d]``. Decoding uses each mixer's cache (``prefill`` then ``step``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.varlen import offsets_read_once

from ..model_config import ModelConfig
from .base import MixerCache
from .block import Block
from .init import draw_base_seed, init_block, init_embedding, init_head
from .layers import RMSNorm
from .packing import check_row_boundaries

LMCache = list[MixerCache]


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, init_seed: int | None = None):
        super().__init__()
        self.config = config
        D, V = config.d_model, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(config, i, name) for i, name in enumerate(config.layer_types()))
        self.norm = RMSNorm(D, eps=config.norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.embed_scale = math.sqrt(D) if config.embedding_scale else 1.0
        if not self.embed.weight.is_meta:  # meta: counting only, or to_empty() + init_weights() later
            self.init_weights(init_seed)

    @torch.no_grad()
    def init_weights(self, base_seed: int | None = None) -> None:
        """Re-initialise every parameter (also after ``to_empty`` from the meta device).

        The scheme and why each part has its own seed: ``init.py``. ``base_seed`` None draws
        one from the global RNG, so ``torch.manual_seed`` before building fixes the weights.
        """
        base = draw_base_seed() if base_seed is None else base_seed
        if self.config.tie_embeddings and self.lm_head.weight is not self.embed.weight:
            self.lm_head.weight = self.embed.weight  # ``to_empty`` unties shared parameters
        init_embedding(self.embed, self.config, base)
        for block in self.blocks:
            init_block(block, self.config, base)
        init_head(self.norm, None if self.config.tie_embeddings else self.lm_head, self.config, base)

    # ------------------------------------------------------------------ training path

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return h * self.embed_scale if self.embed_scale != 1.0 else h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection; logits in fp32 for a stable softmax."""
        return self.lm_head(self.norm(h)).float()

    def run_blocks(self, h: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   cache: LMCache | None = None) -> torch.Tensor:
        B, T, D = h.shape
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("LanguageModel: cu_seqlens (packed training) and cache (decoding) exclude each other")
            h = h.reshape(1, B * T, D)
        with offsets_read_once(cu_seqlens):
            for i, block in enumerate(self.blocks):
                h = block(h, cu_seqlens=cu_seqlens, cache=cache[i] if cache is not None else None)
        return h.reshape(B, T, D)

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32)."""
        with offsets_read_once(cu_seqlens):  # one host read of the offsets for every op
            if cu_seqlens is not None:
                check_row_boundaries(cu_seqlens, *input_ids.shape)
            return self.head(self.run_blocks(self.embed_tokens(input_ids), cu_seqlens))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *,
             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over labels != -100; ``labels[b, t]`` is the target of position t.

        The caller shifts (labels = next tokens) and masks what should not be learned
        (e.g. the first token of the next packed document). An all-masked batch gives 0.
        """
        return token_loss(self(input_ids, cu_seqlens=cu_seqlens), labels)

    # ------------------------------------------------------------------ decoding

    def init_cache(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> LMCache:
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        return [block.mixer.init_cache(batch_size, device, dtype) for block in self.blocks]

    def prefill(self, input_ids: torch.Tensor, cache: LMCache) -> torch.Tensor:
        """Parallel forward over a prompt that also leaves every mixer's state in ``cache``."""
        return self.head(self.run_blocks(self.embed_tokens(input_ids), cache=cache))

    def step(self, token_ids: torch.Tensor, cache: LMCache) -> torch.Tensor:
        """One token per sequence: token_ids [B] -> logits [B, vocab] (fp32)."""
        h = self.embed_tokens(token_ids)
        for block, c in zip(self.blocks, cache):
            h = block.step(h, c)
        return self.head(h)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt [B, T] -> [B, T + n] with n <= max_new_tokens; temperature 0 is greedy.

        A row that has produced ``eos_id`` keeps emitting it; decoding stops early once
        every row has.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"generate: input_ids must be [B, T] with T >= 1, got {list(input_ids.shape)}")
        cache = self.init_cache(input_ids.shape[0])
        logits = self.prefill(input_ids, cache)[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = [input_ids]
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, generator)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done |= tok == eos_id
            out.append(tok[:, None])
            if (eos_id is not None and bool(done.all())) or i == max_new_tokens - 1:
                break
            logits = self.step(tok, cache)
        return torch.cat(out, dim=1)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] over labels != -100 (0 when all are masked)."""
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp_min(1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]; temperature <= 0 means argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
