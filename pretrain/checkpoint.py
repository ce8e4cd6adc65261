"""Checkpoints that are either complete or ignored.

Layout under ``checkpoint.dir``::

    step_00000100/
        ds/...           DeepSpeed engine state (module, optimizer / ZeRO partitions)
        rng/rank00000.pt every RNG of each rank (torch, CUDA, numpy, python)
        run.json         step, tokens seen, data-loader state, tokenizer hash, model shape
        config.yaml      the resolved run config
        COMPLETE         written last, after every rank finished writing
    latest               names the newest complete step directory

Why a marker: a kill can land anywhere in a multi-file, multi-rank save. Resume takes the
newest directory that has ``COMPLETE`` and never looks at anything else, so a torn save is
just an ignored directory (cleaned up by the next save). ``latest`` is rewritten
atomically after the marker, so it too only ever names a complete checkpoint. Pruning
removes a directory's marker before its files for the same reason. Before the marker, every
rank flushes what it wrote to the storage (``flush_to_storage``: syncfs of the checkpoint's
file system), so a node that crashes later (a kernel panic, a power loss: not just a killed
process) cannot leave a marker over files that never left its page cache.

Safe loading: run state is JSON and RNG state loads with ``weights_only=True``; the
DeepSpeed state is read by DeepSpeed's own loader (and, for an elastic resume, converter),
which unpickles its own files.

Elastic resume (another number of ranks, same global batch and ZeRO stage): ZeRO-0 engine
state is whole on every rank and loads as is. ZeRO-1/2/3 optimizer state is partitioned per
rank, so the first elastic resume from a checkpoint converts it, once, into DeepSpeed's
universal checkpoint (per parameter: fp32 master weights, Adam moments and step, which fit
any rank count), and every rank loads that with DeepSpeed's ``load_universal``::

    step_00000100/
        universal/ds/...  ``ds_to_universal`` output (about the size of ``ds/``), then reused

A pipelined run (ZeRO-1) resumes the same way on another data-parallel degree with the same
stages: the converter reads every stage's partitions (the tied embedding/head once, see
``pipeline.build_pipeline_module``), and each stage loads its own parameters by name.

The conversion (``universal.py``: rank 0 runs it in a process of its own, the other ranks
wait without a collective's timeout; or ahead of time, ``python -m pretrain.universal``)
writes a hidden temporary directory inside the step directory and renames it to
``universal`` when done, so a kill mid-conversion leaves only a temp directory that the
next attempt deletes, and an existing ``universal`` is always complete. Slips of DeepSpeed's
universal loaders (param-group hyperparameters, ZeRO-3's shared ``step``) are repaired after
loading (``_repair_universal_load``).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


MARKER = "COMPLETE"
LATEST = "latest"
DS_TAG = "ds"
UNIVERSAL = "universal"
HOLD = ".hold"  # a reader's shared flock keeps the checkpoint from pruning (``hold``)
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used by this run; the message says why."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    """The step a ``step_XXXXXXXX`` directory name stands for (None: not such a name)."""
    digits = path.name[len(_PREFIX):]
    if not path.name.startswith(_PREFIX) or not (digits.isascii() and digits.isdigit()):
        return None  # int() would also take "1_000", "+100" or " 100"
    return int(digits)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every step directory, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        s = step_of(p)
        if s is not None and p.is_dir():
            out.append((s, p, (p / MARKER).is_file()))
    return sorted(out)


def newest_complete(root: str | os.PathLike) -> Path | None:
    complete = [p for _, p, ok in list_checkpoints(root) if ok]
    return complete[-1] if complete else None


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving rank could see; a resume that sees fewer (an elastic
        # resume on smaller nodes, a debug run) sets those it has
        for i, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, i)


# ----------------------------------------------------------------------------- save / load


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def flush_to_storage(path: Path) -> None:
    """syncfs(2) on ``path``'s file system: this node's writes there reach the storage (the
    server, for a network file system) before this returns. Where syncfs is missing (not
    Linux), sync(2)."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def save_checkpoint(engine: Any, root: str | os.PathLike, step: int, run_state: dict[str, Any],
                    config_text: str, *, rank: int, keep_last: int, keep_every: int = 0,
                    before_marker: Callable[[], None] | None = None, flush: bool = True) -> Path:
    """Write one checkpoint collectively (every rank calls this); returns its directory."""
    root = Path(root)
    d = step_dir(root, step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if d.is_symlink():  # a step linked in from another run: that run's checkpoint stays whole
            d.unlink()
        elif d.exists():  # a torn save of this step from a killed job, or a re-save
            (d / MARKER).unlink(missing_ok=True)
            shutil.rmtree(d)
        (d / "rng").mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(d), tag=DS_TAG, client_state={}, save_latest=False)
    torch.save(rng_state(), d / "rng" / f"rank{rank:05d}.pt")
    if rank == 0:
        write_atomic(d / "run.json", json.dumps(run_state, indent=2, sort_keys=True))
        write_atomic(d / "config.yaml", config_text)
    if before_marker is not None:
        before_marker()
    if flush:  # each rank its own writes (syncfs covers the node's): all on storage before the marker
        flush_to_storage(d)
    _barrier()
    if rank == 0:
        write_atomic(d / MARKER, f"step {step}\n")
        write_atomic(root / LATEST, d.name + "\n")
        prune(root, keep_last, log=print, keep_every=keep_every)
    _barrier()
    return d


