"""Model construction: ``build_model`` and a parameter count that allocates nothing."""
from __future__ import annotations

import torch

from ..model_config import ModelConfig
from .block import MIXERS, Block, mixer_class
from .lm import LanguageModel, sample_next
from .packing import check_row_boundaries, cu_seqlens_from_lengths, cu_seqlens_from_starts


def build_model(config: ModelConfig, device: torch.device | str | None = None,
                init_seed: int | None = None) -> LanguageModel:
    """A freshly initialised LM. ``device="meta"`` builds shapes only (init skipped)."""
    if device is None:
        return LanguageModel(config, init_seed)
    with torch.device(device):
        return LanguageModel(config, init_seed)


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape (tied weights once), from the meta device."""
    return {k: tuple(v.shape) for k, v in build_model(config, device="meta").named_parameters()}


def count_parameters(config: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights once), counted on the meta device: nothing allocated."""
    model = build_model(config, device="meta")
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.embed.weight.numel()
        if not config.tie_embeddings:
            total -= model.lm_head.weight.numel()
    return total


__all__ = [
    "MIXERS", "Block", "LanguageModel", "ModelConfig", "build_model", "count_parameters",
    "parameter_shapes",
    "mixer_class", "sample_next", "check_row_boundaries", "cu_seqlens_from_lengths",
    "cu_seqlens_from_starts",
]
