"""Remove the node-local directories that this user's finished SLURM jobs left behind.

The sbatch scripts remove a job's ``linrnn-job<id>`` directory on every node only once the
job is over for good (``python -m launch --clean``). A job requeued onto other nodes, or
ended before that step (time limit, node failure, ``scancel``), leaves it, shard copies
included, on the old nodes' local disk. So when a job starts on a node, ``sweep`` removes
the directories of this user's earlier jobs there that SLURM no longer knows in any state.

It never guesses: when ``squeue`` is missing, fails, times out, prints anything but job ids
or does not list the running job itself, nothing is removed. Only ``linrnn-job<digits>``
directories owned by this user are candidates; the shared Triton cache
(``linrnn-triton-<uid>``) and everything else under the root are left alone.
``LINRNN_KEEP_STALE_JOB_DIRS=1`` turns the sweep off.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

from .slurm_env import job_dir, local_root

KEEP = "LINRNN_KEEP_STALE_JOB_DIRS"
SQUEUE_TIMEOUT_S = 20.0
JOB_DIR = re.compile(r"linrnn-job([0-9]+)")
JOB_ID = re.compile(r"[0-9]+")


def parse_job_ids(text: str) -> set[int] | None:
    """Job ids, one per line; None when any line is something else (an error message, a
    cluster header of ``squeue -M``): an unreadable answer must not read as "no jobs"."""
    ids = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not JOB_ID.fullmatch(line):
            return None
        ids.add(int(line))
    return ids


def squeue_job_ids(uid: int | None = None, timeout: float = SQUEUE_TIMEOUT_S) -> set[int] | None:
    """Every job of ``uid`` SLURM still knows, in any state (pending, running, suspended,
    requeued, just finished...) and partition, hidden ones included; None when squeue cannot say.

    ``%A`` is the real job id of each array task (its SLURM_JOB_ID), not the array's; a
    numeric ``--user`` works on Slurm versions older than ``--me``.
    """
    uid = os.getuid() if uid is None else uid
    cmd = ["squeue", "--noheader", "--all", "--states=all", f"--user={uid}", "--format=%A"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # not installed, not runnable, timed out
        return None
    return parse_job_ids(done.stdout) if done.returncode == 0 else None


def owner(path: str | Path) -> int:
    """The uid owning ``path`` itself (a symlink is not followed)."""
    return os.lstat(path).st_uid


def candidates(root: Path, own: Path, uid: int) -> dict[int, Path]:
    """``linrnn-job<id>`` directories (not links) directly under ``root`` owned by ``uid``,
    by job id, except this job's own ``own``."""
    try:
        entries = list(os.scandir(root))
    except OSError:  # no root yet: nothing was left there
        return {}
    out = {}
    for entry in entries:
        match = JOB_DIR.fullmatch(entry.name)
        if not match or entry.name == own.name:
            continue
        try:
            if entry.is_dir(follow_symlinks=False) and owner(entry.path) == uid:
                out[int(match.group(1))] = Path(entry.path)
        except OSError:  # gone meanwhile (another job's sweep), or unreadable
            continue
    return out


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (links not followed; unreadable parts count 0)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def human(nbytes: int) -> str:
    """A size for the log line, e.g. 12.3 GiB."""
    if nbytes < 1024:
        return f"{nbytes} B"
    size, unit = nbytes / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def sweep(env: Mapping[str, str] | None = None, list_jobs: Callable[[], set[int] | None] | None = None,
          log: TextIO | None = None) -> list[Path]:
    """Remove this user's ``linrnn-job<id>`` directories under this node's local root whose
    jobs SLURM no longer knows; the removed paths. Call it once per node as a job starts.

    ``list_jobs`` (default: ``squeue_job_ids``) gives the ids of this user's jobs SLURM still
    knows, or None when it cannot tell; it is asked only when there is a candidate.
    """
    env = os.environ if env is None else env
    log = sys.stderr if log is None else log
    job = env.get("SLURM_JOB_ID", "")
    if not JOB_ID.fullmatch(job) or env.get(KEEP, "") not in ("", "0"):
        return []  # outside SLURM a job dir is private to its launch (removed at its end); or opted out
    root, uid = local_root(env), os.getuid()
    found = candidates(root, job_dir(env), uid)
    if not found:
        return []
    known = (list_jobs or squeue_job_ids)()
    if known is None or int(job) not in known:
        why = "squeue gave no usable answer" if known is None else f"squeue does not list this job ({job})"
        print(f"[launch] {socket.gethostname()}: left {len(found)} earlier job directory(ies) under {root} in place: "
              f"{why}, so which of those jobs are over is unknown ({KEEP}=1 skips this check)", file=log, flush=True)
        return []
    removed, freed, left = [], 0, []
    for job_id, path in sorted(found.items()):
        if job_id in known:
            continue
        size = disk_usage(path)
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            left.append(path.name)
        else:
            removed.append(path)
            freed += size
    if removed:
        print(f"[launch] {socket.gethostname()}: removed {len(removed)} directory(ies) of finished jobs under "
              f"{root} ({human(freed)} freed): {', '.join(p.name for p in removed)}", file=log, flush=True)
    if left:
        print(f"[launch] {socket.gethostname()}: could not fully remove {', '.join(left)} under {root}",
              file=log, flush=True)
    return removed
