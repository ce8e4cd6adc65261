"""``pretrain.profiling``: the step profiler's window and the CUDA memory history (the
training runs that use them are in test_train_faults.py). Importable with torch alone."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from pretrain.profiling import MemoryHistory, StepProfiler


def test_a_profile_resumed_inside_its_window_records_the_rest_of_it(tmp_path):
    said = []
    prof = StepProfiler([3, 5], tmp_path, rank=0, log=said.append)
    for step in (4, 5, 6):  # a run resumed at step 3 takes steps 4, 5, 6
        with prof.step(step):
            torch.ones(8).sum()
    prof.close()
    [trace] = tmp_path.iterdir()
    assert trace.name == "rank00000-steps4-5.json" and len(said) == 1
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"train step 4", "train step 5"} <= names and "train step 6" not in names
    quiet = StepProfiler([], tmp_path / "none", rank=0, log=said.append)
    with quiet.step(1):
        pass
    quiet.close()
    assert not (tmp_path / "none").exists()


def test_memory_history_is_off_on_the_cpu_and_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CPU-only behaviour")
    said = []
    history = MemoryHistory(True, tmp_path, rank=0, log=said.append)
    assert history.dump("oom") is None and "nothing to record on this CPU run" in said[0]
    history.close()


@pytest.mark.gpu
def test_memory_history_writes_a_snapshot_of_the_cuda_allocations(tmp_path):
    history = MemoryHistory(True, tmp_path, rank=3, log=print)
    try:
        held = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB
        path = history.dump("oom")
    finally:
        history.close()
    assert path == tmp_path / "rank00003-oom.pickle"
    snapshot = pickle.loads(path.read_bytes())
    sizes = [b["size"] for seg in snapshot["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"]
    assert any(s >= held.numel() for s in sizes)
