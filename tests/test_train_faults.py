"""Single-process runs of ``linrnn-train`` through its CLI: kill during a save, SIGTERM,
non-finite losses, bad input, a full disk, running out of memory, a profile. (What a resume
may change, exports and rewinds: test_train_stages.py.)

One uninterrupted reference run (the ``reference`` fixture, conftest.py) gives the per-step
losses that every interrupted-and-resumed run must reproduce exactly (fp32 on the CPU is
deterministic).
"""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from data import DataError
from pretrain import checkpoint as ckpt
from pretrain.config_loader import ConfigError, load_config
from pretrain.preemption import REQUEUE_EXIT_CODE
from pretrain.run_log import read_metrics
from pretrain.trainer import train
from test_train_common import ROOT, env, losses, snapshot, train_cli, write_config

pytestmark = pytest.mark.slow


def test_kill_during_save_resumes_from_previous_complete_checkpoint(tmp_path, reference):
    _, ref = reference
    cfg = write_config(tmp_path, **{"logging.tensorboard": True})
    r = train_cli(cfg, "faults.crash_in_save_at_step=4")
    assert r.returncode == 137, r.stderr[-3000:]
    root = tmp_path / "ckpt"
    torn = ckpt.step_dir(root, 4)
    assert torn.is_dir() and not (torn / ckpt.MARKER).exists()  # files written, no marker
    assert ckpt.newest_complete(root).name == "step_00000002"
    assert (root / ckpt.LATEST).read_text().strip() == "step_00000002"
    r = train_cli(cfg)  # the rerun (drill off)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout
    assert losses(root) == ref
    assert (ckpt.step_dir(root, 4) / ckpt.MARKER).is_file()  # the torn save was replaced
    # TensorBoard holds each step once: steps 3-4 of the killed run were dropped at the resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(root / "logs" / "tensorboard"))
    board.Reload()
    shown = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert [s for s, _ in shown] == sorted(ref) and [v for _, v in shown] == pytest.approx([ref[s] for s in sorted(ref)])


def test_a_hung_rank_is_ended_with_its_stacks_and_the_rerun_resumes(tmp_path, reference):
    """faults.hang_at_step stalls the rank once step 3 is done, as a hung collective would: the
    watchdog ends it after hang_timeout_s with exit code 3, says what the rank was doing and
    prints every thread's stack; the checkpoint of step 2 stands, a restart whose restore hangs
    ends the same way, and the rerun matches."""
    from pretrain.watchdog import HANG_EXIT_CODE

    # 20 s: less fails while the engine is built (importing deepspeed alone takes 5 s on 2 cores)
    _, ref = reference
    cfg = write_config(tmp_path)
    r = train_cli(cfg, "faults.hang_at_step=3", "hang_timeout_s=20")
    assert r.returncode == HANG_EXIT_CODE, r.stderr[-3000:]
    assert re.search(r"\[watchdog\] rank 0: no progress for \d+ s \(hang_timeout_s=20\) while running step 4\.",
                     r.stdout)
    assert "stall_forever" in r.stderr and "linrnn-watchdog" not in r.stdout  # the stacks, on stderr
    root = tmp_path / "ckpt"
    assert ckpt.newest_complete(root).name == "step_00000002"
    # start-up is watched too: a restore that never returns (a dead file system) ends the same way
    r = train_cli(cfg, "faults.hang_in_restore=true", "hang_timeout_s=20")
    assert r.returncode == HANG_EXIT_CODE, r.stderr[-3000:]
    assert re.search(r"\[watchdog\] rank 0: no progress for \d+ s \(hang_timeout_s=20\) while restoring the "
                     r"checkpoint \S+step_00000002\.", r.stdout)
    assert ckpt.newest_complete(root).name == "step_00000002"
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000002" in r.stdout and losses(root) == ref


def test_a_wall_clock_budget_used_up_by_start_up_fails_instead_of_requeueing(tmp_path):
    """The budget counts from the process's start; one already spent at the first step would
    requeue forever without a step, so the run stops with the cause (exit 1), saving nothing."""
    cfg = write_config(tmp_path)
    r = train_cli(cfg, "wall_clock_budget_s=1")
    assert r.returncode == 1, r.stderr[-3000:]
    assert re.search(r"wall_clock_budget_s=1 is used up before the first step of this start \(\d+ s since the "
                     r"process started, .*\): raise wall_clock_budget_s", r.stderr)
    assert ckpt.newest_complete(tmp_path / "ckpt") is None


