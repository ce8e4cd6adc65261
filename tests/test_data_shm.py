"""Stale shared memory: segments of dead jobs are removed, live ones (mapped) are kept."""
from __future__ import annotations

import contextlib
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


def test_jobs_register_their_segments_one_at_a_time(tmp_path, monkeypatch) -> None:
    """A job's leader holds the node's lock from before its ranks scan for a free prefix until
    they have all looked it up; another job waits for it (or, past the wait, goes on and says so)."""
    import fcntl
    import threading

    from data import shm

    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    steps: list[str] = []
    with shm.one_registration_at_a_time(True, lambda: steps.append("barrier")):
        steps.append("construct")
        probe = os.open(tmp_path / shm.LOCK_NAME, os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # held
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        said: list[str] = []
        start = time.monotonic()
        with shm.one_registration_at_a_time(True, None, wait_s=0.3, log=said.append):  # another job: waits, then goes on
            pass
        assert time.monotonic() - start >= 0.3 and "registering this job's shared memory without it" in said[0]
        order: list[str] = []

        def other_job():
            with shm.one_registration_at_a_time(True, None):
                order.append("other")

        t = threading.Thread(target=other_job)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(10)
    assert steps == ["barrier", "construct", "barrier"] and order == ["first done", "other"]
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    os.close(probe)
    with shm.one_registration_at_a_time(False, None):  # not the leader: no lock taken
        fcntl.flock(os.open(tmp_path / shm.LOCK_NAME, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_loader_builds_its_datasets_under_the_lock(tmp_path, monkeypatch) -> None:
    import fcntl

    from data import loader, shm
    from test_data_common import data_config, prepared

    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    real = loader._make_dataset_class
    held: list[bool] = []

    def make():
        cls = real()

        class Checked(cls):
            def __init__(self, *a, **k):
                fd = os.open(tmp_path / shm.LOCK_NAME, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(False)
                except BlockingIOError:
                    held.append(True)
                finally:
                    os.close(fd)
                super().__init__(*a, **k)

        return Checked

    monkeypatch.setattr(loader, "_make_dataset_class", make)
    with loader.TokenLoader(data_config(tmp_path / "c", prepared()), 2):
        pass
    assert held == [True]


def test_closed_loaders_release_their_descriptors_and_segments(tmp_path) -> None:
    """close() closes every descriptor of its dataset's segments and unlinks them, loader after
    loader in one process. streaming holds each segment until exit and each new dataset's
    prefix scan opens every taken one: before close() released them, six loaders in one
    process left 73 more descriptors open, and a test driver ran out of them."""
    from data.loader import TokenLoader
    from test_data_common import data_config, prepared

    def open_segments(prefix: str) -> list[str]:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [t for t in targets if t.startswith(str(SHM_DIR)) and Path(t).name.startswith(prefix)]

    out = prepared()
    for i in range(3):
        loader = TokenLoader(data_config(tmp_path / f"c{i}", out), 2)
        next(iter(loader))
        prefix = f"{loader.dataset._shm_prefix_int:06d}_"
        assert len(open_segments(prefix)) >= 6  # locals, barrier, next_epoch, cache_usage, shard_*
        loader.close()
        assert open_segments(prefix) == []
        assert not [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]
