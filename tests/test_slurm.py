"""The sbatch scripts against a real one-node SLURM cluster (started here, shut down at the end).

Skipped when SLURM is not installed (``slurm/ci_install.sh`` installs it) or not root.
The runs are the tiny CPU pretraining run of the training tests on 2 ranks (``--ntasks=2``
over gloo): an uninterrupted reference; one signalled mid-run as SLURM does before the
time limit (it must checkpoint, requeue itself, resume and end with the reference's
losses, all in one log); one cancelled with scancel (no requeue, checkpoints intact);
one whose rank is killed outright after a checkpoint (it must requeue itself and end with the
reference's losses); and an eval job on the exported final checkpoint.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, missing_reason

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
# steps take ~0.1 s here: enough of them that a signal sent after step SAVE_EVERY + 1
# lands well before the end, even though its delivery takes up to a second
MAX_STEPS, SAVE_EVERY = 60, 5
# a CPU "node": no GPUs, one CPU per rank, both ranks on it
CPU_JOB = ("--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
           "--time=15")


def _engine_missing() -> str | None:
    for mod in ("pretrain.trainer", "pretrain.export", "data.loader", "deepspeed"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not importable: the training engine is needed for the SLURM runs"
    return None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-runs")


def _job_env(workdir: Path, **extra: str) -> dict[str, str]:
    # node-local job dirs under the test's directory: job ids restart at 1 with every cluster
    env = {"LINRNN_PYTHON": sys.executable, "LINRNN_LOCAL_ROOT": str(workdir / "local"), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    env.update(extra)
    return env


def _log(workdir: Path, job: str) -> str:
    paths = list(workdir.glob(f"*-{job}.log"))
    return paths[0].read_text(errors="replace") if paths else "(no log)"


def _submit_pretrain(cluster: SlurmCluster, workdir: Path, name: str, **env: str) -> tuple[str, Path]:
    if reason := _engine_missing():
        pytest.skip(reason)
    from test_train_common import write_config

    cfg = write_config(workdir, name=f"{name}.yaml", ckpt_dir=name,
                       **{"max_steps": MAX_STEPS, "checkpoint.every_steps": SAVE_EVERY, "checkpoint.keep_last": 5})
    job = cluster.sbatch(*CPU_JOB, f"--job-name={name}", f"--output={workdir}/%x-%j.log", f"--chdir={ROOT}",
                         str(SLURM / "pretrain.sbatch"), str(cfg), env=_job_env(workdir, **env))
    return job, workdir / name


def _rank_pids(config_name: str) -> list[int]:
    """The training processes (``python -m pretrain <config>``) of a job, by their command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and args[1:3] == [b"-m", b"pretrain"] and args[3].endswith(config_name.encode()):
            pids.append(int(proc.name))
    return pids


def _wait_for_step(ckpt: Path, step: int, cluster: SlurmCluster, job: str, timeout: float = 120) -> None:
    metrics = ckpt / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        if cluster.job(job)["JobState"] not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.2)
    raise AssertionError(f"job {job} never reached step {step}: {cluster.job(job)}")


def _requeued_then_completed(cluster: SlurmCluster, workdir: Path, job: str) -> str:
    """Waits for ``job`` to requeue itself, lets it start again, waits for it to complete
    with exit 0; returns its log."""
    fields = cluster.wait(job, lambda f: f["JobState"] == "PENDING" and f.get("Restarts", f.get("RestartCnt")) != "0"
                          or f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 120)
    assert fields["JobState"] == "PENDING", _log(workdir, job)[-6000:]
    cluster.release_requeued(job)
    fields = cluster.wait_done(job, 180)
    log = _log(workdir, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, log[-6000:], cluster.daemon_logs())
    return log


