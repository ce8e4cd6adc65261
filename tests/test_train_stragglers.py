"""A slow rank is named: two gloo ranks train with ``faults.slow_rank=1`` (its forward passes
take 0.2 s longer, as on a throttled GPU), and rank 0 warns about rank 1 at each logging step
and logs a ``straggler`` event. The comparison rule itself is unit-tested in
test_train_units.py. This file is also the ranks' script."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest


def _driver(tmp: Path) -> None:
    from test_train_common import run_config, small_lm, train_in_process

    raw = run_config(tmp, ckpt_dir="slow", **{"max_steps": 4, "logging.every_steps": 2, "faults.slow_rank": 1,
                                              "parallel.global_batch_size": 8, "data.job_id": "slow"})
    raw["model"] = small_lm()
    train_in_process(raw, "done")


@pytest.mark.distributed
def test_a_slow_rank_is_named_at_each_logging_step(tmp_path):
    from test_train_common import spawn_ranks

    from pretrain.run_log import read_metrics

    out = spawn_ranks(__file__, [str(tmp_path)], 2, tmp_path / "rank_logs")
    host = socket.gethostname()
    for span in ("at step 2", "over steps 3-4"):  # step 1 compiles kernels: left out
        assert f"[train] warning: rank 1 on {host} spent " in out and f"in forward passes {span} (" in out, out[-3000:]
    events = read_metrics(tmp_path / "slow" / "logs" / "metrics.jsonl", "straggler")
    assert [(e["step"], e["rank"], e["work"]) for e in events] == [(2, 1, "forward passes"), (4, 1, "forward passes")]
    assert all(e["seconds_per_step"] - e["median_per_step"] > 0.1 for e in events)  # 2 x 0.2 s, half in the median
    assert "straggler" not in (tmp_path / "rank_logs" / "rank1.log").read_text()  # rank 0 reports


if __name__ == "__main__":
    _driver(Path(sys.argv[1]))
