"""One training job per checkpoint directory.

Two jobs writing into one ``checkpoint.dir`` (a second ``sbatch`` of the same config, a
manual run beside a queued one) would interleave their step directories and ``latest``
and train from each other's half-written states. Rank 0 therefore holds an exclusive
``flock`` on ``<checkpoint.dir>/.train.lock`` for the whole run; the kernel drops it when
the process dies, however it dies, so there is no stale lock to clean up. A job that finds
the lock taken waits up to ``checkpoint.lock_wait_s`` (a requeued job may start while the
old one's node is still letting go), then stops with the holder's host, job id and start
time. File systems without ``flock`` (some NFS or Lustre mounts) get a warning, not an error.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import CheckpointError
from .distributed import broadcast_from_rank0

LOCK_NAME = ".train.lock"
POLL_S = 1.0
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockError(CheckpointError):
    """Another job holds the checkpoint directory."""


@dataclass(frozen=True)
class Turn:
    waited: bool  # another holder made this one wait (it may have done the work)
    held: bool  # False where the file system has no locks: others may be at work too


@contextlib.contextmanager
def exclusive(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[Turn]:
    """An exclusive ``flock`` on ``path`` while the block runs (an export, a conversion),
    waited for, ``on_wait`` called first. Where the file system has no locks, the block runs
    unlocked."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited, held = False, True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            held = False
        yield Turn(waited, held)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return f"pid {h.get('pid')} on {h.get('host')}{job}, since {h.get('since')}"


def acquire(ckpt_dir: str | os.PathLike, wait_s: float, log: Callable[[str], None] = print) -> int | None:
    """Hold the directory's lock (returns its file descriptor, kept open for the run), or
    None where the file system has no locks. Raises ``RunLockError`` after ``wait_s``, and
    ``CheckpointError`` where the directory cannot be written."""
    root = Path(ckpt_dir)
    path = root / LOCK_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot create {str(path)!r} ({e.strerror}): checkpoint.dir must be a writable "
                              "directory; fix its permissions or choose another checkpoint.dir") from None
    deadline, told = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunLockError(
                    f"another job is training into checkpoint.dir {str(root)!r} ({_holder(path)}): "
                    "stop it or wait for it, or give this run its own checkpoint.dir") from None
            if not told:
                log(f"[train] checkpoint.dir is locked by {_holder(path)}; waiting up to {wait_s:.0f} s")
                told = True
            time.sleep(POLL_S)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            os.close(fd)
            log(f"[train] warning: the file system of {str(root)!r} has no file locks ({e.strerror}): "
                "make sure no other job trains into this checkpoint.dir")
            return None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
          "since": datetime.now(UTC).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing drops the flock


def lock_for_run(ckpt_dir: str, wait_s: float, is_main: bool, log: Callable[[str], None] = print) -> int | None:
    """Collective: rank 0 takes the lock and every rank raises the same ``CheckpointError``
    when it cannot (so no rank is left waiting in a collective)."""
    fd, message = None, ""
    if is_main:
        try:
            fd = acquire(ckpt_dir, wait_s, log)
        except CheckpointError as e:  # the lock is taken, or the directory is not writable
            message = str(e)
    message = broadcast_from_rank0(message)
    if message:
        raise CheckpointError(message)
    return fd
