"""Resume over gloo: exact on the same ranks, and elastic (another rank count, same global batch).

* Same ranks (2): for ZeRO 1, 2 and 3 an interrupted-and-resumed run reproduces the
  uninterrupted run's per-step losses exactly (fp32).
* 2 -> 1 rank for ZeRO 0, 1, 2 and 3 (ZeRO>=1 through DeepSpeed's universal checkpoint), and
  1 -> 2 ranks for ZeRO-2: the resumed step reads the same samples (data fingerprint), has
  the same loss up to summation order, and leaves the same fp32 master weights as the
  uninterrupted run on the saving rank count (which checks the restored Adam moments, step
  and per-group hyperparameters too: one Adam step with any of them wrong moves weights by
  1e-5 or more, summation order by 1e-7 or less). A 1-rank and a 2-rank run from scratch
  only agree in loss: Adam's first steps turn rounding-level gradient differences into
  lr-sized weight differences.
* Validation (every run validates at steps 0 and 5, on 5 held-out sequences): the resumed
  run's loss equals the uninterrupted run's, exactly on the same ranks and up to summation
  order on another rank count; a 1-rank and a 2-rank run validate their equal initial
  weights to the same loss (the set does not depend on the rank count).

Three spawns, each importing DeepSpeed once: one rank runs ZeRO-2 (its step-4 checkpoint
seeds the 1 -> 2 resume); two ranks run every stage (reference, preempted after step 3,
resumed) and then the 1 -> 2 resume; one rank resumes every 2-rank reference checkpoint of
step 4. The processes run this file as a script; the tests only spawn them and compare
logs and checkpoints.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

STAGES = (1, 2, 3)
STOP_AT = 3
ELASTIC_AT = 4  # the step of the checkpoints the elastic runs resume
GROW_STAGE = 2  # the stage of the 1 -> 2 ranks resume
VAL_SEQUENCES = 5  # 3 micro-batches of 2, 2 and 1: on 2 ranks one replica pads its share


def _raw(tmp: Path, stage: int, ck: str, job: str) -> dict:
    from test_train_common import run_config, small_lm

    raw = run_config(tmp, ckpt_dir=ck, **{"parallel.zero_stage": stage, "max_steps": 5,
                                         "parallel.global_batch_size": 8, "data.job_id": job,
                                         "eval.every_steps": 5, "eval.val_sequences": VAL_SEQUENCES})
    raw["model"] = small_lm()
    return raw


def _train(raw: dict, expected: str) -> None:
    from test_train_common import train_in_process

    train_in_process(raw, expected)


def _driver(tmp: Path, mode: str) -> None:
    if mode == "one":  # 1 rank, ZeRO-2: the reference of the 1 -> 2 resume
        _train(_raw(tmp, GROW_STAGE, "one", "one"), "done")
    elif mode == "stages":  # 2 ranks
        for stage in STAGES:
            for kind in ("ref", "cut", "resume"):
                ck = f"z{stage}-{'ref' if kind == 'ref' else 'cut'}"
                raw = _raw(tmp, stage, ck, f"{ck}-{kind}")
                if kind != "ref":
                    raw["faults"] = {"preempt_at_step": STOP_AT}
                _train(raw, "preempted" if kind == "cut" else "done")
        _train(_raw(tmp, 0, "z0-ref", "z0-ref"), "done")  # for the elastic test
        _train(_raw(tmp, GROW_STAGE, "grow", "grow"), "done")  # 1 -> 2 ranks
    elif mode == "shrink":  # 1 rank resumes each 2-rank checkpoint of step 4
        from pretrain.checkpoint import CheckpointError

        with pytest.raises(CheckpointError, match="saved with parallel.zero_stage=2.*set parallel.zero_stage=2"):
            _train(_raw(tmp, 1, "e2", "e2-stage"), "done")  # another ZeRO stage is refused
        for stage in (0, *STAGES):
            _train(_raw(tmp, stage, f"e{stage}", f"e{stage}"), "done")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def _spawn(tmp: Path, mode: str, world: int) -> str:
    from test_train_common import spawn_ranks

    return spawn_ranks(__file__, [str(tmp), mode], world, tmp / "rank_logs" / mode)


def _assert_same_steps(run: Path, ref: Path, steps: list[int]) -> None:
    """``run`` logged exactly ``steps``, on ``ref``'s samples with its losses (up to summation order)."""
    from pretrain.run_log import read_metrics

    want = {x["step"]: x for x in read_metrics(ref / "logs" / "metrics.jsonl")}
    got = {x["step"]: x for x in read_metrics(run / "logs" / "metrics.jsonl")}
    assert sorted(got) == steps, (run.name, sorted(got))
    for s in steps:
        assert got[s]["data_fingerprint"] == want[s]["data_fingerprint"], (run.name, s)  # none skipped
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-4), (run.name, s)