def test_srun_tasks_get_torch_distributed_variables(cluster, workdir):
    """Real SLURM variables -> RANK/WORLD_SIZE/... through python -m launch, one line per task."""
    out = workdir / "env-%j.log"
    show = "echo R=$RANK W=$WORLD_SIZE L=$LOCAL_RANK LW=$LOCAL_WORLD_SIZE A=$MASTER_ADDR P=$MASTER_PORT T=$TMPDIR"
    job = cluster.sbatch(*CPU_JOB, f"--output={out}", f"--chdir={ROOT}", "--wrap",
                         f"srun {sys.executable} -m launch --quiet -- sh -c '{show}'", env=_job_env(workdir))
    fields = cluster.wait_done(job, 60)
    text = (workdir / f"env-{job}.log").read_text()
    assert fields["JobState"] == "COMPLETED", text
    from launch.slurm_env import MAX_TMPDIR_CHARS, master_port

    lines = sorted(line for line in text.splitlines() if line.startswith("R="))
    host = cluster.host
    assert [line.split(" T=")[0] for line in lines] == [
        f"R={r} W=2 L={r} LW=2 A={host} P={master_port(job)}" for r in (0, 1)]
    job_tmp = f"{workdir}/local/linrnn-job{job}/tmp"  # unless too long for multiprocessing's sockets
    assert all(line.endswith(f"T={job_tmp}") == (len(job_tmp) <= MAX_TMPDIR_CHARS) for line in lines), lines


@pytest.fixture(scope="module")
def reference(cluster, workdir):
    """The uninterrupted 2-rank run: (job id, checkpoint dir, per-step losses, log text)."""
    from test_train_common import losses

    job, ckpt = _submit_pretrain(cluster, workdir, "ref")
    fields = cluster.wait_done(job, 180)
    log = _log(workdir, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-6000:]
    return job, ckpt, losses(ckpt), log


def test_two_ranks_train_together(reference):
    job, ckpt, losses, log = reference
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert f"job {job} restart 0, rank 0/2" in log and f"job {job} restart 0, rank 1/2" in log
    start = [json.loads(line) for line in (ckpt / "logs" / "metrics.jsonl").read_text().splitlines()][0]
    assert start["event"] == "start" and start["world_size"] == 2
    assert "2 rank(s)" in log and "training exited with 0" in log and "requeuing job" not in log
    assert (ckpt / f"step_{MAX_STEPS:08d}" / "COMPLETE").is_file()


def test_signal_checkpoints_requeues_resumes_and_matches(cluster, workdir, reference):
    from test_train_common import losses

    job, ckpt = _submit_pretrain(cluster, workdir, "preempt")
    _wait_for_step(ckpt, SAVE_EVERY + 1, cluster, job)
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@N does
    log = _requeued_then_completed(cluster, workdir, job)
    # one log across the requeue, the restart count logged, a resume from the saved step
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log
    assert "got SIGUSR1" in log and "training exited with 75" in log and f"requeuing job {job}" in log
    assert "resumed from" in log and "requeue failed" not in log
    stopped = json.loads([line for line in (ckpt / "logs" / "metrics.jsonl").read_text().splitlines()
                          if '"preempted"' in line][0])["step"]
    assert SAVE_EVERY < stopped < MAX_STEPS, stopped
    assert f"resumed from {ckpt / f'step_{stopped:08d}'}" in log
    ref = reference[2]
    got = losses(ckpt)
    assert got[MAX_STEPS] == ref[MAX_STEPS]
    assert got == ref


def test_a_crashed_rank_after_a_checkpoint_requeues_and_resumes_to_the_same_losses(cluster, workdir, reference):
    """A rank killed outright (as by a GPU fault) after the run saved a checkpoint: the job
    requeues itself and the resumed run ends with the uninterrupted run's losses."""
    import signal

    from test_train_common import losses

    job, ckpt = _submit_pretrain(cluster, workdir, "crash", LINRNN_SRUN_WAIT="5")
    _wait_for_step(ckpt, SAVE_EVERY + 1, cluster, job)
    pids = _rank_pids("crash.yaml")
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    log = _requeued_then_completed(cluster, workdir, job)
    assert "in this start (it began from no checkpoint): requeuing to resume from it" in log, log[-6000:]
    assert f"requeuing job {job}" in log and "resumed from" in log
    assert losses(ckpt) == reference[2]


