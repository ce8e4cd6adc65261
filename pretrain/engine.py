"""Wrap the plain LM for DeepSpeed: loss module, activation checkpointing, the engine.

The models know nothing of DeepSpeed; this is the one place where a ``LanguageModel``
meets ZeRO. ``LossModule`` makes the loss the module's ``forward`` so that DeepSpeed's
hooks (ZeRO-3 parameter gathering) run the way they do for any ``engine(...)`` call.
With ``parallel.pipeline_stages > 1`` the engine is DeepSpeed's PipelineEngine over the
layer list instead (``pipeline.py``).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import RunConfig
from .ds_config import deepspeed_config, grad_accum_steps
from .models import LanguageModel, count_parameters
from .models.init import draw_base_seed
from .models.materialize import DrawShare, Placement, build_model_on
from .optim import build_optimizer


class LossModule(nn.Module):
    """``forward(input_ids, labels, cu_seqlens)`` -> mean token loss of the wrapped LM."""

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.lm = lm
        self.register_load_state_dict_pre_hook(_drop_old_checkpointing_names)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm.loss(input_ids, labels, cu_seqlens=cu_seqlens)


_OLD_CHECKPOINTED = re.compile(r"^(.*blocks\.\d+\.)block\.")


def _drop_old_checkpointing_names(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Checkpoints saved with activation checkpointing before 2026-11-29 name block parameters
    ``blocks.N.block.*`` (a wrapper module then): load them under today's ``blocks.N.*``."""
    for key in [k for k in state_dict if _OLD_CHECKPOINTED.match(k)]:
        state_dict[_OLD_CHECKPOINTED.sub(r"\1", key)] = state_dict.pop(key)


@functools.cache
def _recomputing_class(block_class: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``block_class`` whose forward recomputes the block in the backward
    instead of storing its activations (not when decoding with a cache, nor without grad)."""

    def forward(self: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled() or kwargs.get("cache") is not None:
            return block_class.forward(self, x, **kwargs)
        return checkpoint(lambda h: block_class.forward(self, h, **kwargs), x, use_reentrant=False)

    return type(f"Recomputed{block_class.__name__}", (block_class,),
                {"forward": forward, "recomputes_activations": True})


def apply_activation_checkpointing(lm: LanguageModel) -> None:
    """Per-block activation checkpointing that leaves parameter names as they are: each block
    becomes an instance of a recomputing subclass of its own class (no wrapper module), so
    a checkpoint saved with checkpointing on loads with it off and the other way round."""
    for block in lm.blocks:
        if not getattr(block, "recomputes_activations", False):
            block.__class__ = _recomputing_class(type(block))


def precision_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine, or its PipelineEngine
    grad_accum: int
    ds_config: dict
    dtype: torch.dtype
    num_parameters: int
    dp_world: int  # data-parallel ranks: all ranks / pipeline stages
    num_stages: int = 1

    @property
    def pipelined(self) -> bool:
        return self.num_stages > 1

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches this rank loads per optimizer step (a pipeline's stages share theirs)."""
        return self.grad_accum // self.num_stages


def build_engine(cfg: RunConfig, world_size: int, init_from: str | None = None, *,
                 restoring: bool = False) -> Engine:
    """Model (seeded, so every rank starts equal; or the weights of the export ``init_from``),
    optimizer and the DeepSpeed engine.

    The weights are made straight on this rank's device in the run's dtype, part by part
    (``models/materialize.py``), the ranks drawing the parts in turn (a pipeline stage builds
    its own layers); ``restoring`` (a checkpoint is loaded next) or ``init_from`` skip
    drawing them, since every weight is overwritten."""
    import deepspeed
    import torch.distributed as dist

    from .distributed import device
    from .init_from import load_init_weights

    dtype = precision_dtype(cfg.parallel.precision)
    place = Placement(device(), dtype, initialise=not (restoring or init_from))
    n_params = count_parameters(cfg.model)
    tied = cfg.model.tie_embeddings
    if cfg.parallel.pipeline_stages > 1:
        from .pipeline import build_pipeline_module, check_pipeline, pipeline_param_to_lm

        dp_world = check_pipeline(cfg, world_size)
        module = build_pipeline_module(cfg, place)
        if init_from:
            load_init_weights(module, init_from, lambda n: pipeline_param_to_lm(n, cfg.model), tied)
        ds_cfg = deepspeed_config(cfg, dp_world)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, cfg.optim),
                                               config=ds_cfg)
        return Engine(engine, grad_accum_steps(cfg, dp_world), ds_cfg, dtype, n_params, dp_world,
                      engine.num_stages)
    torch.manual_seed(cfg.seed)
    # the ranks draw the parts in turn and broadcast them (deepspeed.initialize then broadcasts
    # rank 0's copy once more: cheap next to drawing)
    share = DrawShare(tuple(range(world_size)), dist.get_rank()) if world_size > 1 else None
    lm = build_model_on(cfg.model, place, init_seed=draw_base_seed(), share=share)  # a pipeline stage's seed too
    if init_from:
        load_init_weights(lm, init_from, lambda n: n, tied)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(lm)
    module = LossModule(lm)
    ds_cfg = deepspeed_config(cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(module, cfg.optim),
                                           config=ds_cfg)
    return Engine(engine, grad_accum_steps(cfg, world_size), ds_cfg, dtype, n_params, world_size)
