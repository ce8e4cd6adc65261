"""Find the rank that slows a data-parallel job down.

Why: every step ends in collectives, so one slow rank (a throttled or faulty GPU, a node with
a slow data path) makes every rank wait, and the job only looks uniformly slow. Each rank
times its own work that involves no collective — loading its micro-batches and running
their forward passes (ZeRO 0–2; ZeRO-3 gathers weights inside the forward, and pipeline
stages do different work, so neither is watched) — and at each logging step rank 0
compares the ranks: one whose time exceeds the median by ``logging.straggler_ratio`` (and
by at least ``MIN_EXCESS_S`` per step, so that noise on tiny steps says nothing) is named
with its host. On a GPU the forward is timed with CUDA events (its kernels, not the launch).
The first step of a start is left out (every rank compiles its kernels then).
"""
from __future__ import annotations

import contextlib
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

MIN_EXCESS_S = 0.01  # per step: a slower rank by less than this is not worth a warning


class RankPace:
    """This rank's seconds of data loading and forward passes since the last ``take``."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.enabled, self.cuda = enabled, device.type == "cuda"
        self.data_s = self.forward_s = 0.0
        self.steps = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def data(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - start

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if not self.cuda:
            start = time.perf_counter()
            yield
            self.forward_s += time.perf_counter() - start
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._events.append((begin, end))

    def step_done(self) -> None:
        self.steps += 1

    def take(self) -> tuple[float, float, int]:
        """(data seconds, forward seconds, steps) since the last call; starts a new window."""
        forward = self.forward_s
        for begin, end in self._events:
            end.synchronize()
            forward += begin.elapsed_time(end) / 1000.0
        out = (self.data_s, forward, self.steps)
        self.data_s = self.forward_s = 0.0
        self.steps = 0
        self._events.clear()
        return out


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    what: str  # "forward passes" or "data loading"
    seconds_per_step: float
    median_per_step: float

    @property
    def ratio(self) -> float:
        return self.seconds_per_step / max(self.median_per_step, 1e-12)

    def message(self, first_step: int, last_step: int) -> str:
        check = ("its GPU (nvidia-smi -q -d PERFORMANCE,CLOCK: throttling, errors)" if self.what == "forward passes"
                 else "its data path (local disk, network, object store)")
        span = f"at step {last_step}" if first_step == last_step else f"over steps {first_step}-{last_step}"
        return (f"rank {self.rank} on {self.host} spent {self.ratio:.2f}x the median rank's time in {self.what} "
                f"{span} ({self.seconds_per_step * 1000:.0f} ms per step, median "
                f"{self.median_per_step * 1000:.0f} ms); every rank waits for it at each step: check {check}")


def find_stragglers(paces: list[tuple[str, float, float, int]], ratio: float) -> list[Straggler]:
    """Ranks (``paces[r] = (host, data s, forward s, steps)``) slower than ``ratio`` x the median."""
    found = []
    for what, k in (("forward passes", 2), ("data loading", 1)):
        per_step = [p[k] / max(p[3], 1) for p in paces]
        median = statistics.median(per_step)
        for rank, t in enumerate(per_step):
            if t > ratio * median and t - median > MIN_EXCESS_S:
                found.append(Straggler(rank, paces[rank][0], what, t, median))
    return found


def gather_paces(pace: RankPace) -> list[tuple[str, float, float, int]]:
    """Every rank's window (collective: every rank calls it at the same step)."""
    import torch.distributed as dist

    mine = (socket.gethostname(), *pace.take())
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
