"""A checkpoint evaluation split over ranks: each rank scores every N-th item, all ranks
gather the scores.

Why: a checkpoint suite is hundreds of independent forward passes (perplexity windows,
held-out batches, passkey prompts at 8x the context); under ``srun --ntasks=N`` or
``python -m launch --nproc N`` they spread over N GPUs. Every rank builds the same item
list with the same random draws, and the gathered scores are combined in item order, so N
ranks report what one rank reports (up to the float rounding of a different batch size).

Time limits: each rank stops at the deadline on its own (after its items among the first
``always``); the merged result keeps the longest run of consecutive items that were
scored, from the first — the rule a single rank follows. A decision that changes which
collectives run next (start another part or not) is taken by all ranks together
(``Shard.time_is_up``), so ranks never wait in different gathers.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

from .time_limit import time_is_up

Item = TypeVar("Item")
Score = TypeVar("Score")

# A rank waits this long in a gather for the slowest rank's current item (one forward pass,
# or a whole held-out batch) before torch.distributed gives up on it.
GATHER_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    # a process group of the ranks, None for the default one (world > 1). shard_from_env keeps
    # none: a group object still referenced when the interpreter ends outlives its
    # destruction at exit (leave_group_at_exit), and gloo's threads then abort the process
    group: Any = None

    @property
    def leader(self) -> bool:
        """The rank that writes results and shows progress."""
        return self.rank == 0

    def score(self, items: Iterable[Item], fn: Callable[[Item], Score], *, deadline: float | None = None,
              always: int = 1, desc: str = "", progress: bool = True) -> tuple[list[Score], bool]:
        """``fn`` of this rank's items (every ``world``-th, from ``rank``), gathered: the
        scores of the leading consecutive items, and whether the deadline cut them short.
        Items are consumed in order on every rank (an item not this rank's is never scored);
        the first ``always`` items are scored whatever the time."""
        total = len(range(self.rank, len(items), self.world)) if isinstance(items, Sized) else None
        bar = tqdm(total=total, desc=desc, disable=not (progress and self.leader), leave=False)
        mine: dict[int, Score] = {}
        stopped = False
        for i, item in enumerate(items):
            if i % self.world != self.rank:
                continue
            if i >= always and time_is_up(deadline):
                stopped = True
                break
            mine[i] = fn(item)
            bar.update(1)
        bar.close()
        merged: dict[int, Score] = {}
        for part, part_stopped in self._all((mine, stopped)):
            merged.update(part)
            stopped = stopped or part_stopped
        leading: list[Score] = []
        while len(leading) in merged:
            leading.append(merged[len(leading)])
        return leading, stopped

    def leader_says(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank: a decision only rank 0 can take (it alone writes)."""
        return self._all(value)[0]

    def time_is_up(self, deadline: float | None) -> bool:
        """Whether any rank's clock is past the deadline (all ranks get the same answer)."""
        return any(self._all(time_is_up(deadline)))

    def _all(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out


def launched_rank() -> tuple[int, int]:
    """(rank, world size) as ``python -m launch`` or torchrun set them; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard_from_env() -> Shard:
    """This process's place among the launched ranks, with a gloo group for the gathers when
    there are several."""
    rank, world = launched_rank()
    if world == 1:
        return Shard()
    import torch.distributed as dist

    if not dist.is_initialized():
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: start the ranks "
                             "with python -m launch (or torchrun)")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GATHER_TIMEOUT)
        from pretrain.distributed import leave_group_at_exit

        leave_group_at_exit()
    return Shard(rank, world)


def rank_device(requested: str) -> str:
    """The device this rank works on: ``cuda`` is the rank's own GPU when several ranks run
    (``pretrain.distributed.cuda_index``: GPU LOCAL_RANK of its node, or the one GPU it sees
    under ``--gpus-per-task=1``); a CUDA device is also made current, so that everything
    that follows the current device (Triton launches, ``torch.cuda`` queries) uses it."""
    import torch

    device = requested
    if requested == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        from pretrain.distributed import rank_cuda_index

        device = f"cuda:{rank_cuda_index()}"
    if device.startswith("cuda:") and torch.cuda.is_available():  # else loading says what is wrong
        torch.cuda.set_device(device)
    return device