def test_scancel_does_not_requeue_and_keeps_checkpoints(cluster, workdir):
    from pretrain.checkpoint import newest_complete, read_run_state

    job, ckpt = _submit_pretrain(cluster, workdir, "cancel")
    _wait_for_step(ckpt, SAVE_EVERY + 1, cluster, job)
    cluster.run("scancel", job)
    fields = cluster.wait_done(job, 90)
    time.sleep(2)
    fields = cluster.job(job)
    log = _log(workdir, job)
    assert fields["JobState"] == "CANCELLED", log[-4000:]
    assert fields.get("Restarts", fields.get("RestartCnt", "0")) == "0"
    assert "not requeuing" in log and f"requeuing job {job}" not in log
    newest = newest_complete(ckpt)
    assert newest is not None and read_run_state(newest)["step"] >= SAVE_EVERY, log[-4000:]
    assert (ckpt / "latest").read_text().strip().endswith(newest.name)


def test_eval_job_exports_and_evaluates_the_final_checkpoint(cluster, workdir, reference):
    """eval.sbatch on a step directory: it exports it (safetensors + config) beside the step
    directories, out of pruning's way, and evaluates the export; with --ntasks=2 the two
    ranks share the checkpoint suites' items (held-out batches, passkey prompts)."""
    _, ckpt, _, _ = reference
    step = ckpt / f"step_{MAX_STEPS:08d}"
    job = cluster.sbatch("--ntasks=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                         f"--output={workdir}/%x-%j.log", f"--chdir={ROOT}", str(SLURM / "eval.sbatch"),
                         str(step), "lm,passkey", "--heldout-batches", "3", "--passkey-lengths", "128,192",
                         "--depths", "0,1", "--trials", "2", env=_job_env(workdir))
    fields = cluster.wait_done(job, 180)
    log = _log(workdir, job)
    assert fields["JobState"] == "COMPLETED", log[-6000:]
    export = ckpt / "exports" / step.name
    assert json.loads((export / "export.json").read_text())["step"] == MAX_STEPS
    results = export / "eval" / "lm+passkey" / "results.json"
    assert results.is_file(), log[-4000:]
    data = json.loads(results.read_text())
    assert data["complete"] and data["ranks"] == 2 and f"results: {results}" in log
    assert data["results"]["heldout"]["tokens"] > 0 and None not in sum(data["results"]["passkey"]["accuracy"], [])


def test_an_eval_sweep_scores_every_checkpoint_then_summarises(cluster, workdir, reference):
    """eval_sweep.sh on a run with two checkpoints: an array task each (export, then the lm
    suite on the run's validation split), then the summary job once both ended."""
    import re
    import shutil
    import subprocess

    _, ckpt, _, _ = reference
    run = workdir / "sweep-run"
    keep = {f"step_{s:08d}" for s in (MAX_STEPS - SAVE_EVERY, MAX_STEPS)}
    shutil.copytree(ckpt, run, ignore=lambda d, names: [n for n in names if n.startswith("step_") and n not in keep
                                                        or n in ("logs", ".train.lock")])
    r = subprocess.run(["bash", str(SLURM / "eval_sweep.sh"), str(run), "lm", "--ntasks=1", "--gpus-per-node=0",
                        "--cpus-per-task=1", "--time=10", f"--output={workdir}/%x-%A_%a.log", f"--chdir={workdir}",
                        "--", "--heldout-batches", "1"],
                       env=cluster.env(**_job_env(workdir)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs = re.findall(r"Submitted batch job (\d+)", r.stdout)
    assert len(jobs) == 2, r.stdout
    fields = cluster.wait_done(jobs[1], 300)
    assert fields["JobState"] == "COMPLETED", (_log(workdir, jobs[1]), r.stdout)
    for name in sorted(keep):
        res = json.loads((run / "exports" / name / "eval" / "lm" / "results.json").read_text())
        assert res["complete"] and res["results"]["heldout"]["data"] == "run"
    table = (run / "exports" / "sweep-lm.md").read_text()
    assert all(f"| {name} |" in table for name in keep) and table.count("| complete |") == 2, table
