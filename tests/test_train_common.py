"""Shared builders for the training tests (no tests here).

A tiny GatedDeltaProduct on the data tests' prepared Shakespeare slice (vocab 512,
seq_len 128), fp32 on the CPU, and helpers to run ``linrnn-train`` as a subprocess with
its own rank environment and to read per-step losses from the JSONL log.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pretrain.distributed import free_port
from pretrain.run_log import read_metrics
from test_data_common import SEQ_LEN, VOCAB, prepared

ROOT = Path(__file__).resolve().parents[1]


def data_path() -> str:
    """The prepared test dataset; subprocesses get the parent's through $LINRNN_TEST_DATA."""
    return os.environ.get("LINRNN_TEST_DATA") or str(prepared())


def run_config(tmp: Path, ckpt_dir: str = "ckpt", **over) -> dict:
    cfg = {
        "name": "t", "seed": 3, "max_steps": 6,
        "model": {"preset": "gated_deltaproduct-tiny", "vocab_size": VOCAB, "d_model": 32, "n_layers": 2,
                  "deltaproduct": {"num_heads": 2, "head_dim": 16}},
        "data": {"sources": [{"path": data_path()}], "seq_len": SEQ_LEN, "num_workers": 0,
                 "cache_root": str(tmp / "data_cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "parallel": {"zero_stage": 1, "micro_batch_size": 2, "global_batch_size": 4, "precision": "fp32"},
        "checkpoint": {"dir": str(tmp / ckpt_dir), "every_steps": 2, "keep_last": 2},
        "logging": {"every_steps": 1, "tensorboard": False},
        "eval": {"every_steps": 0},
    }
    for k, v in over.items():
        node = cfg
        *parts, last = k.split(".")
        for p in parts:
            node = node.setdefault(p, {})
        node[last] = v
    return cfg


def small_lm(n_layers: int = 2) -> dict:
    """The distributed tests' model: a pure GatedDeltaProduct stack over the 512-token vocabulary."""
    return {"vocab_size": 512, "d_model": 32, "n_layers": n_layers, "pattern": "D",
            "deltaproduct": {"num_heads": 2, "head_dim": 16}}


def train_in_process(raw: dict, expected: str) -> None:
    """Train from a raw config dict in this (rank) process; the run must end with ``expected``."""
    from pretrain.config import RunConfig
    from pretrain.config_loader import build_dataclass
    from pretrain.trainer import train

    result = train(build_dataclass(RunConfig, raw))
    assert result.status == expected, (raw["checkpoint"]["dir"], result)


def write_config(tmp: Path, name: str = "run.yaml", **over) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(run_config(tmp, **over)))
    return path


def env(rank: int = 0, world: int = 1, port: int | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()), OMP_NUM_THREADS="1",
             PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", DS_ACCELERATOR="cpu",
             LINRNN_TEST_DATA=data_path())
    return e


PORT_ATTEMPTS = 3  # free_port()'s port can be taken (as an ephemeral port) before rank 0 listens


def spawn_ranks(script: str, args: list[str], world: int, log_dir: Path, timeout: float = 420) -> str:
    """Run ``script args`` as ranks 0..world-1 of one gloo job; returns rank 0's output.

    Output goes to ``log_dir/rank<r>.log`` (kept for a post-mortem). A rank that fails stops
    the others at once: they would otherwise wait for it in a collective until the timeout,
    and the failure would show a timeout instead of the failing rank's traceback. A job
    whose rendezvous port was taken (EADDRINUSE: nothing has run yet) starts again on a new
    port, up to ``PORT_ATTEMPTS`` times.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        logs = [log_dir / f"rank{r}.log" if attempt == 1 else log_dir / f"rank{r}.try{attempt}.log"
                for r in range(world)]
        codes, timed_out = _run_ranks(script, args, world, logs, timeout)
        outs = [log.read_text(errors="replace") for log in logs]
        if codes == [0] * world or not any("EADDRINUSE" in o for o in outs):
            break
    note = " (timed out: killed)" if timed_out else ""
    assert codes == [0] * world, f"{script} {' '.join(args)}: ranks exited with {codes}{note}" + "".join(
        f"\n--- rank {r} ---\n{o[-4000:]}" for r, o in enumerate(outs))
    return outs[0]


def _run_ranks(script: str, args: list[str], world: int, logs: list[Path], timeout: float) -> tuple[list[int], bool]:
    """One attempt of spawn_ranks: (exit codes, whether the timeout killed it)."""
    port = free_port()
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, script, *args], env=env(r, world, port),
                                          stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while None in (codes := [p.poll() for p in procs]):
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    return [p.wait() for p in procs], time.monotonic() > deadline


def train_cli(config: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", str(config), *overrides], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def losses(ckpt_dir: Path) -> dict[int, float]:
    """step -> loss from the run's JSONL log; a step redone after a resume keeps its last value."""
    return {r["step"]: r["loss"] for r in read_metrics(ckpt_dir / "logs" / "metrics.jsonl")}


def snapshot(root: Path) -> list[tuple[str, int]]:
    """Every path under ``root`` with its modification time: equal snapshots, nothing written."""
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def fingerprints(ckpt_dir: Path) -> dict[int, int]:
    """step -> the step's data fingerprint (the sum of its token ids, all ranks)."""
    return {r["step"]: r["data_fingerprint"] for r in read_metrics(ckpt_dir / "logs" / "metrics.jsonl")}


def reference_run(tmp: Path) -> tuple[Path, dict[int, float]]:
    """The uninterrupted single-process run that the interrupted ones must reproduce: 6 steps,
    checkpoints at 2, 4 and 6 kept; returns its directory and per-step losses."""
    import math
    import re

    from pretrain import checkpoint as ckpt

    cfg = write_config(tmp)
    r = train_cli(cfg, "checkpoint.keep_every_steps=2")  # keep_last=2 alone would have pruned step 2
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _, ok in ckpt.list_checkpoints(tmp / "ckpt") if ok] == [2, 4, 6]
    assert re.search(r"step 5/6: .* ETA \d+s\n", r.stdout) and re.search(r"step 6/6: .* ETA 0s\n", r.stdout)
    ref = losses(tmp / "ckpt")
    assert sorted(ref) == list(range(1, 7)) and all(math.isfinite(v) for v in ref.values())
    assert ref[6] < ref[1]
    # the spike watch's history goes into every checkpoint, for the resumed run to judge by
    assert ckpt.read_run_state(ckpt.step_dir(tmp / "ckpt", 4))["recent_losses"] == [ref[s] for s in range(1, 5)]
    return tmp, ref

