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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data.packing import IGNORE_INDEX
from kernels.varlen import offsets_to

from .distributed import allreduce_sum


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
        return [engine(b["input_ids"].to(dev), b["labels"].to(dev), offsets_to(b["cu_seqlens"], dev)).detach().double()
                for b in batches]
    finally:
        engine.train()


def pipeline_losses(engine: Any, batches: Sequence[dict]) -> list[torch.Tensor]:
    """Mean losses of a pipeline, one per batch, on its last stage; ``[]`` on the other stages."""
    micro = [((b["input_ids"], b["cu_seqlens"]), b["labels"]) for b in batches]
    out = engine.eval_batch(iter(micro), num_micro_batches=len(micro), reduce_output=None, bcast_loss=False)
    return [t.double() for t in out] if engine.is_last_stage() else []


class Validator:
    """A run's fixed validation set, read by random access from the validation split (its
    loader built at the first validation), and its token-weighted loss over all ranks."""

    def __init__(self, cfg: Any, sources: list[dict], eng: Any, rank: int, dev: torch.device,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.sources, self.eng, self.rank, self.dev, self.log = cfg, sources, eng, rank, dev, log
        self.val: Any = None  # the validation split's loader
        self.val_share: ReplicaShare | None = None

    def _share(self) -> ReplicaShare | None:
        """This replica's part of the fixed validation set (built once); None without a val split."""
        cfg = self.cfg
        if self.val is None:
            if not any(cfg.data.val_split in s["splits"] for s in self.sources):
                return None
            from data.loader import TokenLoader

            # from the sources that have the split (one added without a validation split, say)
            self.val = TokenLoader(cfg.data, cfg.parallel.micro_batch_size, split=cfg.data.val_split,
                                   shuffle=False, num_workers=0, skip_sources_without_split=True)
            if len(self.val.sources) < len(self.sources):
                self.log(f"[val] {len(self.sources) - len(self.val.sources)} of the {len(self.sources)} "
                         f"training datasets have no {cfg.data.val_split!r} split: validating on the others'")
            micro = cfg.parallel.micro_batch_size
            wanted = cfg.eval.num_sequences(micro)
            indices = val_indices(self.val.num_samples, wanted)
            if not indices:
                return None
            grid = self.eng.engine.grid if self.eng.pipelined else None
            replica = grid.get_data_parallel_rank() if grid is not None else self.rank
            self.val_share = replica_share(indices, micro, self.eng.dp_world, replica)
            if cfg.eval.val_batches is not None:
                self.log(f"[val] eval.val_batches is deprecated: it now means {cfg.eval.val_batches} x "
                         f"micro_batch_size = {wanted} sequences, all ranks together; set "
                         "eval.val_sequences instead")
            self.log(f"[val] {len(indices)} of the {self.val.num_samples} sequences of split "
                     f"{cfg.data.val_split!r} (spread evenly, the same for any rank count), "
                     f"{len(self.val_share.batches)} micro-batch(es) per data-parallel replica")
        return self.val_share

    @torch.no_grad()
    def loss(self) -> float | None:
        """Token-weighted mean loss over the fixed validation set, all ranks together."""
        share = self._share()
        if share is None or self.val is None:
            return None
        batches = [self.val.batch_at(ix) for ix in share.batches]
        e = self.eng.engine
        losses = pipeline_losses(e, batches) if self.eng.pipelined else forward_losses(e, batches, self.dev)
        loss_sum, tokens = allreduce_sum(list(token_sums(losses, batches, share.real)), self.dev)
        return loss_sum / tokens if tokens else None

    def close(self) -> None:
        if self.val is not None:
            self.val.close()


__all__ = ["ReplicaShare", "val_indices", "replica_share", "token_sums", "forward_losses", "pipeline_losses",
           "Validator"]
