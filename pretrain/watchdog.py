"""End a training process that has stopped making progress, instead of letting it idle
until the job's time limit.

Why: a rank stuck in a hung collective, a stalled remote read or a dead file system raises
no error; the other ranks wait with it (DeepSpeed's collectives give up after 10 minutes
unless DEEPSPEED_TIMEOUT says otherwise; a read from a dead file system never does), and a
64-GPU job can spend its whole allocation doing nothing.
The trainer calls ``beat(what)`` as it goes (joining the process group, building the model,
restoring a checkpoint, each step, validation, save). A daemon thread
watches the time since the last beat; past ``hang_timeout_s`` it prints what the rank was
doing, every thread's stack (``faulthandler``) and exits with ``HANG_EXIT_CODE``: the job
fails, and ``slurm/pretrain.sbatch`` requeues it if this start saved a checkpoint, to
resume from the newest complete one. ``faulthandler.dump_traceback_later`` is armed
``BACKSTOP_S`` later as well: it needs no GIL, so even a rank stuck in C code that holds
the GIL ends (with exit code 1). Waits whose length is set elsewhere (the run lock's
``lock_wait_s``, an elastic resume's checkpoint conversion, which grows with the model) run
under ``paused``.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

HANG_EXIT_CODE = 3
BACKSTOP_S = 120.0


class Watchdog:
    """``with Watchdog(timeout_s, rank) as dog: ... dog.beat("step 7") ...``; ``timeout_s``
    None watches nothing."""

    def __init__(self, timeout_s: float | None, rank: int, log: Callable[[str], None] = print,
                 exit: Callable[[int], None] = os._exit, poll_s: float | None = None) -> None:
        self.timeout, self.rank, self.log, self.exit = timeout_s, rank, log, exit
        self.poll = poll_s if poll_s is not None else min(30.0, (timeout_s or 0) / 10)
        self.what, self.last = "starting", time.monotonic()
        self._paused = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        self.last = time.monotonic()  # the watch starts now, however long ago it was made
        if self.timeout is not None:
            self._arm_backstop()
            self._thread = threading.Thread(target=self._watch, name="linrnn-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._thread is not None:
            faulthandler.cancel_dump_traceback_later()
            self._thread.join()

    def beat(self, what: str) -> None:
        """Progress: the rank is now doing ``what`` (said in the message if it never ends)."""
        self.what, self.last = what, time.monotonic()
        if self._thread is not None and not self._stopped.is_set() and not self._paused:
            self._arm_backstop()

    @contextlib.contextmanager
    def paused(self, what: str) -> Iterator[None]:
        """Not watched while ``what`` runs; the watch restarts (a beat) when it ends."""
        self._paused = True
        if self._thread is not None:
            faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            self.last = time.monotonic()  # before the watch resumes: the pause is not idle time
            self._paused = False
            self.beat(f"{what} (done)")

    def _arm_backstop(self) -> None:
        faulthandler.dump_traceback_later(self.timeout + BACKSTOP_S, exit=True, file=_stderr())

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll):
            idle = time.monotonic() - self.last
            if self._paused or idle < self.timeout:
                continue
            self.log(f"[watchdog] rank {self.rank}: no progress for {idle:.0f} s (hang_timeout_s={self.timeout:g}) "
                     f"while {self.what}. Every thread's stack follows; exiting with {HANG_EXIT_CODE}. The "
                     "newest complete checkpoint is intact: slurm/pretrain.sbatch requeues the job if this start "
                     "saved one, else rerun the command to resume")
            sys.stdout.flush()
            faulthandler.dump_traceback(file=_stderr(), all_threads=True)
            self.exit(HANG_EXIT_CODE)
            return


def _stderr():
    """The process's own stderr (a real file descriptor, which faulthandler needs, also
    where a test harness has replaced ``sys.stderr``)."""
    return sys.__stderr__ or sys.stderr


def stall_forever() -> None:
    """The fault drill's stand-in for a hung collective or file system read
    (``faults.hang_at_step``, ``faults.hang_in_restore``)."""
    while True:
        time.sleep(1.0)
