"""Single-process runs of ``linrnn-train`` through its CLI: kill during a save, SIGTERM,
non-finite losses, bad input, and the export round trip.

One uninterrupted reference run (module fixture) gives the per-step losses that every
interrupted-and-resumed run must reproduce exactly (fp32 on the CPU is deterministic).
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
from pretrain.export import export_checkpoint, load_exported, main as export_main
from pretrain.models import build_model
from pretrain.preemption import REQUEUE_EXIT_CODE
from pretrain.run_log import read_metrics
from pretrain.trainer import train
from test_train_common import ROOT, env, losses, train_cli, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp)
    r = train_cli(cfg, "checkpoint.keep_every_steps=2")  # keep_last=2 alone would have pruned step 2
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _, ok in ckpt.list_checkpoints(tmp / "ckpt") if ok] == [2, 4, 6]
    assert re.search(r"step 5/6: .* ETA \d+s\n", r.stdout) and re.search(r"step 6/6: .* ETA 0s\n", r.stdout)
    ref = losses(tmp / "ckpt")
    assert sorted(ref) == list(range(1, 7)) and all(math.isfinite(v) for v in ref.values())
    assert ref[6] < ref[1]
    return tmp, ref


def test_kill_during_save_resumes_from_previous_complete_checkpoint(tmp_path, reference):
    _, ref = reference
    cfg = write_config(tmp_path)
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


@pytest.mark.parametrize("stage", [0, 1])
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, stage):
    cfg = write_config(tmp_path)
    r = train_cli(cfg, f"parallel.zero_stage={stage}", "max_steps=10", "max_nonfinite_steps=3",
                  "faults.nan_loss_steps=[2,4,5,6]")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "3 consecutive steps had a non-finite loss" in r.stderr
    root = tmp_path / "ckpt"
    assert "step_00000004" in r.stderr  # names the last good checkpoint
    assert ckpt.newest_complete(root).name == "step_00000004"
    log = root / "logs" / "metrics.jsonl"
    assert [s["step"] for s in read_metrics(log, "skip")] == [3, 5, 6, 7]
    train_steps = {s["step"]: s for s in read_metrics(log)}
    assert sorted(train_steps) == [1, 2, 4]
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in train_steps.values())
    # the skipped step applied nothing: step 4 (after a skip) is as finite as the rest, and
    # the checkpoint's weights are finite
    sd = torch.load(ckpt.step_dir(root, 4) / "ds" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.isfinite(v).all() for v in sd.values())


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


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
    before = _snapshot(other)
    cfg = load_config(base, [f"checkpoint.dir={other}", "model.d_model=64"])
    with pytest.raises(ckpt.CheckpointError, match=r"another model \(model.d_model.*restore the model config to "
                       r"resume that run$"):  # other shapes: no on_model_change to offer
        train(cfg)
    cfg = load_config(base, [f"checkpoint.dir={other}", "parallel.precision=bf16"])  # was a raw FileNotFoundError
    with pytest.raises(ckpt.CheckpointError, match="saved with parallel.precision=fp32, the config says bf16"):
        train(cfg)
    assert _snapshot(other) == before


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


def _resumable_at_step_4(tmp_path, reference):
    """A copy of the reference run's checkpoints without its last: it resumes at step 4."""
    import shutil

    ref_tmp, _ = reference
    root = tmp_path / "ckpt"
    shutil.copytree(ref_tmp / "ckpt", root, ignore=shutil.ignore_patterns(".train.lock", "step_00000006"))
    (root / ckpt.LATEST).write_text("step_00000004")
    return root


def _fingerprints(root) -> dict[int, int]:
    return {r["step"]: r["data_fingerprint"] for r in read_metrics(root / "logs" / "metrics.jsonl")}


