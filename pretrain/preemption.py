"""Preemption: a signal only raises a flag; the ranks agree on it at a step boundary.

SLURM sends SIGTERM (or, with ``--signal=USR1@120``, SIGUSR1) before killing a job.
Saving inside a signal handler would race the training step and the other ranks, so the
handler just records the request; the trainer all-reduces the flag (MAX) once per step,
so every rank stops after the same step, saves collectively and exits with
``REQUEUE_EXIT_CODE``, which the sbatch script (or any launcher) takes as "requeue me".
"""
from __future__ import annotations

import os
import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
REQUEUE_EXIT_CODE = 75
BUDGET_REASON = "wall-clock budget"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_early_request: str | None = None
_IMPORTED_AT = time.monotonic()


def process_started_at() -> float:
    """When this process started, on the ``time.monotonic`` clock: a job's time limit also
    counts the imports, the engine build and the checkpoint load before the first step.
    Linux reads it from /proc; elsewhere this module's import time stands in."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT
    return time.monotonic() - max(age, 0.0)


def _record_early(signum: int, frame: FrameType | None) -> None:
    global _early_request
    _early_request = signal.Signals(signum).name


def install_early_handlers() -> None:
    """Record a preemption signal that arrives while the job is still starting up.

    SLURM may signal during the minutes spent importing, building the model and loading
    a checkpoint; without a handler the default action kills the process before it can
    save. The first ``StopFlag`` picks the recorded request up and stops after one step.
    """
    for s in SIGNALS:
        signal.signal(s, _record_early)
    start_helper_processes_deaf_to_stop_signals()


def start_helper_processes_deaf_to_stop_signals() -> None:
    """Start multiprocessing's resource tracker (it tracks the data loader's shared memory)
    with SIGTERM and SIGUSR1 blocked, as it then keeps them: SLURM signals every process of a
    job step, and a tracker killed by SIGUSR1 is relaunched without its records, so the
    rank's exit after a preemption save printed a traceback per shared-memory segment.
    Blocked, not ignored: one arriving meanwhile is delivered to this process afterwards."""
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StopFlag:
    """Signal handlers plus the per-step agreement; use as a context manager."""

    def __init__(self, wall_clock_budget_s: float | None = None, device: torch.device | None = None,
                 started_at: float | None = None):
        self.requested: str | None = None
        self.budget = wall_clock_budget_s
        self.start = process_started_at() if started_at is None else started_at  # the budget's clock
        self.device = device or torch.device("cpu")
        self._old: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        global _early_request
        for s in SIGNALS:
            self._old[s] = signal.signal(s, self._handler)
        if _early_request is not None and self.requested is None:
            self.requested, _early_request = _early_request, None
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)  # type: ignore[arg-type]

    def request(self, reason: str) -> None:
        self.requested = reason

    def agree(self, seconds_per_step: float, seconds_per_save: float) -> str | None:
        """Collective: the reason to stop now if any rank has one, else None.

        The wall-clock budget counts as a reason once the time left would not cover one
        more step and a save (with a 10% margin).
        """
        local = 0.0
        if self.requested:
            local = 2.0
        elif self.budget is not None:
            elapsed = time.monotonic() - self.start
            if elapsed + 1.1 * (seconds_per_step + seconds_per_save) > self.budget:
                local = 1.0
        flag = torch.tensor([local], dtype=torch.float32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = flag.item()
        if value >= 2.0:
            return self.requested or "signal on another rank"
        if value >= 1.0:
            return BUDGET_REASON
        return None
