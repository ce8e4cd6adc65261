"""The checkpoint directory's rules, file by file: what counts as complete, pruning (links,
held checkpoints), damaged files, failed saves, the flush before the marker, RNG state, the
run lock and rewinds. No process group, no DeepSpeed engine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pretrain import checkpoint as ckpt


def _fake(root, step, complete):
    d = ckpt.step_dir(root, step)
    d.mkdir(parents=True)
    (d / "run.json").write_text("{}")
    if complete:
        (d / ckpt.MARKER).write_text("ok")
    return d


def test_only_complete_checkpoints_count_and_pruning(tmp_path):
    assert ckpt.newest_complete(tmp_path / "nothing") is None
    _fake(tmp_path, 10, True)
    _fake(tmp_path, 20, True)
    _fake(tmp_path, 25, False)  # torn save, older than the newest complete one after 30
    _fake(tmp_path, 30, True)
    _fake(tmp_path, 40, False)  # torn save in progress / killed: ignored
    assert ckpt.newest_complete(tmp_path).name == "step_00000030"
    ckpt.prune(tmp_path, keep_last=2)
    left = [(s, ok) for s, _, ok in ckpt.list_checkpoints(tmp_path)]
    assert left == [(20, True), (30, True), (40, False)]
    for s in (50, 60, 70):
        _fake(tmp_path, s, True)
    ckpt.prune(tmp_path, keep_last=2, keep_every=20)  # and a series: every 20th step, for good
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path)] == [20, 60, 70]  # torn 40: not a kept multiple
    # odd names are not checkpoints (int() would read "step_1_000" as step 1000)
    for odd in ("step_1_000", "step_+100", "step_ 100", "step_-5", "step_"):
        (tmp_path / odd).mkdir()
        assert ckpt.step_of(tmp_path / odd) is None
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path)] == [20, 60, 70]


def test_a_damaged_rng_file_stops_the_resume_with_its_name(tmp_path):
    step = _fake(tmp_path, 10, True)
    (step / "rng").mkdir()
    torch.save(ckpt.rng_state(), step / "rng" / "rank00000.pt")
    assert ckpt.load_rng(step, 0)["torch"].equal(torch.get_rng_state()) and ckpt.load_rng(step, 1) is None
    f = step / "rng" / "rank00000.pt"
    f.write_bytes(f.read_bytes()[:100])  # truncated
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000010' is marked complete but .*rank00000.pt' cannot "
                       r"be read .*delete that directory to fall back to the previous checkpoint"):
        ckpt.load_rng_on_every_rank(step, 0)
    # another rank's file is damaged, this one's is whole: this rank stops too
    import pretrain.distributed as distributed

    torch.save(ckpt.rng_state(), step / "rng" / "rank00000.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "ranks_failing", lambda failed: int(failed) + 1)
        with pytest.raises(ckpt.CheckpointError, match=r"rng files of 1 other rank\(s\) cannot be read"):
            ckpt.load_rng_on_every_rank(step, 0)
    assert ckpt.load_rng_on_every_rank(step, 0)["torch"].equal(torch.get_rng_state())


def test_pruning_a_step_linked_in_from_another_run_removes_the_link_only(tmp_path):
    """A decay branch links the stable run's step 10 into its own directory; once pruned
    there, the stable run's checkpoint stays whole and complete."""
    stable, branch = tmp_path / "stable", tmp_path / "branch"
    source = _fake(stable, 10, True)
    branch.mkdir()
    ckpt.step_dir(branch, 10).symlink_to(source, target_is_directory=True)
    for s in (20, 30):
        _fake(branch, s, True)
    with ckpt.hold(ckpt.step_dir(branch, 10)):  # an export reads it through the link: it stays
        ckpt.prune(branch, keep_last=2)
        assert ckpt.step_dir(branch, 10).is_symlink()
    ckpt.prune(branch, keep_last=2)
    assert [s for s, _, _ in ckpt.list_checkpoints(branch)] == [20, 30]
    assert not ckpt.step_dir(branch, 10).is_symlink()
    assert ckpt.newest_complete(stable) == source and (source / "run.json").is_file()
    # the branch saving a step of the number it linked: its own directory replaces the link
    from types import SimpleNamespace

    ckpt.step_dir(branch, 10).symlink_to(source, target_is_directory=True)
    engine = SimpleNamespace(save_checkpoint=lambda path, tag, client_state, save_latest: (Path(path) / tag).mkdir())
    # a rewind to the linked step: a skip request would apply to the stable run too
    from pretrain.rewind import SKIP_FILE, rewind

    (source / SKIP_FILE).write_text('{"steps": 3}')  # the stable run's own request
    with pytest.raises(ckpt.CheckpointError, match="linked in from another run .*would apply to that run too"):
        rewind(branch, 10, skip_steps=2)
    assert rewind(branch, 10).target == ckpt.step_dir(branch, 10) and (source / SKIP_FILE).is_file()
    saved = ckpt.save_checkpoint(engine, branch, 10, {"step": 10}, "x: 1\n", rank=0, keep_last=5, flush=False)
    assert not saved.is_symlink() and (saved / ckpt.MARKER).is_file()
    assert (source / ckpt.MARKER).is_file() and (source / "run.json").is_file()  # the stable run's, untouched


