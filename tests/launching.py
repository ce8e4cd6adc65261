"""Run a Python module as N local ranks through ``python -m launch`` (the multi-rank jobs of
the eval tests, without SLURM): the launcher's own rendezvous, no SLURM variables, one thread
per rank."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_launched(tmp_path: Path, nproc: int, module: str, *args: str,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), LINRNN_LOCAL_ROOT=str(tmp_path / "local"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "launch", "--nproc", str(nproc), "--quiet", "--", sys.executable,
                           "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
