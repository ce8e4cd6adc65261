"""The run log (``pretrain.run_log``): metrics.jsonl, TensorBoard and W&B across resumes.
No process group, no DeepSpeed engine."""
from __future__ import annotations


def test_a_resumed_job_continues_its_wandb_run(tmp_path, monkeypatch):
    """Every start of a job (requeues included) logs into one W&B run: the id is kept in the
    log directory. A stand-in ``wandb`` module records the calls (no network)."""
    import shutil
    import sys
    import types

    from pretrain.run_log import RunLog

    calls, logged = [], []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for start in range(2):
        log = RunLog(tmp_path / "logs", enabled=True, tensorboard=False, wandb_project="p", run_name="r",
                     config={"optim": {"lr": 1e-3}})
        log.write("train", start + 1, loss=2.5, lr=1e-3, note="text is not a scalar", skipped=False)
        log.close()
    # numbers go to W&B under event/key at their step (text and flags only to the JSONL file)
    assert logged == [(1, {"train/loss": 2.5, "train/lr": 1e-3}), (2, {"train/loss": 2.5, "train/lr": 1e-3})]
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] and calls[0]["resume"] == "allow"
    assert calls[0]["id"] in (tmp_path / "logs" / "wandb_run_id").read_text()
    shutil.copytree(tmp_path / "logs", tmp_path / "branch")  # a copied run: a W&B run of its own
    RunLog(tmp_path / "branch", enabled=True, tensorboard=False, wandb_project="p").close()
    assert calls[2]["id"] != calls[0]["id"]



def test_a_metrics_line_cut_by_a_kill_is_sealed_and_skipped(tmp_path):
    from pretrain.run_log import RunLog, read_metrics

    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    log.write("train", 1, loss=2.0)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 2, "lo')  # killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    log = RunLog(tmp_path, enabled=True, tensorboard=False)  # the resumed run
    log.write("train", 2, loss=1.5)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]



def _tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []



def test_tensorboard_shows_a_resumed_run_once_per_step(tmp_path):
    """The interrupted run logged steps 1-4 after its checkpoint at step 2; the resumed run logs
    3-6 again (after a rewind, with other values): TensorBoard shows each step once, the new one."""
    from pretrain.run_log import RunLog

    log = RunLog(tmp_path, enabled=True)
    for step in range(1, 5):
        log.write("train", step, loss=float(step), lr=1e-3, note="text")
    log.write("val", 4, loss=9.0)
    log.close()
    assert _tensorboard_scalars(tmp_path, "train/loss") == [(s, float(s)) for s in range(1, 5)]
    log = RunLog(tmp_path, enabled=True)
    log.write("model_change", 2, changes=1)  # a record before the restore is known
    log.continue_after(2)
    for step in range(3, 7):
        log.write("train", step, loss=step + 0.5)
    log.close()
    assert _tensorboard_scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 2.0)] + [(s, s + 0.5) for s in range(3, 7)]
    assert _tensorboard_scalars(tmp_path, "val/loss") == []  # step 4's validation was the old run's
    assert not _tensorboard_scalars(tmp_path, "train/note")



def test_tensorboard_missing_is_said_once_and_the_jsonl_goes_on(tmp_path, monkeypatch, capsys):
    import sys

    from pretrain.run_log import RunLog, read_metrics

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    log = RunLog(tmp_path, enabled=True)
    log.write("train", 1, loss=2.0)
    log.write("train", 2, loss=1.0)
    log.close()
    assert capsys.readouterr().err.count("pip install tensorboard") == 1
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2.0, 1.0]
    assert not (tmp_path / "tensorboard").exists()
