"""Weight initialisation, one independently seeded part at a time.

Why parts: a pipeline stage builds only its own layers and must still get exactly the
weights the whole model would have, so that a run's trajectory does not depend on its
parallel layout. Each part (the embedding, block i, the untied output head) draws from the
CPU generator re-seeded with ``part_seed(base, part)``; the order in which parts are
built, and which process builds them, no longer matters.

The scheme: Linear/Embedding ~ N(0, initializer_range), biases 0, norms 1; residual-branch
outputs (mixer ``out_proj``, MLP ``down_proj``) scaled by 1/sqrt(branches), the number of
residual additions in the stack (GPT-2's 2 n_layers; n_layers without MLPs, as mamba_ssm's
``n_residuals_per_layer``), so the residual stream's variance does not grow with depth;
then each mixer's own scheme.
With ``embedding_scale`` (Griffin) the embedding is drawn with std 1/sqrt(d) so that the
scaled embedding has unit variance.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..model_config import ModelConfig
from .layers import RMSNorm, ShortConvolution

EMBEDDING_PART = 0


def block_part(layer_idx: int) -> int:
    return 1 + layer_idx


def head_part(config: ModelConfig) -> int:
    return 1 + config.n_layers


def draw_base_seed() -> int:
    """A base seed from the global RNG, so ``torch.manual_seed(s)`` still fixes the model."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def part_seed(base: int, part: int) -> int:
    return (base * 1_000_003 + part * 7_919) % (2**63 - 1)


@contextlib.contextmanager
def seeded(base: int, part: int) -> Iterator[None]:
    """Draw from a CPU generator seeded for ``part``; the caller's RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(base, part))
        yield


@torch.no_grad()
def init_generic(module: nn.Module, std: float) -> None:
    for m in module.modules():
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


@torch.no_grad()
def init_embedding(embed: nn.Embedding, config: ModelConfig, base: int) -> None:
    with seeded(base, EMBEDDING_PART):
        std = config.d_model**-0.5 if config.embedding_scale else config.initializer_range
        nn.init.normal_(embed.weight, 0.0, std)


def residual_branches(config: ModelConfig) -> int:
    """Residual additions in the stack: a mixer per layer, and an MLP per layer unless there is none."""
    return max(config.n_layers, 1) * (1 if config.mlp_type == "none" else 2)


@torch.no_grad()
def init_block(block: nn.Module, config: ModelConfig, base: int) -> None:
    """``block`` is a ``Block`` (pre-norm mixer + optional MLP)."""
    with seeded(base, block_part(block.layer_idx)):
        init_generic(block, config.initializer_range)
        residual_scale = 1.0 / math.sqrt(residual_branches(config))
        out_proj = getattr(block.mixer, "out_proj", None)
        if isinstance(out_proj, nn.Linear):
            out_proj.weight.mul_(residual_scale)
        if block.mlp is not None:
            block.mlp.down_proj.weight.mul_(residual_scale)
        reset = getattr(block.mixer, "reset_mixer_parameters", None)
        if callable(reset):
            reset()


@torch.no_grad()
def init_head(norm: RMSNorm | None, lm_head: nn.Linear | None, config: ModelConfig, base: int) -> None:
    """The final norm, and the output projection when it is not tied to the embedding."""
    if norm is not None:
        nn.init.ones_(norm.weight)
    if lm_head is not None:
        with seeded(base, head_part(config)):
            nn.init.normal_(lm_head.weight, 0.0, config.initializer_range)
