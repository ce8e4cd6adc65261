"""Pipeline parallelism on 4 ranks over gloo (2 stages x 2 data-parallel ranks, ZeRO-1).

* interrupted after step 3 and resumed, a pipelined run reproduces its uninterrupted
  per-step losses exactly (fp32);
* it also follows the unpipelined run of the same seed (4 data-parallel ranks, ZeRO-1)
  step by step up to summation order: same initial weights although each stage built only
  its layers, the same samples per step, and the tied embedding's gradient summed across
  the first and last stage;
* the export turns its per-layer files into the LM's weights (equal to the data-parallel
  run's up to summation order);
* a non-finite loss is skipped by every stage alike.

One pair of processes runs everything, so DeepSpeed is imported once per rank; the test
spawns them and compares the JSONL logs.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

STOP_AT = 3
RANKS = 4


def _raw(tmp: Path, ck: str, pipeline: bool, **over) -> dict:
    from test_train_common import run_config

    raw = run_config(tmp, ckpt_dir=ck, **{"max_steps": 5, "parallel.global_batch_size": 8, "data.job_id": ck,
                                         "parallel.pipeline_stages": 2 if pipeline else 1,
                                         "parallel.activation_checkpointing": pipeline,
                                         "eval.every_steps": 5, "eval.val_batches": 2, **over})
    raw["model"] = {"vocab_size": 512, "d_model": 32, "n_layers": 3, "pattern": "D",
                    "deltaproduct": {"num_heads": 2, "head_dim": 16}}
    return raw


def _driver(tmp: Path) -> None:
    from pretrain.config import RunConfig
    from pretrain.config_loader import build_dataclass
    from pretrain.trainer import train

    # the data-parallel run first: DeepSpeed keeps a pipeline engine's process grid in globals
    runs = [("dp-ref", False, {}, "done"), ("pp-ref", True, {}, "done"),
            ("pp-cut", True, {"faults": {"preempt_at_step": STOP_AT}}, "preempted"), ("pp-cut", True, {}, "done"),
            ("pp-nan", True, {"faults": {"nan_loss_steps": [1]}, "max_steps": 3}, "done")]
    for ck, pipeline, extra, expected in runs:
        raw = _raw(tmp, ck, pipeline)
        raw.update({k: v for k, v in extra.items() if k != "max_steps"})
        if "max_steps" in extra:
            raw["max_steps"] = extra["max_steps"]
        result = train(build_dataclass(RunConfig, raw))
        assert result.status == expected, (ck, result)


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_resume_is_exact_and_matches_data_parallel(tmp_path):
    from pretrain.distributed import free_port
    from pretrain.run_log import read_metrics
    from test_train_common import env, losses

    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env(rank, RANKS, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(RANKS)]
    outs = [p.communicate(timeout=420)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * RANKS, "".join(o[-3000:] for o in outs)
    assert "2 pipeline stages x 2 data-parallel" in outs[0]

    ref, cut = losses(tmp_path / "pp-ref"), losses(tmp_path / "pp-cut")
    assert sorted(ref) == [1, 2, 3, 4, 5] and cut == ref
    log = tmp_path / "pp-cut" / "logs" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(log, "resume")] == [STOP_AT]

    dp = {r["step"]: r for r in read_metrics(tmp_path / "dp-ref" / "logs" / "metrics.jsonl")}
    for r in read_metrics(tmp_path / "pp-ref" / "logs" / "metrics.jsonl"):
        assert r["data_fingerprint"] == dp[r["step"]]["data_fingerprint"]  # the same samples
        assert r["loss"] == pytest.approx(dp[r["step"]]["loss"], rel=1e-5), r["step"]
        assert r["grad_norm"] == pytest.approx(dp[r["step"]]["grad_norm"], rel=1e-4), r["step"]
    val = [r["loss"] for r in read_metrics(tmp_path / "pp-ref" / "logs" / "metrics.jsonl", "val")]
    val_dp = [r["loss"] for r in read_metrics(tmp_path / "dp-ref" / "logs" / "metrics.jsonl", "val")]
    assert val and val == pytest.approx(val_dp, rel=1e-5)

    # the export reads the per-layer files back under LanguageModel names
    from pretrain.export import export_checkpoint, load_exported

    pp_model = load_exported(export_checkpoint(tmp_path / "pp-ref", tmp_path / "pp-export"))
    dp_model = load_exported(export_checkpoint(tmp_path / "dp-ref", tmp_path / "dp-export"))
    dp_weights = dict(dp_model.named_parameters())
    for name, p in pp_model.named_parameters():
        torch.testing.assert_close(p, dp_weights[name], rtol=1e-4, atol=1e-5, msg=name)

    nan_log = tmp_path / "pp-nan" / "logs" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(nan_log, "skip")] == [2]
    trained = read_metrics(nan_log)
    assert [r["step"] for r in trained] == [1, 3] and trained[0]["loss"] == ref[1]


if __name__ == "__main__":
    _driver(Path(sys.argv[1]))
