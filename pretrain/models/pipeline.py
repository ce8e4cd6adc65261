"""The LM as a flat list of layers, for pipeline parallelism (plain modules, no DeepSpeed).

``[EmbeddingLayer, BlockLayer 0 .. n-1, FinalNormLayer, head]``, where the head is either
``HeadLayer`` (untied) or the embedding layer again, applied by ``tied_head`` (a pipeline
engine keeps the two copies equal, e.g. DeepSpeed's ``TiedLayerSpec``). Each layer maps
what the previous one returns; between stages only tensors travel, so "not packed" is an
empty ``cu_seqlens``. Composition equals ``LanguageModel.forward``.

Every layer builds and initialises itself from ``(config, base_seed)`` alone (see
``init.py``; where and in which dtype: a ``Placement``, ``materialize.py``), so a stage
that builds only its own layers gets exactly the weights
``LanguageModel(config, init_seed=base_seed)`` has; and parameter names inside a layer are
the LM's minus a prefix (``lm_key``), so saved layers map back onto the LM.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model_config import ModelConfig
from .block import Block
from .init import init_block, init_embedding, init_head
from .layers import RMSNorm
from .materialize import HOST, Placement, materialize
from .packing import check_row_boundaries

Activation = tuple[torch.Tensor, torch.Tensor]  # (hidden [B, T, d], cu_seqlens or empty)


def _packed(cu_seqlens: torch.Tensor) -> torch.Tensor | None:
    return cu_seqlens if cu_seqlens.numel() > 0 else None


class EmbeddingLayer(nn.Module):
    """(input_ids [B, T], cu_seqlens) -> (hidden, cu_seqlens)."""

    def __init__(self, config: ModelConfig, base_seed: int, place: Placement = HOST):
        super().__init__()
        with torch.device("meta"):
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_scale = math.sqrt(config.d_model) if config.embedding_scale else 1.0
        materialize(self, place, lambda m: init_embedding(m.embed, config, base_seed))

    def forward(self, inputs: Activation) -> Activation:
        input_ids, cu_seqlens = inputs
        if cu_seqlens.numel() > 0:
            check_row_boundaries(cu_seqlens, *input_ids.shape)
        h = self.embed(input_ids)
        return (h * self.embed_scale if self.embed_scale != 1.0 else h), cu_seqlens


def tied_head(layer: EmbeddingLayer, h: torch.Tensor) -> torch.Tensor:
    """The output projection with the embedding's weight; logits in fp32."""
    return F.linear(h, layer.embed.weight).float()


class BlockLayer(Block):
    """One block on ``[B, T, d]``; flattens to ``[1, B*T, d]`` itself when packed."""

    def __init__(self, config: ModelConfig, layer_idx: int, base_seed: int, place: Placement = HOST):
        with torch.device("meta"):
            super().__init__(config, layer_idx, config.layer_types()[layer_idx])
        materialize(self, place, lambda m: init_block(m, config, base_seed))

    def forward(self, inputs: Activation) -> Activation:  # type: ignore[override]
        h, cu_seqlens = inputs
        cu = _packed(cu_seqlens)
        shape = h.shape
        x = h.reshape(1, -1, shape[-1]) if cu is not None else h
        return super().forward(x, cu_seqlens=cu).reshape(shape), cu_seqlens


class FinalNormLayer(nn.Module):
    def __init__(self, config: ModelConfig, place: Placement = HOST):
        super().__init__()
        with torch.device("meta"):
            self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        materialize(self, place, lambda m: init_head(m.norm, None, config, 0))

    def forward(self, inputs: Activation) -> torch.Tensor:
        return self.norm(inputs[0])


class HeadLayer(nn.Module):
    """Untied output projection; logits in fp32."""

    def __init__(self, config: ModelConfig, base_seed: int, place: Placement = HOST):
        super().__init__()
        with torch.device("meta"):
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        materialize(self, place, lambda m: init_head(None, m.lm_head, config, base_seed))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()


def lm_key(layer_index: int, name: str, config: ModelConfig) -> str:
    """The ``LanguageModel`` parameter name of parameter ``name`` of pipeline layer ``layer_index``."""
    if 1 <= layer_index <= config.n_layers:
        return f"blocks.{layer_index - 1}.{name}"
    return name


def layer_param_counts(config: ModelConfig, model: nn.Module | None = None) -> list[int]:
    """Each pipeline layer's parameters as DeepSpeed's partitioner counts them (a tied head as
    a second embedding), taken on the meta device (or from ``model``, the LM already built
    there): nothing allocated, nothing drawn."""
    from . import build_model

    model = model if model is not None else build_model(config, device="meta")

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    head = count(model.embed) if config.tie_embeddings else count(model.lm_head)
    return [count(model.embed), *(count(block) for block in model.blocks), count(model.norm), head]


def build_pipeline_layers(config: ModelConfig, base_seed: int, place: Placement = HOST) -> list[nn.Module]:
    """Every layer, built here (tests, single process); a pipeline engine builds its own share."""
    emb = EmbeddingLayer(config, base_seed, place)
    layers: list[nn.Module] = [emb, *(BlockLayer(config, i, base_seed, place) for i in range(config.n_layers)),
                               FinalNormLayer(config, place)]
    if config.tie_embeddings:
        layers.append(_TiedHead(emb))
    else:
        layers.append(HeadLayer(config, base_seed, place))
    return layers


class _TiedHead(nn.Module):
    def __init__(self, emb: EmbeddingLayer):
        super().__init__()
        self.emb = [emb]  # a list: not a submodule, the weight belongs to the embedding layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return tied_head(self.emb[0], h)
