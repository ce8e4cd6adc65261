"""Stale shared memory: segments of dead jobs are removed, live ones (mapped) are kept."""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from data.shm import SHM_DIR, STREAMING_SHM_NAMES, clean_stale_shm

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir() or not Path("/proc/self/maps").exists(),
                                reason="needs /dev/shm and /proc (Linux)")


def _segment(name: str, age_s: float) -> Path:
    path = SHM_DIR / name
    path.write_bytes(b"\0" * 64)
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_only_unmapped_old_segments_are_removed():
    stale = _segment("987650_barrier", age_s=3600)
    young = _segment("987651_barrier", age_s=0)
    live = _segment("987652_next_epoch", age_s=3600)
    other = _segment("987653_not_streaming", age_s=3600)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 64) as mapped:  # a running job maps it
        mapped[0] = 1
        os.utime(live, (time.time() - 3600,) * 2)
        try:
            removed = clean_stale_shm(min_age_s=30)
            assert "987650_barrier" in removed and not stale.exists()
            assert young.exists() and live.exists() and other.exists()
        finally:
            for p in (stale, young, live, other):
                p.unlink(missing_ok=True)


def test_segment_names_match_the_installed_streaming():
    from streaming.base.constant import SHM_TO_CLEAN

    assert set(STREAMING_SHM_NAMES) == set(SHM_TO_CLEAN)