def _val(run: Path) -> dict[int, float]:
    from pretrain.run_log import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / "logs" / "metrics.jsonl", "val")}


def _assert_same_val(run: Path, ref: Path, step: int) -> None:
    """Both runs validated at ``step`` on the same sequences: equal loss up to summation order."""
    got, want = _val(run), _val(ref)
    assert step in got and step in want, (run.name, got, want)
    assert got[step] == pytest.approx(want[step], rel=1e-5), (run.name, step)


def _assert_same_weights(run: Path, ref: Path, step: int) -> None:
    """The fp32 master weights of both runs' checkpoints of ``step`` agree (see the top)."""
    from pretrain import checkpoint as ckpt
    from pretrain.export import consolidated_state_dict

    a, b = (consolidated_state_dict(ckpt.step_dir(r, step)) for r in (run, ref))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{run.name} {k}: {m}")


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_is_exact_on_the_same_ranks_and_elastic_across_rank_counts(tmp_path):
    import subprocess

    from pretrain import checkpoint as ckpt
    from pretrain.run_log import read_metrics
    from test_train_common import ROOT, env, losses

    _spawn(tmp_path, "one", 1)
    shutil.copytree(ckpt.step_dir(tmp_path / "one", ELASTIC_AT), ckpt.step_dir(tmp_path / "grow", ELASTIC_AT))
    out = _spawn(tmp_path, "stages", 2)
    for stage in STAGES:
        ref = losses(tmp_path / f"z{stage}-ref")
        cut = losses(tmp_path / f"z{stage}-cut")
        assert sorted(ref) == [1, 2, 3, 4, 5]
        assert cut == ref, (stage, cut, ref)
        log = tmp_path / f"z{stage}-cut" / "logs" / "metrics.jsonl"
        assert [r["step"] for r in read_metrics(log, "resume")] == [STOP_AT]  # really resumed
        assert len(read_metrics(log)) == 5  # and redid no step
        assert not (tmp_path / f"z{stage}-cut" / f"step_{STOP_AT:08d}" / ckpt.UNIVERSAL).exists()
        assert _val(tmp_path / f"z{stage}-cut") == _val(tmp_path / f"z{stage}-ref"), stage  # steps 0 and 5
    assert "resumed from" in out and f"at step {STOP_AT}" in out

    # 1 -> 2 ranks (ZeRO-2): steps 1-4 on one rank, step 5 on two
    grow, one = tmp_path / "grow", tmp_path / "one"
    assert "elastic resume: 1 -> 2 ranks" in out and "to a universal checkpoint for the elastic resume" in out
    assert [r["step"] for r in read_metrics(grow / "logs" / "metrics.jsonl", "resume")] == [ELASTIC_AT]
    assert (ckpt.step_dir(grow, ELASTIC_AT) / ckpt.UNIVERSAL).is_dir()
    _assert_same_steps(one, tmp_path / f"z{GROW_STAGE}-ref", [1, 2, 3, 4, 5])
    _assert_same_steps(grow, one, [ELASTIC_AT + 1])
    _assert_same_weights(grow, one, ELASTIC_AT + 1)
    _assert_same_val(grow, one, ELASTIC_AT + 1)
    # the validation set does not depend on the rank count: the same initial weights give the
    # same validation loss on 1 and on 2 ranks
    _assert_same_val(one, tmp_path / f"z{GROW_STAGE}-ref", 0)

    # 2 -> 1 rank at the same global batch (grad accumulation 2 -> 4), every stage
    for stage in (0, *STAGES):
        src = ckpt.step_dir(tmp_path / f"z{stage}-ref", ELASTIC_AT)
        shutil.copytree(src, ckpt.step_dir(tmp_path / f"e{stage}", ELASTIC_AT))
    stale = ckpt.step_dir(tmp_path / "e1", ELASTIC_AT) / ".universal-tmp-killed" / "ds"
    stale.mkdir(parents=True)  # a conversion killed half-way: must be ignored and removed
    (stale / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    ahead = ckpt.step_dir(tmp_path / "e3", ELASTIC_AT)  # converted ahead of time, on its own
    r = subprocess.run([sys.executable, "-m", "pretrain.universal", str(ahead), "--workers", "2"], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"universal checkpoint: {ahead / ckpt.UNIVERSAL}" in r.stdout, r.stderr[-3000:]
    out = _spawn(tmp_path, "shrink", 1)
    assert out.count("resumed from") == 4 and out.count("elastic resume: 2 -> 1") == 3
    assert out.count("to a universal checkpoint for the elastic resume") == 2  # e1 and e2; e3 was made ahead
    for stage in (0, *STAGES):
        step = ckpt.step_dir(tmp_path / f"e{stage}", ELASTIC_AT)
        assert (step / ckpt.UNIVERSAL).is_dir() == (stage > 0)  # ZeRO-0 needs no conversion
        assert not list(step.glob(".universal-tmp-*"))
        _assert_same_steps(tmp_path / f"e{stage}", tmp_path / f"z{stage}-ref", [ELASTIC_AT + 1])
        _assert_same_weights(tmp_path / f"e{stage}", tmp_path / f"z{stage}-ref", ELASTIC_AT + 1)
        _assert_same_val(tmp_path / f"e{stage}", tmp_path / f"z{stage}-ref", ELASTIC_AT + 1)


def test_universal_conversion_failure_is_clean_and_a_finished_one_is_reused(tmp_path):
    from pretrain import checkpoint as ckpt
    from pretrain import universal

    step = ckpt.step_dir(tmp_path, 4)
    (step / ckpt.DS_TAG).mkdir(parents=True)
    torch.save({"not": "a ZeRO file"}, step / ckpt.DS_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    said = []
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)step_00000004.*universal checkpoint.*resume on the rank "
                       r"count it was saved with.*Its output ended with:\n.*error: converting"):
        universal.ensure(step, rank=0, workers=2, log=said.append)
    assert "converting" in said[0] and "2 worker(s)" in said[0]
    assert sorted(p.name for p in step.iterdir()) == [".universal.lock", ckpt.DS_TAG]  # no temp directory left
    assert universal.main([str(tmp_path / "nowhere")]) == 2
    # a second conversion (one started by hand, say) waits for the first and takes its result
    import fcntl
    import os
    import threading

    fd = os.open(step / ".universal.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first conversion, running
    results: list = []
    second = threading.Thread(target=lambda: results.append(universal.convert(step)))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive()
    (step / ckpt.UNIVERSAL).mkdir()  # the first one's result (renamed into place whole)
    os.close(fd)
    second.join(timeout=60)
    assert results == [step / ckpt.UNIVERSAL]  # not converted again (this ZeRO file would fail)
    universal.ensure(step, rank=0, log=said.append)  # reused as is
    assert len(said) == 1


def test_universal_conversion_sweeps_stale_temp_folders_only_under_its_lock(tmp_path, monkeypatch):
    """Where the file system has no locks, another conversion may be writing its temporary
    folder right now: removing it could publish that conversion incomplete."""
    import errno
    import fcntl

    from pretrain import checkpoint as ckpt
    from pretrain import universal

    step = ckpt.step_dir(tmp_path, 4)
    (step / ckpt.DS_TAG).mkdir(parents=True)
    torch.save({"not": "a ZeRO file"}, step / ckpt.DS_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    other = step / f"{universal.TMP_PREFIX}other"
    other.mkdir()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "no locks here")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        with pytest.raises(KeyError, match="optimizer_state_dict"):  # the converter, on this file
            universal.convert(step)
    assert other.is_dir()  # perhaps another conversion's, in progress
    with pytest.raises(KeyError, match="optimizer_state_dict"):
        universal.convert(step)
    assert not other.exists()  # under the lock no other conversion runs: a killed one's


if __name__ == "__main__":
    _driver(Path(sys.argv[1]), sys.argv[2])