def test_a_held_checkpoint_outlives_pruning_until_its_reader_is_done(tmp_path):
    """An export reading step 10 while training saves step 30 with keep_last=2: step 10
    stays (and says so), and the first save after the export is done removes it."""
    for s in (10, 20, 30):
        _fake(tmp_path, s, True)
    said = []
    with ckpt.hold(ckpt.step_dir(tmp_path, 10)) as held:
        ckpt.prune(tmp_path, keep_last=2, log=said.append)
        assert (held / "run.json").is_file()
    assert said == ["[train] kept step_00000010 past checkpoint.keep_last: a reader (an export) holds it"]
    ckpt.prune(tmp_path, keep_last=2, log=said.append)
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30] and len(said) == 1
    with pytest.raises(ckpt.CheckpointError, match="step_00000010' was removed .* raise checkpoint.keep_last"):
        with ckpt.hold(ckpt.step_dir(tmp_path, 10)):
            pass


def test_a_failed_save_is_told_apart_and_explained(tmp_path):
    import errno

    def chained(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception:
                raise outer
        except Exception as e:
            return e

    assert ckpt.is_write_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert ckpt.is_write_failure(chained(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"),
                                         RuntimeError("basic_ios::clear: iostream error")))
    assert ckpt.is_write_failure(chained(ValueError("wrapped"), OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert not ckpt.is_write_failure(RuntimeError("CUDA error: an illegal memory access"))
    for s in (2, 4):
        ckpt.step_dir(tmp_path, s).mkdir()
    (ckpt.step_dir(tmp_path, 2) / ckpt.MARKER).write_text("ok")
    (ckpt.step_dir(tmp_path, 4) / "part").write_bytes(b"x" * 2**20)
    msg = ckpt.save_failure_message(tmp_path, 4, 1, OSError(errno.ENOSPC, "No space left on device"))
    assert msg == (f"saving checkpoint {str(ckpt.step_dir(tmp_path, 4))!r} failed on rank 1, writing to disk "
                   "([Errno 28] No space left on device). Without a COMPLETE marker it is ignored (1.0 MiB "
                   "written; the next save of step 4 replaces it); the newest complete checkpoint, "
                   "step_00000002, is intact and a rerun resumes from it. Free space (or quota) under "
                   f"{str(tmp_path)!r} first, or lower checkpoint.keep_last")


def test_a_resume_that_leaves_weights_unset_stops_with_their_names(tmp_path):
    from pretrain.models.materialize import Placement, materialize

    module = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)).to("meta")
    materialize(module, Placement(initialise=False), lambda m: None)  # as a resume builds it
    module[0].load_state_dict({"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    path = ckpt.step_dir(tmp_path, 8)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000008' left 2 parameter\(s\) unset after loading "
                       r"\(\['1.weight', '1.bias'\]\).*rename it to step_00000008.damaged"):
        ckpt.check_all_restored(module, path)
    module[1].reset_parameters()
    ckpt.check_all_restored(module, path)


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_run_lock_admits_one_job_per_checkpoint_dir(tmp_path, monkeypatch):
    import errno
    import threading

    from pretrain import run_lock

    held = run_lock.acquire(tmp_path / "ckpt", 0)
    assert held is not None and str(os.getpid()) in (tmp_path / "ckpt" / run_lock.LOCK_NAME).read_text()
    with pytest.raises(run_lock.RunLockError, match=f"another job is training into .*pid {os.getpid()} on"):
        run_lock.acquire(tmp_path / "ckpt", 0)  # flock conflicts between open files, also in one process
    # a job that finds it taken waits for it (a requeued job while the old one lets go)
    monkeypatch.setattr(run_lock, "POLL_S", 0.05)
    said = []
    threading.Timer(0.3, run_lock.release, [held]).start()
    again = run_lock.acquire(tmp_path / "ckpt", 10, log=said.append)
    assert again is not None and "waiting up to 10 s" in said[0]
    run_lock.release(again)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)  # e.g. an NFS mount without locking
    said.clear()
    assert run_lock.acquire(tmp_path / "ckpt", 10, log=said.append) is None
    assert "has no file locks" in said[0]
    (tmp_path / "file").write_text("")  # a checkpoint.dir that cannot be created
    with pytest.raises(ckpt.CheckpointError, match="must be a writable directory"):
        run_lock.acquire(tmp_path / "file" / "ckpt", 0)


def test_a_rewind_to_the_newest_checkpoint_starts_a_new_wandb_run(tmp_path):
    """No later step directory to move (the run stopped on non-finite steps without saving):
    the W&B run id still goes aside, or the next start would log below W&B's step counter."""
    from pretrain.rewind import WANDB_ID_FILE, rewind

    ckpt.step_dir(tmp_path, 4).mkdir()
    (ckpt.step_dir(tmp_path, 4) / ckpt.MARKER).write_text("ok")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / WANDB_ID_FILE).write_text("abc123")
    done = rewind(tmp_path, 4, skip_steps=2)
    assert done.moved == [] and not (tmp_path / "logs" / WANDB_ID_FILE).exists()
    assert (done.moved_to / WANDB_ID_FILE).read_text() == "abc123"
    assert rewind(tmp_path, 4).moved_to is None  # nothing left to move aside