def test_a_batch_size_ramp_at_a_resume_reads_on_without_repeating(tmp_path, reference):
    """Global batch 4 -> 8 at step 4: refused by default (nothing written); with
    checkpoint.on_data_change=continue the run reads on from the saved position, so its
    step 5 reads exactly the samples of the reference's steps 5 and 6 (the fingerprint is
    a sum of token ids). Its shorter max_steps moves the cosine schedule: a warning."""
    ref_tmp, _ = reference
    root = _resumable_at_step_4(tmp_path, reference)
    cfg = write_config(tmp_path, max_steps=5, **{"parallel.global_batch_size": 8})
    before = _snapshot(root)
    with pytest.raises(ckpt.CheckpointError, match="parallel.global_batch_size: checkpoint 4, config 8.*"
                       "on_data_change=continue"):
        train(load_config(cfg, []))
    assert _snapshot(root) == before
    r = train_cli(cfg, "checkpoint.on_data_change=continue")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4" in r.stdout and "reading on from the saved position" in r.stdout
    assert "warning: the learning rate of step 4 is" in r.stdout and "(max_steps 6 -> 5)" in r.stdout
    ref = _fingerprints(ref_tmp / "ckpt")
    assert _fingerprints(root)[5] == ref[5] + ref[6]
    assert read_metrics(root / "logs" / "metrics.jsonl", "data_change")[0]["mode"] == "continue"


def test_a_resume_goes_on_with_changed_model_settings_when_allowed(tmp_path, reference):
    """Same shapes, another function (eigenvalues [0, 1] instead of [-1, 1]): refused by
    default; with checkpoint.on_model_change=allow the run loads its weights and goes on,
    and the requeue after its next checkpoint resumes exactly (no warning again)."""
    root = _resumable_at_step_4(tmp_path, reference)
    cfg = write_config(tmp_path, max_steps=6, **{"model.deltaproduct.allow_neg_eigval": False})
    with pytest.raises(ckpt.CheckpointError, match="allow_neg_eigval: checkpoint True, config False.*on_model_change"):
        train(load_config(cfg, []))
    r = train_cli(cfg, "checkpoint.on_model_change=allow", "faults.preempt_at_step=5")
    assert r.returncode == REQUEUE_EXIT_CODE, r.stderr[-3000:]
    assert "at step 4" in r.stdout and "warning: model settings changed at step 4 (model.deltaproduct." \
           "allow_neg_eigval: checkpoint True, config False)" in r.stdout
    r = train_cli(cfg, "checkpoint.on_model_change=allow")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 5" in r.stdout and "model settings changed" not in r.stdout
    assert read_metrics(root / "logs" / "metrics.jsonl", "model_change")[0]["step"] == 4


def test_a_new_data_stage_starts_its_data_once_and_then_resumes_exactly(tmp_path, reference):
    """Another dataset at step 4 (an annealing stage): refused by default and by continue;
    with restart the run reads the new data from its start. Preempted after one step and
    requeued with the same config, it resumes exactly (no second restart)."""
    from data.loader import TokenLoader
    from test_data_common import data_config, prepared

    root = _resumable_at_step_4(tmp_path, reference)
    other = prepared(40, 40)
    cfg = write_config(tmp_path, **{"data.sources": [{"path": str(other)}]})
    before = _snapshot(root)
    for policy, match in (("refuse", r"data.sources: checkpoint \[sha256:[0-9a-f]{12}\], config \[sha256:[0-9a-f]{12} "
                                     rf"at {re.escape(str(other))}\].*on_data_change=restart"),
                          ("continue", "continue keeps the saved data position, which means nothing")):
        with pytest.raises(ckpt.CheckpointError, match=match):
            train(load_config(cfg, [f"checkpoint.on_data_change={policy}"]))
    assert _snapshot(root) == before
    r = train_cli(cfg, "checkpoint.on_data_change=restart", "faults.preempt_at_step=5")
    assert r.returncode == REQUEUE_EXIT_CODE, r.stderr[-3000:]
    assert "at step 4" in r.stdout and "the data order starts from its beginning" in r.stdout
    r = train_cli(cfg, "checkpoint.on_data_change=restart")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 5" in r.stdout and "data changed" not in r.stdout
    with TokenLoader(data_config(tmp_path, other, job_id="expected"), 2, rank=0, world_size=1) as loader:
        sums = [int(b["input_ids"].sum()) for b, _ in zip(loader, range(4))]
    got = _fingerprints(root)
    assert (got[5], got[6]) == (sums[0] + sums[1], sums[2] + sums[3])
    assert all(math.isfinite(v) for v in losses(root).values())


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
    assert "Traceback" not in r.stderr
    assert ckpt.newest_complete(root) is None and not (root / ckpt.LATEST).exists()
    assert read_metrics(root / "logs" / "metrics.jsonl", "save_failed")[0]["step"] == 2


