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

from ..model_config import ModelConfig
from .base import MixerCache
from .block import Block
from .layers import RMSNorm, ShortConvolution
from .packing import check_row_boundaries

LMCache = list[MixerCache]


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
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
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise every parameter (also after ``to_empty`` from the meta device).

        Linear/Embedding ~ N(0, initializer_range), biases 0, norms 1; residual-branch
        outputs (mixer ``out_proj``, MLP ``down_proj``) scaled by 1/sqrt(2 n_layers)
        (GPT-2) so the residual stream's variance does not grow with depth; then each
        mixer's own scheme. With ``embedding_scale`` (Griffin) the embedding is drawn with
        std 1/sqrt(d) so that the scaled embedding has unit variance.
        """
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, ShortConvolution):
                nn.init.kaiming_uniform_(m.weight.view(m.dim, 1, m.width), a=5**0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv1d):
                m.reset_parameters()
        emb_std = self.config.d_model**-0.5 if self.config.embedding_scale else std
        nn.init.normal_(self.embed.weight, 0.0, emb_std)
        residual_scale = 1.0 / math.sqrt(2 * max(len(self.blocks), 1))
        for block in self.blocks:
            out_proj = getattr(block.mixer, "out_proj", None)
            if isinstance(out_proj, nn.Linear):
                out_proj.weight.mul_(residual_scale)
            if block.mlp is not None:
                block.mlp.down_proj.weight.mul_(residual_scale)
        for block in self.blocks:
            reset = getattr(block.mixer, "reset_mixer_parameters", None)
            if callable(reset):
                reset()

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
        for i, block in enumerate(self.blocks):
            h = block(h, cu_seqlens=cu_seqlens, cache=cache[i] if cache is not None else None)
        return h.reshape(B, T, D)

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32)."""
        if cu_seqlens is not None:
            check_row_boundaries(cu_seqlens, *input_ids.shape)
        return self.head(self.run_blocks(self.embed_tokens(input_ids), cu_seqlens))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *,
             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over labels != -100; ``labels[b, t]`` is the target of position t.

        The caller shifts (labels = next tokens) and masks what should not be learned
        (e.g. the first token of the next packed document). An all-masked batch gives 0.
        """
        logits = self(input_ids, cu_seqlens=cu_seqlens)
        total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp_min(1)

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

    # ------------------------------------------------------------------ pipeline parallel

    def pipeline_layers(self) -> list[nn.Module]:
        """The model as a flat list for DeepSpeed's PipelineModule.

        Each layer maps a tuple ``(x, cu_seqlens)`` to ``(hidden, cu_seqlens)`` (the last to
        logits), where an empty int tensor stands for "no packing" since pipeline stages
        pass tensors only. Composition equals ``forward``. The layers share this model's
        parameters (with tied embeddings the head stage holds the embedding weight: a
        pipeline must tie them across stages, e.g. with TiedLayerSpec).
        """
        return [EmbeddingStage(self), *(BlockStage(b) for b in self.blocks), HeadStage(self)]


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


def _maybe(cu_seqlens: torch.Tensor) -> torch.Tensor | None:
    return cu_seqlens if cu_seqlens.numel() > 0 else None


class EmbeddingStage(nn.Module):
    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.embed = lm.embed
        self.embed_scale = lm.embed_scale

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, cu_seqlens = inputs
        if cu_seqlens.numel() > 0:
            check_row_boundaries(cu_seqlens, *input_ids.shape)
        h = self.embed(input_ids)
        return (h * self.embed_scale if self.embed_scale != 1.0 else h), cu_seqlens


class BlockStage(nn.Module):
    """One block on ``[B, T, d]``; flattens to ``[1, B*T, d]`` itself when packed."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, cu_seqlens = inputs
        cu = _maybe(cu_seqlens)
        shape = h.shape
        x = h.reshape(1, -1, shape[-1]) if cu is not None else h
        return self.block(x, cu_seqlens=cu).reshape(shape), cu_seqlens


class HeadStage(nn.Module):
    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.norm = lm.norm
        self.lm_head = lm.lm_head

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, _ = inputs
        return self.lm_head(self.norm(h)).float()
