"""Validation on one fixed list of held-out sequences, whatever the rank count.

Why: a validation loss is only comparable across runs (and across an elastic resume) when
it measures the same sequences the same way. So the set depends on the data alone:

* which sequences: ``eval.val_sequences`` (N) sample indices spread evenly over
  ``data.val_split`` in its canonical order (sources in config order, each in shard order;
  no shuffle, no rank partition): index ``i * total // N`` for ``i < N``, hence every
  source of a mixture in proportion to its split, and all of the split when N >= total.
  Samples are read by global index (``TokenLoader.batch_at``);
* who computes what: consecutive indices form global micro-batches of
  ``parallel.micro_batch_size`` sequences (the last may be shorter); micro-batch ``b`` goes
  to data-parallel replica ``b % dp``, and all stages of a pipeline take their replica's;
* the value: the loss summed over label tokens divided by the number of label tokens, both
  summed over all replicas (a token-weighted mean, not a mean of batch means), so it is the
  same for any rank count and micro-batch size up to float summation order.

Every replica runs the same number of forward passes (ZeRO-3 gathers parameters in each,
a pipeline's ``eval_batch`` starts with a barrier of all ranks): a replica with one batch
fewer repeats the first batch and discards the result.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data.packing import IGNORE_INDEX


def val_indices(total: int, n: int) -> list[int]:
    """``n`` sample indices spread evenly over a split of ``total`` (all of it when n >= total)."""
    n = min(n, total)
    return [i * total // n for i in range(n)]


@dataclass(frozen=True)
class ReplicaShare:
    """One data-parallel replica's part of the validation set."""

    batches: list[list[int]]  # sample indices per forward pass, in order
    real: int  # the first ``real`` batches count; the rest only keep collectives in step


def replica_share(indices: Sequence[int], micro_batch_size: int, dp: int, replica: int) -> ReplicaShare:
    """Micro-batch ``b`` of ``indices`` goes to replica ``b % dp``; shorter shares are padded."""
    if not 0 <= replica < dp:
        raise ValueError(f"replica {replica} is outside {dp} data-parallel replicas")
    batches = [list(indices[i:i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]
    mine = batches[replica::dp]
    rounds = -(-len(batches) // dp)
    return ReplicaShare(mine + [batches[0]] * (rounds - len(mine)), len(mine))


def token_sums(mean_losses: Sequence[Any], batches: Sequence[dict], real: int) -> tuple[float, float]:
    """(summed token loss, label tokens) of the first ``real`` batches, from each one's mean loss.

    The model's loss is the mean over label tokens (labels != -100), 0 when there are none."""
    loss_sum, tokens = 0.0, 0.0
    for loss, batch in zip(list(mean_losses)[:real], batches[:real]):
        n = float((batch["labels"] != IGNORE_INDEX).sum())
        loss_sum += float(loss) * n
        tokens += n
    return loss_sum, tokens


def forward_losses(engine: Any, batches: Sequence[dict], dev: torch.device) -> list[torch.Tensor]:
    """Mean losses of a data-parallel engine (``engine(ids, labels, cu_seqlens)``), one per batch."""
    engine.eval()
    try:
        return [engine(b["input_ids"].to(dev), b["labels"].to(dev), b["cu_seqlens"].to(dev)).detach().double()
                for b in batches]
    finally:
        engine.train()


def pipeline_losses(engine: Any, batches: Sequence[dict]) -> list[torch.Tensor]:
    """Mean losses of a pipeline, one per batch, on its last stage; ``[]`` on the other stages."""
    micro = [((b["input_ids"], b["cu_seqlens"]), b["labels"]) for b in batches]
    out = engine.eval_batch(iter(micro), num_micro_batches=len(micro), reduce_output=None, bcast_loss=False)
    return [t.double() for t in out] if engine.is_last_stage() else []


__all__ = ["ReplicaShare", "val_indices", "replica_share", "token_sums", "forward_losses", "pipeline_losses"]