def test_export_round_trip(tmp_path, reference):
    ref_tmp, _ = reference
    root = ref_tmp / "ckpt"
    out = tmp_path / "export"
    assert export_main([str(root), str(out)]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["step"] == 6 and (out / "tokenizer.model").is_file()
    model = load_exported(out)
    cfg = load_config(root / "step_00000006" / "config.yaml")
    engine_state = torch.load(root / "step_00000006" / "ds" / "mp_rank_00_model_states.pt",
                              weights_only=True)["module"]
    direct = build_model(cfg.model)
    direct.load_state_dict({k[3:]: v for k, v in engine_state.items()})
    ids = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), direct(ids))
    again = export_checkpoint(root / "step_00000006", tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # re-exporting into an export killed while writing its weights: the marker goes first,
    # the old files stay whole, no temporary file is left; the rerun completes it
    import pretrain.export as export_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    (out / "eval").mkdir()  # what evaluations keep beside an export is left alone
    real = export_module._write_whole
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "_write_whole", lambda path, write: real(path, killed))
        with pytest.raises(KeyboardInterrupt):
            export_checkpoint(root, out)
    assert not (out / "export.json").exists() and load_exported(out) is not None
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    export_checkpoint(root, out)
    assert (out / "export.json").is_file() and (out / "eval").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ckpt.CheckpointError, match="exists and is not a directory"):
        export_checkpoint(root, tmp_path / "file")