def test_sigterm_saves_exits_with_requeue_code_and_rerun_matches(tmp_path, reference):
    _, ref = reference
    cfg = write_config(tmp_path)
    root = tmp_path / "ckpt"
    log = root / "logs" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", str(cfg)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if log.is_file() and any(r["step"] >= 2 for r in read_metrics(log)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    stop = read_metrics(log, "preempted")
    assert len(stop) == 1 and stop[0]["reason"] == "SIGTERM"
    stopped_at = stop[0]["step"]
    assert 2 <= stopped_at < 6
    assert ckpt.newest_complete(root) == ckpt.step_dir(root, stopped_at)
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {stopped_at}" in r.stdout
    assert losses(root) == ref


def test_a_signal_to_every_process_of_the_job_still_saves(tmp_path):
    """SLURM signals every process of a job step (scancel, preemption, the forwarded time-limit
    warning), the data-loader workers too: they leave the stop to the rank (torch's workers die
    of SIGTERM, which failed the rank's next batch before it could save), and so does the
    resource tracker (killed by SIGUSR1 it was relaunched without its records: a traceback per
    shared-memory segment at exit). Both signals, each into a start of its own."""
    import os

    cfg = write_config(tmp_path, max_steps=200, **{"data.num_workers": 2})
    root = tmp_path / "ckpt"
    log = root / "logs" / "metrics.jsonl"
    stops = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        after = (stops[-1] if stops else 0) + 2
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", str(cfg)], cwd=ROOT, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and any(r["step"] >= after for r in read_metrics(log)):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, sig)  # as slurmstepd does: the whole process group
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
        assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
        stops.append(read_metrics(log, "preempted")[-1]["step"])
        assert read_metrics(log, "preempted")[-1]["reason"] == sig.name
        assert ckpt.newest_complete(root) == ckpt.step_dir(root, stops[-1])
    assert stops[0] < stops[1] < 200


def test_activation_checkpointing_can_be_switched_on_at_a_resume(tmp_path, reference):
    """The usual answer to an out-of-memory crash: resume the same run with checkpointing on.
    Parameter names do not change, so the checkpoint loads, and the losses are the
    reference's exactly (recomputation repeats the same fp32 arithmetic). ZeRO-3 gathers
    the blocks' parameters again for the recomputation: same losses up to summation order."""
    _, ref = reference
    cfg = write_config(tmp_path)
    root = tmp_path / "ckpt"
    r = train_cli(cfg, "faults.preempt_at_step=4")
    assert r.returncode == REQUEUE_EXIT_CODE, r.stderr[-3000:]
    r = train_cli(cfg, "parallel.activation_checkpointing=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4" in r.stdout and losses(root) == ref
    sd = torch.load(ckpt.step_dir(root, 6) / "ds" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert "lm.blocks.0.mixer.q_proj.weight" in sd and not any(".block." in k for k in sd)
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text(cfg.read_text())
    r = train_cli(zero3, "parallel.zero_stage=3", "parallel.activation_checkpointing=true",
                  f"checkpoint.dir={tmp_path / 'ckpt3'}")
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(tmp_path / "ckpt3")
    assert got.keys() == ref.keys() and all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in ref)


def test_a_run_resumes_with_a_smaller_micro_batch_at_the_same_global_batch(tmp_path, reference):
    """The other answer to running out of memory: micro-batch 2 -> 1 (gradient accumulation
    1 -> 2) at a resume. The steps read the same samples: the reference's losses up to
    summation order."""
    _, ref = reference
    cfg = write_config(tmp_path)
    r = train_cli(cfg, "faults.preempt_at_step=4")
    assert r.returncode == REQUEUE_EXIT_CODE, r.stderr[-3000:]
    r = train_cli(cfg, "parallel.micro_batch_size=1")
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(tmp_path / "ckpt")
    assert "at step 4" in r.stdout and got.keys() == ref.keys()
    assert all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in ref)


