"""Make a model's weights where they are used, one part at a time.

Why: building the whole model on the host in fp32 before DeepSpeed moves it costs each rank
4 bytes per parameter of host memory (28 GB for a 7B model, with eight ranks to a node) and
minutes of CPU time at every start, resumes included, where a checkpoint then overwrites
every weight. Here a model is laid out on the meta device (nothing allocated); then each
part (the embedding, block i, the final norm, an untied head) is initialised on the host
with its own seeded CPU generator (``init.py``: the values do not depend on the device or
on the layout) and moved to its device in the run's dtype before the next part is made, so
host memory peaks at one part. When a checkpoint or an export is about to fill every
weight, nothing is drawn at all: the parts are allocated on the device and filled with NaN,
so that a weight the load missed cannot pass unseen (``unfilled_parameters``). Ranks that
hold the same weights can split a fresh model's drawing (``DrawShare``): each draws every
N-th part and broadcasts it, so a start costs each rank 1/N of the drawing.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..model_config import ModelConfig
from .init import draw_base_seed, init_block, init_embedding, init_head
from .lm import LanguageModel


@dataclass(frozen=True)
class Placement:
    """Where parts are made (``device``), in which floating dtype, and whether they are
    initialised (``initialise=False``: left as NaN for a checkpoint or an export to fill)."""

    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    initialise: bool = True


HOST = Placement()


@dataclass(frozen=True)
class DrawShare:
    """Ranks that start with the same weights (``ranks``, global ranks; ``rank`` is this
    process's) draw a fresh model's parts in turn — part i on ``ranks[i % len(ranks)]`` — and
    broadcast them over ``group`` (None: the default process group)."""

    ranks: tuple[int, ...]
    rank: int
    group: Any = None

    def owner(self, part_index: int) -> int:
        return self.ranks[part_index % len(self.ranks)]


@torch.no_grad()
def broadcast_parts(parts: list[nn.Module], share: DrawShare) -> None:
    """Every part's parameters from the rank that drew it, as bytes (any dtype, any backend)."""
    import torch.distributed as dist

    for i, part in enumerate(parts):
        for p in part.parameters():
            dist.broadcast(p.data.view(-1).view(torch.uint8), src=share.owner(i), group=share.group)


@torch.no_grad()
def materialize(part: nn.Module, place: Placement, init: Callable[[nn.Module], None]) -> None:
    """Allocate ``part`` (built on the meta device) as ``place`` says; ``init(part)`` runs on
    the host in fp32, exactly as for a model built on the CPU."""
    if not place.initialise:
        if any(True for _ in part.buffers()):  # not in checkpoints: they would stay unset
            raise ValueError(f"{type(part).__name__} has buffers: it must be initialised (Placement.initialise)")
        with _keeping_marks(part):
            part.to(dtype=place.dtype).to_empty(device=place.device)  # the dtype cast is free on meta
        for p in part.parameters():
            if p.is_floating_point():
                p.fill_(float("nan"))
        return
    with _keeping_marks(part):
        part.to_empty(device="cpu")
    init(part)
    with _keeping_marks(part):
        part.to(device=place.device, dtype=place.dtype)


@contextlib.contextmanager
def _keeping_marks(part: nn.Module) -> Iterator[None]:
    """Moving off the meta device makes new ``Parameter`` objects, which lose the attributes
    the models set on theirs (``_no_weight_decay`` on the recurrent gates, which the optimizer
    reads): copy them over."""
    marks = {name: dict(vars(p)) for name, p in part.named_parameters() if vars(p)}
    yield
    for name, p in part.named_parameters():
        for key, value in marks.get(name, {}).items():
            setattr(p, key, value)


def build_model_on(config: ModelConfig, place: Placement = HOST, init_seed: int | None = None,
                   share: DrawShare | None = None) -> LanguageModel:
    """``build_model(config, init_seed=init_seed)`` made part by part on ``place.device`` in
    ``place.dtype``: the same weights (cast), without the whole fp32 model ever on the host.
    ``init_seed`` None draws the base seed from the global RNG (every rank of a ``share`` must
    pass the same seed); with ``share`` (collective) this rank draws only its parts."""
    base = draw_base_seed() if init_seed is None else init_seed  # drawn either way: same RNG use
    with torch.device("meta"):
        model = LanguageModel(config)
    parts: list[tuple[nn.Module, Callable[[nn.Module], None]]] = [
        (model.embed, lambda m: init_embedding(m, config, base))]
    parts += [(block, lambda m: init_block(m, config, base)) for block in model.blocks]
    parts.append((model.norm, lambda m: init_head(m, None, config, base)))
    if not config.tie_embeddings:
        parts.append((model.lm_head, lambda m: init_head(None, m, config, base)))
    drawing_shared = share is not None and place.initialise
    for i, (part, init) in enumerate(parts):
        mine = not drawing_shared or share.owner(i) == share.rank
        materialize(part, place if mine else dataclasses.replace(place, initialise=False), init)
    if drawing_shared:
        broadcast_parts([part for part, _ in parts], share)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # made with the embedding; re-tie
    return model


def unfilled_parameters(module: nn.Module) -> list[str]:
    """Names of parameters that still hold NaN after a load; this rank's shards only (a
    ZeRO-3 parameter's local shard is its ``ds_tensor``)."""
    out = []
    for name, p in module.named_parameters():
        local = getattr(p, "ds_tensor", p)
        if local.is_floating_point() and local.numel() and bool(torch.isnan(local).any()):
            out.append(name)
    return out
