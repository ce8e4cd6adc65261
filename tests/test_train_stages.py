"""Single-process runs of ``linrnn-train`` that change course: a resume with another batch size,
model settings or data stage, a rewind to an earlier checkpoint, a run started from an export;
and the exports evals read. The reference run is conftest.py's ``reference``."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.config_loader import load_config
from pretrain.export import export_checkpoint, export_is_current, load_exported, main as export_main
from pretrain.models import build_model
from pretrain.preemption import REQUEUE_EXIT_CODE
from pretrain.run_log import read_metrics
from pretrain.trainer import train
from launching import run_launched
from test_train_common import fingerprints, losses, snapshot, train_cli, write_config

pytestmark = pytest.mark.slow


def _resumable_at_step_4(tmp_path, reference):
    """A copy of the reference run's checkpoints without its last: it resumes at step 4."""
    import shutil

    ref_tmp, _ = reference
    root = tmp_path / "ckpt"
    shutil.copytree(ref_tmp / "ckpt", root, ignore=shutil.ignore_patterns(".train.lock", "step_00000006"))
    (root / ckpt.LATEST).write_text("step_00000004")
    return root


def test_a_batch_size_ramp_at_a_resume_reads_on_without_repeating(tmp_path, reference):
    """Global batch 4 -> 8 at step 4: refused by default (nothing written); with
    checkpoint.on_data_change=continue the run reads on from the saved position, so its
    step 5 reads exactly the samples of the reference's steps 5 and 6 (the fingerprint is
    a sum of token ids). Its shorter max_steps moves the cosine schedule: a warning."""
    ref_tmp, _ = reference
    root = _resumable_at_step_4(tmp_path, reference)
    cfg = write_config(tmp_path, max_steps=5, **{"parallel.global_batch_size": 8})
    before = snapshot(root)
    with pytest.raises(ckpt.CheckpointError, match="parallel.global_batch_size: checkpoint 4, config 8.*"
                       "on_data_change=continue"):
        train(load_config(cfg, []))
    assert snapshot(root) == before
    r = train_cli(cfg, "checkpoint.on_data_change=continue")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4" in r.stdout and "reading on from the saved position" in r.stdout
    assert "warning: the learning rate of step 4 is" in r.stdout and "(max_steps 6 -> 5)" in r.stdout
    ref = fingerprints(ref_tmp / "ckpt")
    assert fingerprints(root)[5] == ref[5] + ref[6]
    assert read_metrics(root / "logs" / "metrics.jsonl", "data_change")[0]["mode"] == "continue"


def test_an_elastic_resume_estimates_a_save_without_the_universal_conversion(tmp_path, reference, monkeypatch):
    """The wall-clock budget needs what a save takes before this start has saved; the load of
    the checkpoint stands in for it, but the universal conversion before that load is not a
    save (for a big model it takes many minutes, and counted as one it could use up the budget
    before the first step). The estimate goes into the next checkpoint as last_save_s."""
    import time

    from pretrain import universal

    root = _resumable_at_step_4(tmp_path, reference)
    run = ckpt.step_dir(root, 4) / "run.json"
    run.write_text(json.dumps({**json.loads(run.read_text()), "world_size": 2}))  # saved by 2 ranks: elastic
    real = universal.ensure
    monkeypatch.setattr(universal, "ensure", lambda *a, **k: (time.sleep(2.0), real(*a, **k))[1])
    result = train(load_config(write_config(tmp_path), []))
    assert result.status == "done"
    assert (ckpt.step_dir(root, 4) / "universal").is_dir()  # the elastic path was taken
    assert ckpt.read_run_state(ckpt.step_dir(root, 6))["last_save_s"] < 1.5


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
    before = snapshot(root)
    for policy, match in (("refuse", r"data.sources: checkpoint \[sha256:[0-9a-f]{12}\], config \[sha256:[0-9a-f]{12} "
                                     rf"at {re.escape(str(other))}\].*on_data_change=restart"),
                          ("continue", "continue keeps the saved data position, which means nothing")):
        with pytest.raises(ckpt.CheckpointError, match=match):
            train(load_config(cfg, [f"checkpoint.on_data_change={policy}"]))
    assert snapshot(root) == before
    r = train_cli(cfg, "checkpoint.on_data_change=restart", "faults.preempt_at_step=5")
    assert r.returncode == REQUEUE_EXIT_CODE, r.stderr[-3000:]
    assert "at step 4" in r.stdout and "the data order starts from its beginning" in r.stdout
    r = train_cli(cfg, "checkpoint.on_data_change=restart")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 5" in r.stdout and "data changed" not in r.stdout
    with TokenLoader(data_config(tmp_path, other, job_id="expected"), 2, rank=0, world_size=1) as loader:
        sums = [int(b["input_ids"].sum()) for b, _ in zip(loader, range(4))]
    got = fingerprints(root)
    assert (got[5], got[6]) == (sums[0] + sums[1], sums[2] + sums[3])
    assert all(math.isfinite(v) for v in losses(root).values())


