"""Start N ranks on this machine, torchrun-style, and report one exit code for all.

Why not torchrun itself: its elastic agent restarts or tears down workers on its own
rules, and its exit code does not tell "preempted, requeue me" (75, see
``pretrain.preemption``) from a failure. Here the rules are the project's:

* SIGTERM / SIGUSR1 sent to the launcher go to every rank (they save and exit 75);
* when a rank fails (non-zero, not 75) the others are stuck in collectives: they get
  SIGTERM, then SIGKILL after ``kill_grace`` seconds, and the failure's code is returned;
* otherwise the first non-zero code is returned (75 when the ranks stopped to requeue),
  except that a requeue code never hides a later real failure: requeuing a failing run
  would only loop until the requeue cap.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from .slurm_env import LAUNCHED

REQUEUE_EXIT_CODE = 75  # pretrain.preemption.REQUEUE_EXIT_CODE (not imported: no torch here)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_code(returncode: int) -> int:
    """Shell convention: a child killed by signal N reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def rank_envs(base: Mapping[str, str], nproc: int, first_rank: int = 0, world_size: int | None = None,
              master_addr: str = "127.0.0.1", master_port: int | None = None) -> list[dict[str, str]]:
    """One environment per local rank (torch.distributed variables, one OMP thread share)."""
    world = world_size or nproc
    port = str(master_port or free_port())
    threads = str(max(1, len(os.sched_getaffinity(0)) // nproc))  # the CPUs this process may run on
    out = []
    for i in range(nproc):
        e = dict(base)
        e.update(RANK=str(first_rank + i), WORLD_SIZE=str(world), LOCAL_RANK=str(i), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR=master_addr, MASTER_PORT=port)
        e[LAUNCHED] = "1"  # the ranks take these variables as set, not as inherited
        e.setdefault("OMP_NUM_THREADS", threads)
        out.append(e)
    return out


def run_ranks(cmd: Sequence[str], envs: Sequence[Mapping[str, str]], kill_grace: float = 15.0,
              poll_s: float = 0.05) -> int:
    """Run ``cmd`` once per environment; the combined exit code (see the module doc)."""
    procs = [subprocess.Popen(list(cmd), env=dict(e)) for e in envs]

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    result: int | None = None
    try:
        alive = set(range(len(procs)))
        kill_at: float | None = None
        while alive:
            for i in sorted(alive):
                rc = procs[i].poll()
                if rc is None:
                    continue
                alive.discard(i)
                code = exit_code(rc)
                failed = code not in (0, REQUEUE_EXIT_CODE)
                if result is None and code != 0 or failed and result == REQUEUE_EXIT_CODE:
                    result = code
                if failed and kill_at is None and alive:
                    print(f"[launch] rank {envs[i].get('RANK', i)} exited with {code}: stopping the other "
                          f"{len(alive)} rank(s)", file=sys.stderr, flush=True)
                    for j in alive:
                        procs[j].send_signal(signal.SIGTERM)
                    kill_at = time.monotonic() + kill_grace
            if kill_at is not None and time.monotonic() > kill_at:
                for j in alive:
                    procs[j].kill()
                kill_at = float("inf")
            if alive:
                time.sleep(poll_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)
    return result or 0
