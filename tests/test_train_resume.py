"""2 ranks over gloo: for ZeRO 1, 2 and 3 an interrupted-and-resumed run reproduces the
uninterrupted run's per-step losses exactly (fp32); and a 2-rank ZeRO-0 checkpoint resumes
on 1 rank (elastic) with the same samples and the same loss up to summation order.

One pair of processes runs all three stages (each: reference, run preempted after step 3
with a checkpoint, resume from it), so DeepSpeed is imported once per rank. The processes
run this file as a script; the test only spawns them and compares the JSONL logs.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = (1, 2, 3)
STOP_AT = 3


def _raw(tmp: Path, stage: int, ck: str, job: str) -> dict:
    from test_train_common import run_config

    raw = run_config(tmp, ckpt_dir=ck, **{"parallel.zero_stage": stage, "max_steps": 5,
                                         "parallel.global_batch_size": 8, "data.job_id": job})
    raw["model"] = {"vocab_size": 512, "d_model": 32, "n_layers": 2, "pattern": "D",
                    "deltaproduct": {"num_heads": 2, "head_dim": 16}}
    return raw


def _driver(tmp: Path, mode: str) -> None:
    from pretrain.config import RunConfig
    from pretrain.config_loader import build_dataclass
    from pretrain.trainer import train

    if mode == "elastic":  # one rank resumes the 2-rank ZeRO-0 checkpoint of step 4
        result = train(build_dataclass(RunConfig, _raw(tmp, 0, "elastic", "elastic")))
        assert result.status == "done", result
        return
    for stage in STAGES:
        for kind in ("ref", "cut", "resume"):
            ck = f"z{stage}-{'ref' if kind == 'ref' else 'cut'}"
            raw = _raw(tmp, stage, ck, f"{ck}-{kind}")
            if kind != "ref":
                raw["faults"] = {"preempt_at_step": STOP_AT}
            result = train(build_dataclass(RunConfig, raw))
            expected = "preempted" if kind == "cut" else "done"
            assert result.status == expected, (stage, kind, result)
    result = train(build_dataclass(RunConfig, _raw(tmp, 0, "z0-ref", "z0-ref")))  # for the elastic test
    assert result.status == "done", result


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_is_exact_for_zero_1_2_3_on_two_ranks(tmp_path):
    from pretrain.distributed import free_port
    from pretrain.run_log import read_metrics
    from test_train_common import env, losses

    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path), "stages"], env=env(rank, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=420)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    for stage in STAGES:
        ref = losses(tmp_path / f"z{stage}-ref")
        cut = losses(tmp_path / f"z{stage}-cut")
        assert sorted(ref) == [1, 2, 3, 4, 5]
        assert cut == ref, (stage, cut, ref)
        log = tmp_path / f"z{stage}-cut" / "logs" / "metrics.jsonl"
        assert [r["step"] for r in read_metrics(log, "resume")] == [STOP_AT]  # really resumed
        assert len(read_metrics(log)) == 5  # and redid no step
    assert "resumed from" in outs[0] and f"at step {STOP_AT}" in outs[0]

    # elastic: 2 ranks -> 1 rank at the same global batch (grad accumulation 2 -> 4), ZeRO-0
    shutil.copytree(tmp_path / "z0-ref" / "step_00000004", tmp_path / "elastic" / "step_00000004")
    r = subprocess.run([sys.executable, __file__, str(tmp_path), "elastic"], env=env(0, 1),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    ref = {x["step"]: x for x in read_metrics(tmp_path / "z0-ref" / "logs" / "metrics.jsonl")}
    el = read_metrics(tmp_path / "elastic" / "logs" / "metrics.jsonl")
    assert [x["step"] for x in el] == [5]
    assert el[0]["data_fingerprint"] == ref[5]["data_fingerprint"]  # the same samples, none skipped
    assert el[0]["loss"] == pytest.approx(ref[5]["loss"], rel=1e-4)  # same model state (sum order differs)


if __name__ == "__main__":
    _driver(Path(sys.argv[1]), sys.argv[2])
