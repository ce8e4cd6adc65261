"""Build the configured model and push one synthetic packed batch through it.

A cheap check before a long job: the config resolves, the model builds, forward and
backward run through every mixer with packed documents, and the loss is finite.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import RunConfig
from .models import build_model


@dataclass
class DryRunReport:
    parameters: int
    tokens: int
    loss: float
    grad_norm: float
    seconds: float


def synthetic_batch(vocab_size: int, batch: int, seq_len: int, generator: torch.Generator):
    """Random tokens in packed rows of 2-3 documents each, with flattened cu_seqlens."""
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=generator)
    offsets = [0]
    for row in range(batch):
        cuts = sorted(torch.randint(1, seq_len, (2,), generator=generator).tolist())
        for c in cuts + [seq_len]:
            if row * seq_len + c > offsets[-1]:
                offsets.append(row * seq_len + c)
    cu = torch.tensor(offsets, dtype=torch.int32)
    return tokens[:, :-1], tokens[:, 1:], cu


def dry_run(cfg: RunConfig, batch: int = 2, seq_len: int | None = None) -> DryRunReport:
    torch.manual_seed(cfg.seed)
    seq_len = seq_len or min(cfg.data.seq_len, 256)
    model = build_model(cfg.model)
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs, labels, cu = synthetic_batch(cfg.model.vocab_size, batch, seq_len, gen)
    start = time.perf_counter()
    loss = model.loss(inputs, labels, cu_seqlens=cu)
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(grads)).item()
    if not torch.isfinite(loss) or not torch.isfinite(torch.tensor(grad_norm)):
        raise RuntimeError(f"dry run: non-finite loss {loss.item()} or grad norm {grad_norm}")
    n_params = sum(p.numel() for p in model.parameters())
    return DryRunReport(n_params, inputs.numel(), loss.item(), grad_norm,
                        time.perf_counter() - start)
