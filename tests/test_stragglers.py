"""``pretrain.stragglers``: which rank counts as slow, and how a rank times its own work (the
two-rank training run that names one is test_train_stragglers.py). Importable with torch
alone."""
from __future__ import annotations

import time

import pytest
import torch

from pretrain.stragglers import RankPace, find_stragglers


def test_stragglers_are_ranks_well_above_the_median() -> None:
    """Per step: rank 2's forward passes and rank 3's data loading exceed the median by the
    ratio and by more than MIN_EXCESS_S; 4x the median on a 1 ms step is noise, not a warning."""
    paces = [("a", 0.010, 1.00, 10), ("a", 0.0101, 1.02, 10), ("b", 0.012, 2.00, 10), ("c", 1.5, 1.01, 10)]
    found = find_stragglers(paces, 1.25)
    assert [(s.rank, s.host, s.what) for s in found] == [(2, "b", "forward passes"), (3, "c", "data loading")]
    assert found[0].ratio == pytest.approx(2.00 / 1.015)
    msg = found[0].message(11, 20)
    assert msg.startswith("rank 2 on b spent 1.97x the median rank's time in forward passes over steps 11-20 "
                          "(200 ms per step, median 102 ms)") and "nvidia-smi" in msg
    assert find_stragglers([("a", 0.0, 0.001, 1), ("a", 0.0, 0.004, 1)], 1.25) == []  # 3 ms: noise
    pace = RankPace(torch.device("cpu"))
    with pace.data():
        time.sleep(0.02)
    with pace.forward():
        time.sleep(0.03)
    pace.step_done()
    data, forward, steps = pace.take()
    assert 0.02 <= data < forward and forward >= 0.03 and steps == 1 and pace.take() == (0.0, 0.0, 0)
    off = RankPace(torch.device("cpu"), enabled=False)
    with off.forward():
        time.sleep(0.01)
    assert off.take()[1] == 0.0


@pytest.mark.gpu
def test_a_forward_on_the_gpu_is_timed_by_its_kernels_not_its_launch() -> None:
    pace = RankPace(torch.device("cuda"))
    torch.cuda.synchronize()
    host = time.perf_counter()
    with pace.forward():
        torch.cuda._sleep(100_000_000)  # tens of ms of GPU time; the host returns at once
    host = time.perf_counter() - host
    pace.step_done()
    _, forward, steps = pace.take()
    assert steps == 1 and forward > 0.01 and forward > 5 * host