# how torch's zip writer reports a failed write (ENOSPC, EFBIG, EDQUOT, EIO) as a RuntimeError
_TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "file write failed", "iostream error", "inline_container.cc")


def is_write_failure(e: BaseException) -> bool:
    """Whether a save died of the filesystem (full disk, quota, lost mount): an OSError, or
    torch's writer reporting one as a RuntimeError, anywhere in the exception's chain."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_ERRORS)):
            return True
        e = e.__cause__ or e.__context__
    return False


def save_failure_message(root: str | os.PathLike, step: int, rank: int, e: BaseException) -> str:
    """What a failed save means for the run and what to do (``is_write_failure``)."""
    root = Path(root)
    newest = newest_complete(root)
    torn = step_dir(root, step)
    size = sum(f.stat().st_size for f in torn.rglob("*") if f.is_file()) if torn.is_dir() else 0
    last = (f"the newest complete checkpoint, {newest.name}, is intact and a rerun resumes from it" if newest
            else "no complete checkpoint exists yet, so a rerun starts from step 0")
    return (f"saving checkpoint {str(torn)!r} failed on rank {rank}, writing to disk ({e}). Without a "
            f"COMPLETE marker it is ignored ({size / 2**20:.1f} MiB written; the next save of step {step} "
            f"replaces it); {last}. Free space (or quota) under {str(root)!r} first, or lower "
            "checkpoint.keep_last")


def prune(root: Path, keep_last: int, log: Callable[[str], None] | None = None, keep_every: int = 0) -> None:
    """Keep the newest ``keep_last`` complete checkpoints, and every complete one whose step
    is a multiple of ``keep_every`` (a series to evaluate over training); drop torn ones
    older than the newest complete one.

    A checkpoint that a reader holds (``hold``: an export, say of an eval job) stays until
    a later save finds it free."""
    entries = list_checkpoints(root)
    complete = [(s, p) for s, p, ok in entries if ok]
    if not complete:
        return
    keep = {p for _, p in complete[-keep_last:]} | {p for s, p in complete if keep_every and s % keep_every == 0}
    newest_step = complete[-1][0]
    for s, p, ok in entries:
        if p in keep or (not ok and s > newest_step):
            continue
        if not _remove_unless_held(p) and log is not None:
            log(f"[train] kept {p.name} past checkpoint.keep_last: a reader (an export) holds it")


def _remove_unless_held(step: Path) -> bool:
    """Remove ``step`` unless a reader holds its hold file; whether it was removed. A
    symbolic link (a step linked in from another run) loses the link only: its target, and
    that run's marker, stay."""
    import fcntl

    fd = None
    try:  # a link's hold file is its target's: a reader through the link holds it too
        fd = os.open(step / HOLD, os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:  # no flock on this file system (or the file cannot be made): remove anyway
        pass
    try:
        if step.is_symlink():
            step.unlink()
        else:
            (step / MARKER).unlink(missing_ok=True)
            shutil.rmtree(step, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)
    return True


@contextlib.contextmanager
def hold(step: Path):
    """Keep ``step`` from being pruned while it is read (``linrnn-export`` during training).

    A shared ``flock`` on ``step/.hold``: ``prune`` skips a held checkpoint and removes it at
    a later save. The kernel drops the lock however the reader ends, so no stale hold can
    keep a checkpoint forever. Raises if the checkpoint was pruned before the hold took."""
    import fcntl

    fd = None
    try:
        fd = os.open(step / HOLD, os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a prune removes it
    except OSError:  # pruned already (checked below), read-only, or no flock: read unheld
        pass
    try:
        if not (step / MARKER).is_file():
            raise CheckpointError(
                f"checkpoint {str(step)!r} was removed (the training run keeps checkpoint.keep_last "
                "checkpoints) before it could be read: read a newer one, or raise checkpoint.keep_last")
        yield step
    finally:
        if fd is not None:
            os.close(fd)


def read_run_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is marked complete but its run.json "
                              f"cannot be read ({e}): delete that directory to fall back") from None


def load_rng(path: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state, or None when the checkpoint had fewer ranks (elastic resume)."""
    f = path / "rng" / f"rank{rank:05d}.pt"
    if not f.is_file():
        return None
    try:
        return torch.load(f, weights_only=True)
    except Exception as e:  # truncated or damaged: torch raises RuntimeError, pickle errors, ...
        raise CheckpointError(f"checkpoint {str(path)!r} is marked complete but {str(f)!r} cannot be read "
                              f"({type(e).__name__}: {e}): delete that directory to fall back to the "
                              "previous checkpoint") from None


def load_rng_on_every_rank(path: Path, rank: int) -> dict[str, Any] | None:
    """``load_rng``, collective: a damaged file on one rank stops every rank (its own
    message names the file), rather than leaving the others waiting in their next collective."""
    from .distributed import fail_together

    try:
        state, damaged = load_rng(path, rank), None
    except CheckpointError as e:
        state, damaged = None, e
    fail_together(damaged, lambda n: CheckpointError(
        f"checkpoint {str(path)!r} is marked complete but the rng files of {n} other rank(s) cannot be read (their "
        "messages name them): delete that directory to fall back to the previous checkpoint"))
    return state


def check_all_restored(module: Any, path: Path) -> None:
    """A resume builds the model without drawing weights (left NaN, ``models/materialize.py``):
    a parameter the load did not fill stops the run here, not as NaN losses later."""
    from .models.materialize import unfilled_parameters

    missed = unfilled_parameters(module)
    if missed:
        raise CheckpointError(
            f"checkpoint {str(path)!r} left {len(missed)} parameter(s) unset after loading ({missed[:5]}): it "
            "does not hold this model's weights in full, or holds NaN; resume from an earlier complete "
            "checkpoint (move this one aside, e.g. rename it to "
            f"{path.name}.damaged) or report it if the checkpoint is intact")


def load_engine_state(engine: Any, path: Path, *, universal: bool = False) -> None:
    """Load the DeepSpeed state of ``path``; ``universal`` loads ``path/universal`` (made by
    ``universal.ensure``) instead, which fits any number of ranks."""
    load_dir = path / UNIVERSAL if universal else path
    config = engine._config  # DeepSpeed reads ``load_universal`` only while loading
    before = config.load_universal_checkpoint
    own = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}: {first}): if its files are "
            f"damaged (a full disk, an interrupted copy), move it out of the way, e.g. rename it to "
            f"{path.name}.damaged, and the run resumes from the previous complete checkpoint") from e
    finally:
        config.load_universal_checkpoint = before
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine state in {str(load_dir / DS_TAG)!r}")
    if universal:
        _repair_universal_load(engine.optimizer, load_dir, own)


def _repair_universal_load(optimizer: Any, load_dir: Path, own: list[dict[str, Any]]) -> None:
    """Undo the slips of DeepSpeed's universal loaders (0.19) after loading.

    They copy the saved param groups' hyperparameters onto this optimizer's groups by position,
    from one file (a pipeline's first stage): ZeRO-3 copies the first group's onto every group
    (the no-decay group would get weight decay), and a pipeline stage whose groups differ from
    the first stage's (e.g. only norms: no decay group) would get the wrong ones. Here every
    group takes the saved hyperparameters of its own name (``optim.param_groups`` names them),
    else keeps ``own`` (its values before loading). ZeRO-1/2 load a stage's groups by position
    and skip those past the saved count, which is refused. And ZeRO-3 gives every group the same
    ``step`` tensor, which torch's AdamW then increments once per group per step (wrong bias
    correction)."""
    saved = torch.load(load_dir / DS_TAG / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["param_groups"]  # DeepSpeed's own file (loss scaler objects)
    groups = optimizer.param_groups
    if len(groups) > len(saved) or len(own) != len(groups):
        raise CheckpointError(
            f"the universal checkpoint {str(load_dir)!r} has {len(saved)} optimizer param groups, this "
            f"optimizer (or pipeline stage) {len(groups)}: DeepSpeed would leave some unloaded; resume on the "
            "rank count it was saved with")
    by_name = {hyper.get("name"): hyper for hyper in saved}
    named = None not in by_name and len(by_name) == len(saved)  # else (unnamed groups): by position
    for i, (group, mine) in enumerate(zip(groups, own)):
        hyper = by_name.get(mine.get("name"), mine) if named else saved[i]
        group.update({k: v for k, v in hyper.items() if k != "params"})
    for state in optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
