"""A torch.profiler trace of a few training steps (``logging.profile_steps: [first, last]``).

Why: the step time of a 1B+ run is decided by kernels, communication and host gaps that
only a timeline shows. Every rank records steps first..last (CPU, and CUDA kernels when on
a GPU) and writes ``<log_dir>/profile/rank<R>-steps<first>-<last>.json``, a Chrome trace
that Perfetto (ui.perfetto.dev) or chrome://tracing opens; each step is a ``train step N``
range. A run stopped inside the window writes what it recorded.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch


class StepProfiler:
    def __init__(self, steps: list[int], out_dir: Path, rank: int, log: Callable[[str], None]):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.out_dir, self.rank, self.log = out_dir, rank, log
        self._prof: torch.profiler.profile | None = None
        self._recorded: list[int] = []

    @contextlib.contextmanager
    def step(self, step: int):
        """Around the work of ``step`` (1-based: the step about to be taken)."""
        if self._prof is None and not self._recorded and self.first <= step <= self.last:  # (a resume may start inside)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, profile_memory=True)
            self._prof.__enter__()
        if self._prof is None:
            yield
            return
        with torch.profiler.record_function(f"train step {step}"):
            yield
        self._recorded.append(step)
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run stops inside the window)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        if not self._recorded:  # the first step of the window did not finish
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{self.rank:05d}-steps{self._recorded[0]}-{self._recorded[-1]}.json"
        prof.export_chrome_trace(str(path))
        if self.rank == 0:
            self.log(f"[train] profile of steps {self._recorded[0]}..{self._recorded[-1]} written to {path} "
                     "(every rank writes its own; open in ui.perfetto.dev)")


class MemoryHistory:
    """``logging.memory_snapshot``: record every CUDA allocation (with its stack) from the
    start, and write a snapshot when the GPU runs out of memory, showing what held it; open
    ``<log_dir>/memory/rank<R>-oom.pickle`` in https://pytorch.org/memory_viz."""

    def __init__(self, enabled: bool, out_dir: Path, rank: int, log: Callable[[str], None]):
        self.out_dir, self.rank = out_dir, rank
        self.on = enabled and torch.cuda.is_available()
        if enabled and not self.on and rank == 0:
            log("[train] logging.memory_snapshot records CUDA allocations: nothing to record on this CPU run")
        if self.on:
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def dump(self, name: str) -> Path | None:
        """Write the snapshot as ``rank<R>-<name>.pickle``; None when not recording."""
        if not self.on:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{self.rank:05d}-{name}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def close(self) -> None:
        if self.on:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.on = False