def test_rewinds_in_quick_succession_keep_every_moved_branch(tmp_path):
    from pretrain.rewind import rewind

    def save(step):
        ckpt.step_dir(tmp_path, step).mkdir()
        (ckpt.step_dir(tmp_path, step) / ckpt.MARKER).write_text("ok")

    for step in (2, 4, 6):
        save(step)
    first = rewind(tmp_path, 4)
    save(6)  # the resumed run saved step 6 again
    second = rewind(tmp_path, 4)
    assert first.moved == second.moved == ["step_00000006"] and first.moved_to != second.moved_to
    assert (first.moved_to / "step_00000006").is_dir() and (second.moved_to / "step_00000006").is_dir()
    with pytest.raises(ckpt.CheckpointError, match="skip-steps -1: give a number of steps >= 0"):
        rewind(tmp_path, 4, skip_steps=-1)


def test_every_rank_flushes_its_checkpoint_files_before_the_marker(tmp_path, monkeypatch):
    """The COMPLETE marker is written only after the files reached the storage (syncfs), so a
    node crash cannot leave a marker over data still in its page cache."""
    from types import SimpleNamespace

    events = []

    def engine_save(path, tag, client_state, save_latest):
        (Path(path) / tag).mkdir()
        (Path(path) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        events.append("engine wrote")

    def flush(path):
        events.append(("flushed", (path / ckpt.MARKER).exists(), (path / "run.json").is_file()))
        ckpt.flush_to_storage.__wrapped__(path)  # the real syncfs, too

    flush.__wrapped__ = ckpt.flush_to_storage
    monkeypatch.setattr(ckpt, "flush_to_storage", flush)
    d = ckpt.save_checkpoint(SimpleNamespace(save_checkpoint=engine_save), tmp_path, 3, {"step": 3}, "x: 1\n",
                             rank=0, keep_last=2)
    assert events == ["engine wrote", ("flushed", False, True)] and (d / ckpt.MARKER).is_file()
    ckpt.save_checkpoint(SimpleNamespace(save_checkpoint=engine_save), tmp_path, 4, {"step": 4}, "x: 1\n",
                         rank=0, keep_last=2, flush=False)  # checkpoint.flush_to_storage=false
    assert events[-1] == "engine wrote"


def test_an_export_of_a_path_that_does_not_exist_says_so(tmp_path, capsys):
    from pretrain.export import main as export_main, resolve_checkpoint

    with pytest.raises(ckpt.CheckpointError, match=rf"'{tmp_path}/run9' does not exist \({tmp_path}/run9\)"):
        resolve_checkpoint(tmp_path / "run9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint in"):
        resolve_checkpoint(tmp_path / "empty")
    assert export_main([str(tmp_path / "run9"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out").exists()