def test_a_resumed_run_reports_the_loss_spikes_the_uninterrupted_run_does(tmp_path, monkeypatch):
    """The spike watch's history and a spike run under way go into each checkpoint: a run
    stopped mid-spike (step 10) and resumed reports what the uninterrupted one does, also the
    step-11 spike that needs the restored window and the sustained notice that needs step 10.
    A 3-step window, 2 steps of patience and a tiny threshold make spikes of a short, noisy run."""
    from pretrain import spikes

    monkeypatch.setattr(spikes, "WINDOW", 3)
    monkeypatch.setattr(spikes, "MIN_HISTORY", 3)
    monkeypatch.setattr(spikes, "PATIENCE", 2)
    over = ["max_steps=12", "optim.lr=0.05", "logging.spike_sigma=1e-6"]

    def spikes_of(root) -> list[tuple]:
        return [(e["step"], e["loss"], e["sigmas"], e["since"], e["sustained"])
                for e in read_metrics(root / "logs" / "metrics.jsonl", "loss_spike")]

    assert train(load_config(write_config(tmp_path, ckpt_dir="whole"), over)).status == "done"
    whole = spikes_of(tmp_path / "whole")
    assert any(step > 10 for step, *_ in whole) and any(e[-1] for e in whole), whole  # this run's losses give both
    cfg = write_config(tmp_path, ckpt_dir="parts")
    assert train(load_config(cfg, over + ["faults.preempt_at_step=10"])).status == "preempted"
    assert train(load_config(cfg, over)).status == "done"
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    assert spikes_of(tmp_path / "parts") == whole


@pytest.mark.parametrize("stage", [0, 1])
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, stage):
    cfg = write_config(tmp_path)
    r = train_cli(cfg, f"parallel.zero_stage={stage}", "max_steps=10", "max_nonfinite_steps=3",
                  "faults.nan_loss_steps=[2,4,5,6]")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "3 consecutive steps had a non-finite loss" in r.stderr
    root = tmp_path / "ckpt"
    # a skipped step keeps the save schedule (every 2 steps): step 6 was skipped and saved
    assert "step_00000006" in r.stderr  # names the last good checkpoint
    assert ckpt.newest_complete(root).name == "step_00000006"
    log = root / "logs" / "metrics.jsonl"
    assert [s["step"] for s in read_metrics(log, "skip")] == [3, 5, 6, 7]
    train_steps = {s["step"]: s for s in read_metrics(log)}
    assert sorted(train_steps) == [1, 2, 4]
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in train_steps.values())
    # the skipped steps applied nothing: step 4 (after a skip) is as finite as the rest, and
    # step 6's weights (after two skips) are step 4's
    def weights(step: int) -> dict:
        return torch.load(ckpt.step_dir(root, step) / "ds" / "mp_rank_00_model_states.pt",
                          weights_only=True)["module"]
    w4, w6 = weights(4), weights(6)
    assert all(torch.isfinite(v).all() for v in w4.values())
    assert w4.keys() == w6.keys() and all(torch.equal(w4[k], w6[k]) for k in w4)


def test_bad_input_is_refused_before_anything_is_written(tmp_path, reference):
    ref_tmp, _ = reference
    base = write_config(tmp_path)
    cfg = load_config(base, [f"data.sources=[{{path: {tmp_path / 'nope'}}}]"])
    with pytest.raises(DataError, match="nope"):
        train(cfg)
    cfg = load_config(base, ["model.vocab_size=1024"])
    with pytest.raises(ConfigError, match="model.vocab_size=512"):
        train(cfg)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):  # was DeepSpeed's ValueError
            train(load_config(base, ["parallel.precision=fp16"]))
    assert not (tmp_path / "ckpt").exists()
    other = ref_tmp / "ckpt"
    before = snapshot(other)
    cfg = load_config(base, [f"checkpoint.dir={other}", "model.d_model=64"])
    with pytest.raises(ckpt.CheckpointError, match=r"another model \(model.d_model.*restore the model config to "
                       r"resume that run$"):  # other shapes: no on_model_change to offer
        train(cfg)
    cfg = load_config(base, [f"checkpoint.dir={other}", "parallel.precision=bf16"])  # was a raw FileNotFoundError
    with pytest.raises(ckpt.CheckpointError, match="saved with parallel.precision=fp32, the config says bf16"):
        train(cfg)
    assert snapshot(other) == before


def test_a_second_job_on_the_same_checkpoint_dir_is_refused(tmp_path):
    """While one job holds checkpoint.dir (here: this process), another waits lock_wait_s,
    then stops with a message naming the holder, having written nothing."""
    import os

    from pretrain import run_lock

    cfg = write_config(tmp_path)
    root = tmp_path / "ckpt"
    held = run_lock.acquire(root, 0)
    try:
        r = train_cli(cfg, "checkpoint.lock_wait_s=1")
    finally:
        run_lock.release(held)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"another job is training into checkpoint.dir {str(root)!r} (pid {os.getpid()}" in r.stderr
    assert "waiting up to 1 s" in r.stdout + r.stderr
    assert sorted(p.name for p in root.iterdir()) == [run_lock.LOCK_NAME]


