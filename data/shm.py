"""Remove shared memory that a killed streaming job left behind, and only that.

streaming's own ``clean_stale_shared_memory`` unlinks every streaming segment on the node,
including those of another job (or another test process) that is still running, whose
workers then attach to the wrong segments. Here a segment counts as stale only when no
live process maps it (``/proc/*/maps``) and it is older than ``min_age_s`` (a segment
being created is briefly unmapped). Without ``/proc`` we fall back to streaming's function.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SHM_DIR = Path("/dev/shm")
# streaming.base.constant.SHM_TO_CLEAN (copied: importing streaming costs seconds; a test
# checks the copy against the installed version)
STREAMING_SHM_NAMES = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states",
                       "shard_access_times", "resume", "epoch_shape", "epoch_data")


def _mapped_shm_names() -> set[str] | None:
    """Basenames of /dev/shm files mapped by any process we can inspect (None: no /proc)."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return None
    names: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "maps").read_text()
        except (OSError, UnicodeDecodeError):
            continue  # exited meanwhile, or another user's process (whose files we cannot unlink)
        for line in text.splitlines():
            i = line.find(str(SHM_DIR) + "/")
            if i >= 0:
                names.add(line[i + len(str(SHM_DIR)) + 1:].removesuffix(" (deleted)"))
    return names


def clean_stale_shm(min_age_s: float = 30.0) -> list[str]:
    """Unlink unmapped streaming segments older than ``min_age_s``; returns their names."""
    if not SHM_DIR.is_dir():
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return []
    pattern = re.compile(r"^\d{6}_(%s)$" % "|".join(map(re.escape, STREAMING_SHM_NAMES)))
    candidates = [p for p in SHM_DIR.iterdir() if pattern.match(p.name)]  # list before scanning maps
    mapped = _mapped_shm_names()
    if mapped is None:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return []
    now, removed = time.time(), []
    for path in candidates:
        try:
            st = path.stat()
            if path.name in mapped or now - st.st_mtime < min_age_s:  # ftruncate at creation sets it
                continue
            if st.st_uid != os.getuid():
                continue
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue
    return removed


# streaming names a dataset's segments by the lowest prefix free on the node: every rank scans
# for it, the node's leader registers it, the other ranks then look it up. Two jobs that start
# at once on one node can interleave those steps (a rank finds no registration: "prefix=N was
# not registered by local leader"; or two leaders take the same prefix), so jobs register one
# at a time, under a lock file beside the segments that every user's jobs share.
LOCK_NAME = "linrnn-streaming-prefix.lock"
LOCK_WAIT_S = 120.0  # then go on unlocked (a job spanning nodes that another such job shares)


@contextlib.contextmanager
def one_registration_at_a_time(leader: bool, barrier: Callable[[], None] | None,
                               wait_s: float = LOCK_WAIT_S, log: Callable[[str], None] = print) -> Iterator[None]:
    """Around a job's construction of its datasets on a node: its ``leader`` (local rank 0)
    holds the node's lock, and ``barrier`` (the job's, None for one process) keeps the other
    ranks from scanning before it does, and the next job from registering before they are done."""
    fd = _lock(wait_s, log) if leader else None
    try:
        if barrier is not None:
            barrier()
        yield
        if barrier is not None:
            barrier()
    finally:
        if fd is not None:
            os.close(fd)


def _lock(wait_s: float, log: Callable[[str], None]) -> int | None:
    """The node's registration lock (its descriptor), None where there is none to take."""
    if not SHM_DIR.is_dir():
        return None
    try:
        fd = os.open(SHM_DIR / LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
    except OSError:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                log(f"[data] another job has held {SHM_DIR / LOCK_NAME} for {wait_s:.0f} s: registering this "
                    "job's shared memory without it")
                break
            time.sleep(0.05)
        except OSError:  # no locks on this file system
            break
    os.close(fd)
    return None


def release_dataset_shm(dataset: object) -> int:
    """Close a finished StreamingDataset's shared-memory segments now, unlinking those this
    process created, instead of at exit; returns how many it released.

    streaming keeps every segment open until the process exits (an atexit handler holds it),
    so its prefix stays taken; and each new dataset's prefix scan opens, and likewise keeps,
    every taken segment on the node. A process that builds datasets one after another (a test
    driver, evals, a trainer rebuilding its loaders) so leaked descriptors quadratically, up to
    "Too many open files". Call it only after the dataset's threads have stopped. A segment
    whose name now belongs to another file (another job reused the prefix) is only closed; one
    that cannot be closed yet (a live numpy view of it) keeps its exit-time cleanup. Without
    /dev/shm (not Linux) nothing changes: streaming releases them at exit.
    """
    if not SHM_DIR.is_dir():
        return 0
    from streaming.base.shared.memory import SharedMemory

    found: list[SharedMemory] = []
    for value in vars(dataset).values():
        inner = getattr(value, "arr", None) or getattr(value, "_arr", None)  # scalars, barriers
        for obj in (value, getattr(value, "shm", None), getattr(inner, "shm", None)):
            if isinstance(obj, SharedMemory) and all(obj is not f for f in found):
                found.append(obj)
    return sum(_release(wrapper) for wrapper in found)


def _release(wrapper: object) -> bool:
    """Close one streaming SharedMemory (and unlink what it created); False: left to exit."""
    from multiprocessing import resource_tracker

    created, opened = wrapper.created_shms, wrapper.opened_shms  # type: ignore[attr-defined]
    try:
        for shm in created:
            ours = _same_file(getattr(shm, "_fd", -1), SHM_DIR / shm.name)
            shm.close()
            if ours:
                shm.unlink()  # also tells the resource tracker, which would unlink it at exit
            else:  # the name is another file's now: keep the tracker from unlinking that one
                resource_tracker.unregister(shm._name, "shared_memory")
        for shm in opened:
            shm.close()
    except (BufferError, OSError):
        return False
    atexit.unregister(wrapper.cleanup)  # type: ignore[attr-defined]
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether descriptor ``fd`` is the file at ``path`` now."""
    try:
        a, b = os.fstat(fd), path.stat()
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)
