"""DeepSpeed's universal checkpoint, which an elastic resume loads: made once per checkpoint,
by a process of its own.

Why a process of its own: DeepSpeed's converter is fastest with a pool of worker processes,
which must not be forked from a training process (CUDA is initialised there); and for a
large model it runs long (extracting every rank's optimizer partition), longer than a
collective may wait (DeepSpeed's process-group timeout: 10 minutes unless DEEPSPEED_TIMEOUT
says otherwise) before it kills the job, which would then fail the same way at every restart. So rank 0 runs
``python -m pretrain.universal STEP_DIR`` and the other ranks wait on the process group's
key-value store, which has no such timeout, printing how long they have waited.

The same command converts a checkpoint ahead of time, e.g. on a CPU node before an elastic
resume is queued: ``python -m pretrain.universal <checkpoint.dir>/step_XXXXXXXX --workers 16``.
The result, ``step_XXXXXXXX/universal/``, is written to a temporary directory and renamed,
so it only ever exists complete; a killed conversion's temporary directory is removed by
the next one. Two conversions of one checkpoint (the job's own and one started by hand)
take turns on ``step_XXXXXXXX/.universal.lock``: the second finds the first's result.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .checkpoint import DS_TAG, UNIVERSAL, CheckpointError
from .run_lock import exclusive

TMP_PREFIX = ".universal-tmp-"
POLL_S = 2.0
REPORT_EVERY_S = 300.0


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def convert(path: Path, workers: int = 1) -> Path:
    """Convert ``path/ds`` (ZeRO partitions of any rank count) to ``path/universal``, unless
    it exists; returns it. Run it in a process without CUDA when ``workers`` > 1."""
    out = path / UNIVERSAL
    if out.is_dir():
        return out
    def say_wait() -> None:
        print(f"[universal] another process is converting {path}: waiting for it", flush=True)

    with exclusive(path / ".universal.lock", on_wait=say_wait) as turn:
        if out.is_dir():  # made by the conversion we waited for
            return out
        return _convert_unlocked(path, out, workers, sweep=turn.held)


def _convert_unlocked(path: Path, out: Path, workers: int, sweep: bool = True) -> Path:
    """``sweep``: remove killed conversions' temporary folders, safe only under the lock (where
    the file system has none, another conversion may be writing its folder right now)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    for stale in path.glob(f"{TMP_PREFIX}*") if sweep else ():
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path))
    args = argparse.Namespace(input_folder=str(path / DS_TAG), output_folder=str(tmp / DS_TAG),
                              num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    try:
        ds_to_universal(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # made meanwhile by a conversion that could not lock
    return out


def _failure(path: Path, why: str) -> str:
    return (f"converting the ZeRO checkpoint {str(path / DS_TAG)!r} to a universal checkpoint for an elastic "
            f"resume failed ({why}); resume on the rank count it was saved with, or run `python -m "
            f"pretrain.universal {path}` on its own to see the converter's output")


def convert_in_subprocess(path: Path, workers: int, log=print) -> None:
    """``convert`` in a fresh interpreter; its output goes on to ours (the converter's
    progress), and a failure raises ``CheckpointError`` with the output's end."""
    if (path / UNIVERSAL).is_dir():
        return
    log(f"[train] converting {path} to a universal checkpoint for the elastic resume ({workers} worker(s); "
        "once per checkpoint; `python -m pretrain.universal` does it ahead of time)")
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    cmd = [sys.executable, "-m", "pretrain.universal", str(path), "--workers", str(workers)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            tail.append(line.rstrip())
            print(line, end="", flush=True)
    if child.returncode != 0 or not (path / UNIVERSAL).is_dir():
        raise CheckpointError(_failure(path, f"exit code {child.returncode}") + ". Its output ended with:\n"
                              + "\n".join(tail))
    log(f"[train] universal checkpoint {path / UNIVERSAL} made in {time.monotonic() - start:.0f}s")


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def ensure(path: Path, rank: int, workers: int | None = None, log=print) -> None:
    """Collective: rank 0 makes ``path/universal`` (``convert_in_subprocess``) unless it exists;
    the other ranks wait for it on the store, and every rank raises the same
    ``CheckpointError`` if it failed."""
    store = _store()
    key = f"linrnn/universal/{path.resolve()}"
    if rank == 0:
        error = ""
        try:
            convert_in_subprocess(path, workers or default_workers(), log)
        except CheckpointError as e:
            error = str(e)
        except OSError as e:  # e.g. a read-only checkpoint directory
            error = (f"cannot write the universal checkpoint into {str(path)!r} for an elastic resume ({e}): "
                     "make the directory writable, or resume on the rank count it was saved with")
        if store is not None:
            store.set(key, error or "ok")
    else:
        start = last = time.monotonic()
        while not store.check([key]):
            time.sleep(POLL_S)
            if time.monotonic() - last >= REPORT_EVERY_S:
                last = time.monotonic()
                print(f"[train] rank {rank}: waiting for rank 0's universal checkpoint "
                      f"({(last - start) / 60:.0f} min so far)", flush=True)
        error = store.get(key).decode()
        error = "" if error == "ok" else error
    if error:
        raise CheckpointError(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.universal",
        description="Convert a ZeRO checkpoint (step_XXXXXXXX) to DeepSpeed's universal checkpoint, which an "
                    "elastic resume (another rank count) loads; a training job does this itself when needed.")
    parser.add_argument("step_dir", help="a complete step_XXXXXXXX directory of a ZeRO-1/2/3 run")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="converter processes (default: up to 8 of this machine's CPUs)")
    args = parser.parse_args(argv)
    path = Path(args.step_dir)
    if not (path / DS_TAG).is_dir():
        print(f"error: {str(path / DS_TAG)!r} does not exist: give a step_XXXXXXXX directory", file=sys.stderr)
        return 2
    try:
        out = convert(path, max(1, args.workers))
    except Exception as e:  # the converter's own errors (a damaged or foreign checkpoint)
        print(f"error: {_failure(path, f'{type(e).__name__}: {e}')}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
