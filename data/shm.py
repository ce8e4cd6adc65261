"""Remove shared memory that a killed streaming job left behind, and only that.

streaming's own ``clean_stale_shared_memory`` unlinks every streaming segment on the node,
including those of another job (or another test process) that is still running, whose
workers then attach to the wrong segments. Here a segment counts as stale only when no
live process maps it (``/proc/*/maps``) and it is older than ``min_age_s`` (a segment
being created is briefly unmapped). Without ``/proc`` we fall back to streaming's function.
"""
from __future__ import annotations

import os
import re
import time
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