def test_a_damaged_newest_checkpoint_is_named_and_can_be_set_aside(tmp_path, reference):
    """A complete checkpoint whose files were damaged later (a full disk, a bad copy) stops
    the resume with its name and the fix; renamed, the run resumes from the one before."""
    import shutil

    ref_tmp, ref = reference
    root = tmp_path / "ckpt"
    shutil.copytree(ref_tmp / "ckpt", root, ignore=shutil.ignore_patterns(".train.lock"))
    cfg = write_config(tmp_path, max_steps=8)
    newest = ckpt.newest_complete(root)
    (newest / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    r = train_cli(cfg)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"checkpoint {str(newest)!r} cannot be loaded" in r.stderr and f"{newest.name}.damaged" in r.stderr
    newest.rename(newest.with_name(f"{newest.name}.damaged"))
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000004" in r.stdout and "resumed from" in r.stdout


def test_a_save_that_fills_the_disk_stops_with_what_to_do(tmp_path):
    """A real write failure: the run's file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored)
    lets the logs through but not the optimizer state, so the first save fails with EFBIG
    as a full disk would with ENOSPC. The run stops with exit 1 and one message naming the
    torn checkpoint and the fix; the torn directory never counts."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    cfg = write_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pretrain", str(cfg)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=240, preexec_fn=limit_file_size)
    root = tmp_path / "ckpt"
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"error: saving checkpoint {str(ckpt.step_dir(root, 2))!r} failed on rank 0, writing to disk" in r.stderr
    assert "no complete checkpoint exists yet, so a rerun starts from step 0" in r.stderr and "Free space (or quota)" in r.stderr
    assert "Traceback" not in r.stderr and "What held the memory" not in r.stderr
    assert ckpt.newest_complete(root) is None and not (root / ckpt.LATEST).exists()
    assert read_metrics(root / "logs" / "metrics.jsonl", "save_failed")[0]["step"] == 2


def test_check_says_what_a_start_would_do_before_the_queue(tmp_path, reference, capsys):
    """linrnn-train --check (a login node before sbatch): fresh start, resume, or the refusal
    a start would stop with, without training or writing anything."""
    from pretrain.cli import main as train_main

    ref_tmp, _ = reference
    cfg = write_config(tmp_path)
    assert train_main([str(cfg), "--check"]) == 0
    out = capsys.readouterr().out
    assert "check: data: 1 dataset(s), " in out and f"check: start: fresh, no checkpoint in {str(tmp_path / 'ckpt')!r}" in out
    other = ref_tmp / "ckpt"
    before = snapshot(other)
    assert train_main([str(cfg), "--check", f"checkpoint.dir={other}", "max_steps=12"]) == 0
    out = capsys.readouterr().out
    assert f"check: resume: from {other / 'step_00000006'} at step 6 (3,072 tokens); data: exact" in out
    assert "check: warning: the learning rate of step 6" in out and out.rstrip().endswith("a start would run")
    assert "elastic" not in out  # no rank count planned (a login node)
    assert train_main([str(cfg), "--check", f"checkpoint.dir={other}", "parallel.plan_world_size=2"]) == 0
    assert (f"check: resume: elastic, 1 -> 2 ranks: the job first converts step_00000006 to a universal checkpoint "
            f"(`python -m pretrain.universal {other / 'step_00000006'}` does it now") in capsys.readouterr().out
    assert train_main([str(cfg), "--check", f"checkpoint.dir={other}", "checkpoint.on_model_change=allow",
                       "model.deltaproduct.allow_neg_eigval=false"]) == 0
    assert "check: model: settings changed (model.deltaproduct.allow_neg_eigval: checkpoint True, config " \
           "False), allowed" in capsys.readouterr().out
    assert train_main([str(cfg), "--check", f"checkpoint.dir={other}", "parallel.global_batch_size=8"]) == 2
    assert "parallel.global_batch_size: checkpoint 4, config 8" in capsys.readouterr().err
    # a layout the planned ranks cannot split: global batch 4 = micro batch 2 x 3 ranks x ?
    assert train_main([str(cfg), "--check", "parallel.plan_world_size=3"]) == 2
    assert "global_batch_size=4 is not a multiple of micro_batch_size x data-parallel ranks = 2 x 3" \
        in capsys.readouterr().err
    assert train_main([str(cfg), "--check", "parallel.plan_world_size=2"]) == 0
    assert "check: layout: 2 rank(s), 1 pipeline stage(s) x 2 data-parallel, gradient accumulation 1" \
        in capsys.readouterr().out
    assert snapshot(other) == before and not (tmp_path / "ckpt").exists()


def test_validation_uses_the_datasets_that_have_a_validation_split(tmp_path):
    """A dataset prepared without a validation split beside one with: the run validates on
    the latter (it used to stop at the first validation)."""
    from test_data_common import prepared
    from test_train_common import data_path

    cfg = write_config(tmp_path, max_steps=2, **{"data.sources": [{"path": data_path()},
                                                                  {"path": str(prepared(40, 30, val_fraction=0.0))}],
                                                 "eval.every_steps": 2, "eval.val_sequences": 4})
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[val] 1 of the 2 training datasets have no 'val' split: validating on the others'" in r.stdout
    assert [v["step"] for v in read_metrics(tmp_path / "ckpt" / "logs" / "metrics.jsonl", "val")] == [0, 2]


def test_a_failing_rank_stops_the_multi_process_job_with_its_traceback(tmp_path):
    """The distributed tests' launcher: when one rank dies, the others (which would wait for
    it in a collective) are killed at once and the failure shows the dead rank's output."""
    from test_train_common import spawn_ranks

    script = tmp_path / "job.py"
    script.write_text("import os, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    raise SystemExit('rank 1 broke')\n"
                      "print('rank 0 waiting', flush=True)\n"
                      "time.sleep(600)\n")
    with pytest.raises(AssertionError) as failure:
        spawn_ranks(str(script), [], 2, tmp_path / "logs", timeout=300)
    message = str(failure.value)
    assert "ranks exited with [-9, 1]" in message and "timed out" not in message
    assert "rank 1 broke" in message and "rank 0 waiting" in message
    assert "rank 1 broke" in (tmp_path / "logs" / "rank1.log").read_text()