def test_a_new_run_starts_from_an_exports_weights(tmp_path, reference, capsys):
    """checkpoint.init_from: the new run's weights are the export's (one step at lr 1e-10
    later its checkpoint still equals the export to 1e-8), its optimizer, step and data
    start fresh; once it has checkpoints, it resumes from them. A foreign shape, a training
    checkpoint or another tokenizer are refused before anything is written."""
    import shutil

    from safetensors.torch import load_file

    from pretrain.export import consolidated_state_dict

    ref_tmp, ref = reference
    exp = tmp_path / "export"
    export_checkpoint(ref_tmp / "ckpt" / "step_00000006", exp)
    cfg = write_config(tmp_path, ckpt_dir="tuned", max_steps=1, **{
        "checkpoint.init_from": str(exp), "optim.lr": 1e-10, "optim.weight_decay": 0.0, "optim.warmup_steps": 0})
    for over, match in ((["model.d_model=64"], r"holds other weights than this model has \(blocks.0.*export \[.*"
                                               r"model.d_model: checkpoint 32, config 64"),
                        ([f"checkpoint.init_from={ref_tmp / 'ckpt'}"], "export it first, `linrnn-export")):
        with pytest.raises(ckpt.CheckpointError, match=match):
            train(load_config(cfg, over))
    foreign = tmp_path / "foreign"
    shutil.copytree(exp, foreign)
    meta = json.loads((foreign / "export.json").read_text())
    (foreign / "export.json").write_text(json.dumps({**meta, "tokenizer_hash": "sha256:other"}))
    with pytest.raises(ckpt.CheckpointError, match="tokenizer sha256:other.*embeddings would read other tokens"):
        train(load_config(cfg, [f"checkpoint.init_from={foreign}"]))
    assert not (tmp_path / "tuned").exists()
    from pretrain.cli import main as train_main

    assert train_main([str(cfg), "--check", "model.deltaproduct.allow_neg_eigval=false"]) == 0
    out = capsys.readouterr().out
    assert f"; weights from {exp} (step 6 of its run)" in out and "check: model settings other than" in out
    r = train_cli(cfg, "model.deltaproduct.allow_neg_eigval=false")  # same shapes, other function: allowed
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"weights from {exp} (step 6 of its run" in r.stdout and "resumed from" not in r.stdout
    assert "model settings other than the export's ('checkpoint' being the export): " \
           "model.deltaproduct.allow_neg_eigval: checkpoint True, config False" in r.stdout
    got = consolidated_state_dict(ckpt.step_dir(tmp_path / "tuned", 1))
    want = load_file(str(exp / "model.safetensors"))
    assert want.keys() <= got.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")
    tuned = losses(tmp_path / "tuned")
    assert tuned[1] < ref[1] - 0.05  # the trained weights, not a fresh initialisation
    r = train_cli(cfg, "max_steps=2", "model.deltaproduct.allow_neg_eigval=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is not used: the run resumes from its own checkpoint" in r.stdout and "at step 1" in r.stdout


def test_every_checkpoint_of_a_run_is_evaluated_and_summarised_without_slurm(tmp_path, reference, capsys):
    """linrnn-eval-sweep --evaluate: each complete checkpoint exported and scored once (a
    rerun evaluates nothing again), then one table over training."""
    import shutil

    from evals.sweep import main as sweep_main

    ref_tmp, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_tmp / "ckpt", run, ignore=shutil.ignore_patterns(".train.lock", "exports"))
    args = [str(run), "--suite", "lm", "--evaluate", "--", "--heldout-batches", "1", "--no-progress"]
    assert sweep_main(args) == 0
    err = capsys.readouterr().err
    assert [f"evaluating step_{s:08d}" in err for s in (2, 4, 6)] == [True] * 3
    table = (run / "exports" / "sweep-lm.md").read_text()
    assert table.count("| complete |") == 3 and "| step_00000002 | 1,024 |" in table, table
    perplexities = [c["scores"]["held-out perplexity"]
                    for c in json.loads((run / "exports" / "sweep-lm.json").read_text())["checkpoints"]]
    assert perplexities == sorted(perplexities, reverse=True)  # training lowered it
    assert sweep_main(args) == 0 and "evaluating" not in capsys.readouterr().err


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
    before = _snapshot(other)
    assert train_main([str(cfg), "--check", f"checkpoint.dir={other}", "max_steps=12"]) == 0
    out = capsys.readouterr().out
    assert f"check: resume: from {other / 'step_00000006'} at step 6 (3,072 tokens); data: exact" in out
    assert "check: warning: the learning rate of step 6" in out and out.rstrip().endswith("a start would run")
    assert train_main([str(cfg), "--check", f"checkpoint.dir={other}", "checkpoint.on_model_change=allow",
                       "model.deltaproduct.allow_neg_eigval=false"]) == 0
    assert "check: model: settings changed (model.deltaproduct.allow_neg_eigval: checkpoint True, config " \
           "False), allowed" in capsys.readouterr().out
    assert train_main([str(cfg), "--check", f"checkpoint.dir={other}", "parallel.global_batch_size=8"]) == 2
    assert "parallel.global_batch_size: checkpoint 4, config 8" in capsys.readouterr().err
    assert _snapshot(other) == before and not (tmp_path / "ckpt").exists()


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


