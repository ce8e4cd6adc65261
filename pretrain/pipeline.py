"""Pipeline parallelism: the LM's layer list (``models/pipeline.py``) in DeepSpeed's
``PipelineModule``, combined with ZeRO-1 and data parallelism.

Layout: ranks form a (pipe, data) grid with data fastest (DeepSpeed's
``PipeDataParallelTopology``), so stage ``s`` holds ranks ``[s*dp, (s+1)*dp)``. Layers are
split by parameter count. With tied embeddings, the embedding (first stage) and the output
head (last stage) are one ``TiedLayerSpec``: DeepSpeed all-reduces that weight's gradient
between the two stages, so both copies stay equal. Each stage builds only its own layers,
with the model's per-part seeded init, so a pipelined run starts from the weights the
unpipelined model has for the same seed and follows its trajectory up to summation order.

Data: the loader treats all ``pp x dp`` ranks as data-parallel, so the data order and its
resume state equal those of a data-parallel job with as many ranks; each step, the ranks of
one pipeline gather their micro-batches so that every stage holds the same ones (the
trainer's ``gather_pipeline``). Hence the global batch is a multiple of
``micro_batch_size x ranks``, as without a pipeline.

``dynamic_shape``: ``cu_seqlens`` travels between stages with the hidden states, and its
length depends on how many documents a micro-batch holds.

Checkpoints: DeepSpeed saves one module file per layer, and per stage and data-parallel rank
the ZeRO-1 partition of the fp32 master weights and Adam moments, under the
``PipelineModule``'s parameter names (``pipeline_param_to_lm`` maps them to the LM's). A run
resumes on another data-parallel degree with the same stages through DeepSpeed's universal
checkpoint (``universal.ensure``); the module declares the tied weight as
replicated across stages, so the converter takes it from the first stage only.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .config import RunConfig
from .config_loader import ConfigError
from .model_config import ModelConfig
from .models.init import draw_base_seed
from .models.lm import token_loss
from .models.materialize import HOST, Placement
from .models.pipeline import (BlockLayer, EmbeddingLayer, FinalNormLayer, HeadLayer, layer_param_counts, lm_key,
                              tied_head)

TIED_KEY = "embed"
_TIED_PREFIX = f"tied_modules.{TIED_KEY}."


def _non_reentrant(function: Any, *args: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False)


def layer_specs(cfg: RunConfig, base_seed: int, place: Placement = HOST) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    m = cfg.model
    specs: list = []
    if m.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingLayer, m, base_seed, place, tied_weight_attr="embed.weight"))
    else:
        specs.append(LayerSpec(EmbeddingLayer, m, base_seed, place))
    specs += [LayerSpec(BlockLayer, m, i, base_seed, place) for i in range(m.n_layers)]
    specs.append(LayerSpec(FinalNormLayer, m, place))
    if m.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingLayer, m, base_seed, place, forward_fn=tied_head,
                                   tied_weight_attr="embed.weight"))
    else:
        specs.append(LayerSpec(HeadLayer, m, base_seed, place))
    return specs


def check_pipeline(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel degree of a valid pipeline layout (raises ConfigError otherwise).

    ``ParallelConfig.check`` already requires ZeRO-1; what depends on the rank count is here."""
    p = cfg.parallel
    pp = p.pipeline_stages
    if world_size % pp:
        raise ConfigError(f"parallel.pipeline_stages={pp} does not divide the {world_size} ranks of this job: "
                          "choose a stage count that divides the number of GPUs")
    if p.global_batch_size % (p.micro_batch_size * world_size):
        raise ConfigError(
            f"parallel.global_batch_size={p.global_batch_size} is not a multiple of micro_batch_size x ranks = "
            f"{p.micro_batch_size} x {world_size}: with pipeline_stages={pp} every rank loads an equal share "
            "of each step's micro-batches (its stages then share them); change one of them")
    if pp > cfg.model.n_layers + 3:
        raise ConfigError(f"parallel.pipeline_stages={pp} exceeds the {cfg.model.n_layers + 3} pipeline layers "
                          "(embedding, blocks, norm, head): use fewer stages")
    return world_size // pp


def pipeline_param_to_lm(name: str, config: ModelConfig) -> str:
    """A ``PipelineModule`` parameter name -> the ``LanguageModel`` one: ``"<layer>.<name>"``
    (``"2.mixer.q_proj.weight"`` -> ``"blocks.1.mixer.q_proj.weight"``), and the tied
    embedding/head ``"tied_modules.embed.embed.weight"`` -> ``"embed.weight"``."""
    if name.startswith(_TIED_PREFIX):
        return lm_key(0, name[len(_TIED_PREFIX):], config)
    index, _, rest = name.partition(".")
    if not index.isdigit() or not rest:
        raise ValueError(f"{name!r} is not a pipeline layer parameter name ('<layer index>.<name>')")
    return lm_key(int(index), rest, config)


def build_pipeline_module(cfg: RunConfig, place: Placement = HOST) -> Any:
    """Every rank calls this collectively (DeepSpeed builds process groups here); each builds
    its stage's layers as ``place`` says."""
    from deepspeed.pipe import PipelineModule

    from deepspeed.checkpoint.constants import (PIPELINE_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    counts = layer_param_counts(cfg.model)

    class MetaCountedPipeline(PipelineModule):
        """Split by the parameter counts of ``layer_param_counts``: DeepSpeed's own count
        builds every layer of every stage on every rank, drawing its weights (~1.7 s per 7B
        block on the host) only to count them."""

        def _count_layer_params(self) -> list[int]:
            return list(counts)

    torch.manual_seed(cfg.seed)
    base_seed = draw_base_seed()  # the same on every rank
    module = MetaCountedPipeline(
        layers=layer_specs(cfg, base_seed, place), num_stages=cfg.parallel.pipeline_stages, loss_fn=token_loss,
        partition_method="parameters", dynamic_shape=True,
        activation_checkpoint_interval=1 if cfg.parallel.activation_checkpointing else 0,
        activation_checkpoint_func=_non_reentrant, checkpointable_layers=[BlockLayer.__name__])
    # Saved with every checkpoint. Why: the first and last stage both hold the tied weight, and
    # ds_to_universal writes every stage's fragments of a name to the same files; the pattern
    # makes it skip the copies of stages > 0 (equal values, but partitioned differently).
    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        PIPELINE_REPLICATED_PARAMETER_PATTERNS: ["^" + re.escape(_TIED_PREFIX)]})
    return module