def test_export_round_trip(tmp_path, reference):
    ref_tmp, _ = reference
    root = ref_tmp / "ckpt"
    out = tmp_path / "export"
    assert export_main([str(root), str(out)]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["step"] == 6 and (out / "tokenizer.model").is_file()
    assert meta["add_bos"] is False  # the data's documents had no BOS: the evals start prompts without one
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
    # two exports into one directory (two sweeps of the same run): the second waits for the
    # first (then finds this very save exported and keeps it)
    import fcntl
    import os
    import threading

    fd = os.open(again / ".export.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first export, still writing
    errors: list[BaseException] = []

    def second_export() -> None:
        try:
            export_checkpoint(root / "step_00000006", again)
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    second = threading.Thread(target=second_export)
    second.start()
    second.join(timeout=3.0)
    assert second.is_alive()  # waits (an export of this tiny model takes well under a second)
    os.close(fd)
    second.join(timeout=60)
    assert not second.is_alive() and errors == [] and export_is_current(root / "step_00000006", again)
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
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    (out / ".model.safetensors.4194304.tmp").write_bytes(b"x" * 1000)  # an export killed by SIGKILL left it
    export_checkpoint(root, out)
    assert (out / "export.json").is_file() and (out / "eval").is_dir()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the rerun swept it
    (tmp_path / "file").write_text("")
    with pytest.raises(ckpt.CheckpointError, match="exists and is not a directory"):
        export_checkpoint(root, tmp_path / "file")


def test_an_export_is_reused_only_for_the_same_save_of_its_step(tmp_path, reference, capsys):
    """eval.sbatch and the sweep export step_N to exports/step_N once; a later save of step N
    (a run restarted or rewound in the same directory) replaces that export and its scores."""
    import shutil

    ref_tmp, _ = reference
    step = tmp_path / "ckpt" / "step_00000006"
    shutil.copytree(ref_tmp / "ckpt" / "step_00000006", step)
    out = tmp_path / "ckpt" / "exports" / step.name
    assert export_main([str(step), str(out), "--reuse"]) == 0 and "exported" in capsys.readouterr().out
    (out / "eval" / "lm").mkdir(parents=True)
    (out / "eval" / "lm" / "results.json").write_text("{}")
    assert export_main([str(step), str(out), "--reuse"]) == 0
    assert "kept" in capsys.readouterr().out and (out / "eval" / "lm" / "results.json").is_file()
    assert export_main([str(step), str(out), "--reuse", "--dtype", "bf16"]) == 0  # another dtype: exported again
    assert "exported" in capsys.readouterr().out
    state = json.loads((step / "run.json").read_text())
    (step / "run.json").write_text(json.dumps({**state, "save_id": "a-later-save"}))
    assert export_main([str(step), str(out), "--reuse", "--dtype", "bf16"]) == 0
    assert "exported" in capsys.readouterr().out and not (out / "eval").exists()
    assert json.loads((out / "export.json").read_text())["save_id"] == "a-later-save"


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
    shutil.rmtree(exp)  # the export purged from scratch storage: the resume does not need it
    r = train_cli(cfg, "max_steps=2", "model.deltaproduct.allow_neg_eigval=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is not used: the run resumes from its own checkpoint" in r.stdout and "at step 1" in r.stdout


def test_the_eval_harness_scores_the_held_out_split_as_training_validates_it(tmp_path):
    """linrnn-eval's held-out perplexity on an export reads the sequences training's
    validation reads (spread evenly over the split) and scores them the same way: its loss
    per token is the run's validation loss at that step."""
    from evals import lm
    from evals.checkpoint import load_checkpoint

    cfg = write_config(tmp_path, max_steps=2, **{"eval.every_steps": 2, "eval.val_sequences": 6})
    r = train_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    val = {rec["step"]: rec["loss"] for rec in read_metrics(tmp_path / "ckpt" / "logs" / "metrics.jsonl", "val")}
    export_checkpoint(ckpt.step_dir(tmp_path / "ckpt", 2), tmp_path / "export")
    ck = load_checkpoint(tmp_path / "export")
    held = lm.heldout_perplexity(ck.model, ck.tokenizer, lm.heldout_data_config("run", ck.run_config),
                                 max_batches=1, batch_size=6, progress=False)
    assert held.nll_per_token == pytest.approx(val[2], rel=1e-6) and held.nll_per_token != pytest.approx(val[0])


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
    # the same on two ranks (one box, python -m launch): rank 0 exports, both score, rank 0 writes
    two = tmp_path / "two"
    shutil.copytree(ref_tmp / "ckpt", two, ignore=shutil.ignore_patterns(".train.lock", "exports"))
    r = run_launched(tmp_path, 2, "evals.sweep", str(two), *args[1:])
    assert r.returncode == 0 and r.stdout.count("wrote ") == 4, r.stderr[-3000:]  # 3 evaluations + the table
    assert [r.stderr.count(f"evaluating step_{s:08d}") for s in (2, 4, 6)] == [1] * 3
    rows = json.loads((two / "exports" / "sweep-lm.json").read_text())["checkpoints"]
    assert [c["scores"]["held-out perplexity"] for c in rows] == pytest.approx(perplexities, rel=1e-5)
    assert all(json.loads((two / "exports" / c["checkpoint"] / "eval" / "lm" / "results.json").read_text())["ranks"]
               == 2 for c in rows)


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
    ref = fingerprints(ref_tmp / "ckpt")
    got = fingerprints(root)
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