def test_a_rewind_resumes_from_an_earlier_step_and_can_skip_the_data_that_followed(tmp_path, reference):
    """``--rewind-to 2 --skip-steps 2`` on the reference's checkpoints (2, 4, 6): steps 4 and 6
    move aside; the resumed run's steps 3 and 4 read the reference's steps 5 and 6 samples
    at the schedule of steps 3 and 4. Preempted at step 3 and requeued, the run goes on
    from step 3's checkpoint, whose data position already lies past the skipped batches."""
    import shutil

    from pretrain import run_lock

    ref_tmp, _ = reference
    root = tmp_path / "ckpt"
    shutil.copytree(ref_tmp / "ckpt", root, ignore=shutil.ignore_patterns(".train.lock"))
    cfg = write_config(tmp_path, max_steps=4)
    for args, match in ((["--rewind-to", "3"], r"step_00000003' is not a complete checkpoint: the complete ones "
                                                r"in .* are at steps 2, 4, 6"),
                        (["--skip-steps", "2"], "--skip-steps goes with --rewind-to STEP")):
        r = train_cli(cfg, *args)
        assert r.returncode == 2 and re.search(match, r.stderr), r.stderr[-3000:]
    fd = run_lock.acquire(root, 0)  # a job training into the directory
    try:
        r = train_cli(cfg, "--rewind-to", "2")
        assert r.returncode == 2 and "another job is training into checkpoint.dir" in r.stderr, r.stderr[-3000:]
    finally:
        run_lock.release(fd)
    assert ckpt.newest_complete(root).name == "step_00000006"  # nothing moved
    for s in (2, 6):  # exports made by eval jobs: the one of step 6 must not pass for the new step 6
        (root / "exports" / f"step_{s:08d}").mkdir(parents=True)
    r = train_cli(cfg, "--rewind-to", "2", "--skip-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "moved step_00000004, step_00000006 and their exports (step_00000006) to" in r.stdout
    [aside] = (root / "rewound").iterdir()
    assert aside.name.endswith("-after-step_00000002") and (aside / "exports" / "step_00000006").is_dir()
    assert [p.name for p in (root / "exports").iterdir()] == ["step_00000002"]
    assert ckpt.newest_complete(root).name == "step_00000002"
    assert (root / ckpt.LATEST).read_text().strip() == "step_00000002"
    r = train_cli(cfg, "--check")
    assert r.returncode == 0 and "at step 2" in r.stdout and "drops the next 2 steps' batches" in r.stdout, r.stdout
    r = train_cli(cfg, "faults.preempt_at_step=3")
    assert r.returncode == REQUEUE_EXIT_CODE, r.stderr[-3000:]
    assert "skipping the data of 2 steps after step 2 (4 micro-batches per rank)" in r.stdout
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 3" in r.stdout and "skipping" not in r.stdout
    ref = _fingerprints(ref_tmp / "ckpt")
    got = _fingerprints(root)
    assert (got[3], got[4]) == (ref[5], ref[6])
    ref_lr = {m["step"]: m["lr"] for m in read_metrics(ref_tmp / "ckpt" / "logs" / "metrics.jsonl")}
    lr = {m["step"]: m["lr"] for m in read_metrics(root / "logs" / "metrics.jsonl")}
    assert lr[3] == ref_lr[3]  # the schedule goes on from step 2 (max_steps 4: the same warmup)
    assert read_metrics(root / "logs" / "metrics.jsonl", "data_skip")[0]["steps"] == 2
    # a rewind to the same step without --skip-steps drops an earlier rewind's request
    skip = ckpt.step_dir(root, 3) / "skip_data.json"
    assert train_cli(cfg, "--rewind-to", "3", "--skip-steps", "1").returncode == 0 and skip.is_file()
    r = train_cli(cfg, "--rewind-to", "3")
    assert r.returncode == 0 and not skip.exists() and "moved" not in r.stdout, r.stderr[-3000:]


def test_running_out_of_gpu_memory_stops_with_what_to_change(tmp_path, reference):
    """An out-of-memory error (injected: this machine has no GPU) stops the run with exit 1,
    the plan's estimate and the settings that lower it, and names the intact checkpoint."""
    cfg = write_config(tmp_path)
    r = train_cli(cfg, "faults.oom_at_step=3")
    assert r.returncode == 1, r.stderr[-3000:]
    assert re.search(r"error: rank 0: out of GPU memory at step 4 \(CUDA out of memory\. Tried to allocate 2\.00 GiB "
                     r"\(fault drill: faults\.oom_at_step\)\): the plan estimates [\d.]+ GB per GPU \(weights .*\)\. "
                     r"To fit: lower parallel\.micro_batch_size \(now 2; .*; or set parallel\.activation_checkpointing="
                     r"true; or set parallel\.offload_optimizer=true; or raise parallel\.zero_stage \(a new run only: a "
                     r"resume keeps the checkpoint's\)\..*The newest complete checkpoint, .*step_00000002, is intact\.",
                     r.stderr), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    cfg = write_config(tmp_path, max_steps=3, **{"logging.profile_steps": [2, 3]})
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    trace = tmp_path / "ckpt" / "logs" / "profile" / "rank00000-steps2-3.json"
    assert f"profile of steps 2..3 written to {trace}" in r.stdout
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"train step 2", "train step 3"} <= names and "train step 1" not in names
    assert any("aten::" in str(n) for n in names)  # the ops inside the steps