def test_a_job_whose_rendezvous_port_was_taken_starts_again(tmp_path):
    """Rank 0 fails to listen on the first attempt (as torch's TCPStore reports it): the
    launcher retries on a fresh port and the job then runs."""
    from test_train_common import spawn_ranks

    script = tmp_path / "job.py"
    script.write_text("import os, pathlib, sys\n"
                      f"marker = pathlib.Path({str(tmp_path / 'tried')!r})\n"
                      "if os.environ['RANK'] == '0' and not marker.exists():\n"
                      "    marker.touch()\n"
                      "    sys.exit('The server socket has failed to listen: code: -98, name: EADDRINUSE')\n"
                      "print('port', os.environ['MASTER_PORT'], flush=True)\n")
    out = spawn_ranks(str(script), [], 2, tmp_path / "logs", timeout=120)
    assert out.startswith("port ") and "EADDRINUSE" in (tmp_path / "logs" / "rank0.log").read_text()
    assert (tmp_path / "logs" / "rank0.try2.log").read_text() == out


def test_running_out_of_gpu_memory_stops_with_what_to_change(tmp_path, reference):
    """An out-of-memory error (injected: this machine has no GPU) stops the run with exit 1,
    the plan's estimate and the settings that lower it, and names the intact checkpoint."""
    cfg = write_config(tmp_path)
    r = train_cli(cfg, "faults.oom_at_step=3", "logging.memory_snapshot=true")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "logging.memory_snapshot records CUDA allocations: nothing to record on this CPU run" in r.stdout
    assert re.search(r"error: rank 0: out of GPU memory at step 4 \(CUDA out of memory\. Tried to allocate 2\.00 GiB "
                     r"\(fault drill: faults\.oom_at_step\)\): the plan estimates [\d.]+ GB per GPU \(weights .*\)\. "
                     r"To fit: lower parallel\.micro_batch_size \(now 2; .*; or set parallel\.activation_checkpointing="
                     r"true; or set parallel\.offload_optimizer=true; or raise parallel\.zero_stage \(a new run only: a "
                     r"resume keeps the checkpoint's\)\..*The newest complete checkpoint, .*step_00000002, is intact\.",
                     r.stderr), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "What held the memory" not in r.stderr


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    cfg = write_config(tmp_path, max_steps=3, **{"logging.profile_steps": [2, 3]})
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    trace = tmp_path / "ckpt" / "logs" / "profile" / "rank00000-steps2-3.json"
    assert f"profile of steps 2..3 written to {trace}" in r.stdout
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"train step 2", "train step 3"} <= names and "train step 1" not in names
    assert any("aten::" in str(n) for n in names)  # the ops inside the steps
