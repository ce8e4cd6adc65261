"""The node-local directories of this user's finished SLURM jobs are swept at a job's start,
and nothing else: not live jobs', not other users', not the shared Triton cache, and
nothing at all when squeue cannot say which jobs are live."""
from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

import pytest

from launch import cli, stale_dirs
from launch.stale_dirs import KEEP, parse_job_ids, squeue_job_ids, sweep

OWN = "500"


def _env(root: Path, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": OWN, "LINRNN_LOCAL_ROOT": str(root), **extra}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A local root holding: this job's dir, finished jobs 17 and 23 (23 with a shard
    copy), live job 42, the Triton cache, and look-alikes that are not job dirs."""
    r = tmp_path / "local"
    for name in (f"linrnn-job{OWN}", "linrnn-job17", "linrnn-job23/data", "linrnn-job42/tmp",
                 f"linrnn-triton-{os.getuid()}", "linrnn-jobabc", "linrnn-local123", "linrnn-job12x", "other"):
        (r / name).mkdir(parents=True)
    (r / "linrnn-job23" / "data" / "shard.00000.mds").write_bytes(b"x" * 100_000)
    (r / "linrnn-job99").write_text("a file, not a job dir")
    (r / "linrnn-job77").symlink_to(r / "other")  # a link is not followed nor removed
    return r


def _left(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


ALL = {f"linrnn-job{OWN}", "linrnn-job17", "linrnn-job23", "linrnn-job42", f"linrnn-triton-{os.getuid()}",
       "linrnn-jobabc", "linrnn-local123", "linrnn-job12x", "other", "linrnn-job99", "linrnn-job77"}


def test_finished_jobs_dirs_go_and_everything_else_stays(root):
    log = io.StringIO()
    removed = sweep(_env(root), list_jobs=lambda: {int(OWN), 42, 7}, log=log)
    assert sorted(p.name for p in removed) == ["linrnn-job17", "linrnn-job23"]
    assert _left(root) == ALL - {"linrnn-job17", "linrnn-job23"}
    assert (root / "other").is_dir()  # the link's target is untouched
    line, = log.getvalue().splitlines()
    assert line.startswith("[launch] ") and "removed 2 " in line and "linrnn-job17, linrnn-job23" in line
    assert "KiB freed" in line  # the shard copy's 100 kB


def test_nothing_stale_says_nothing_and_asks_squeue_only_when_needed(root, tmp_path):
    log = io.StringIO()
    assert sweep(_env(root), list_jobs=lambda: {int(OWN), 17, 23, 42}, log=log) == []
    assert _left(root) == ALL and log.getvalue() == ""
    empty = tmp_path / "empty"
    (empty / f"linrnn-job{OWN}").mkdir(parents=True)

    def never() -> set[int]:
        raise AssertionError("squeue asked with no candidate")

    assert sweep(_env(empty), list_jobs=never, log=log) == []
    assert sweep(_env(tmp_path / "missing"), list_jobs=never, log=log) == [] and log.getvalue() == ""


def test_candidates_leave_out_this_jobs_own_dir(root):
    found = stale_dirs.candidates(root, root / f"linrnn-job{OWN}", os.getuid())
    assert {i: p.name for i, p in found.items()} == {17: "linrnn-job17", 23: "linrnn-job23", 42: "linrnn-job42"}


def test_other_users_dirs_are_kept(root, monkeypatch):
    theirs = str(root / "linrnn-job17")
    real = stale_dirs.owner
    monkeypatch.setattr(stale_dirs, "owner", lambda p: os.getuid() + 1 if str(p) == theirs else real(p))
    removed = sweep(_env(root), list_jobs=lambda: {int(OWN)}, log=io.StringIO())
    assert [p.name for p in removed] == ["linrnn-job23", "linrnn-job42"]
    assert (root / "linrnn-job17").is_dir()


@pytest.mark.parametrize("answer", [None, {42, 17}])  # squeue failed; squeue does not list this very job
def test_no_usable_answer_removes_nothing(root, answer):
    log = io.StringIO()
    assert sweep(_env(root), list_jobs=lambda: answer, log=log) == []
    assert _left(root) == ALL
    assert "left 3 earlier job directory(ies)" in log.getvalue() and KEEP in log.getvalue()


@pytest.mark.parametrize("env", [{KEEP: "1"}, {"SLURM_JOB_ID": ""}, {"SLURM_JOB_ID": "12_3"}])
def test_opt_out_and_no_slurm_job_remove_nothing(root, env):
    def never() -> set[int]:
        raise AssertionError("squeue asked")

    assert sweep(_env(root, **env), list_jobs=never, log=io.StringIO()) == []
    assert _left(root) == ALL
    assert sweep(_env(root, **{KEEP: "0"}), list_jobs=lambda: {int(OWN)}, log=io.StringIO())  # 0 = not opted out


def test_parse_job_ids():
    assert parse_job_ids("17\n 23 \n\n500\n") == {17, 23, 500}
    assert parse_job_ids("") == set()
    for bad in ("17\nslurm_load_jobs error: Socket timed out\n", "CLUSTER: a\n17\n", "12_3\n", "17+0\n", "1²\n"):
        assert parse_job_ids(bad) is None


def _fake_squeue(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {bin_dir}/args\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("body,expected", [
    ("printf '17\\n500\\n'", {17, 500}),
    ("echo 'squeue: error: Invalid user'; exit 1", None),
    ("echo 17; exit 1", None),
    ("echo 'JOBID'; echo 17", None),
    ("exec sleep 5", None),  # hung: timed out
])
def test_squeue_answers(tmp_path, monkeypatch, body, expected):
    _fake_squeue(tmp_path / "bin", body)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert squeue_job_ids(uid=1234, timeout=1.0) == expected
    args = (tmp_path / "bin" / "args").read_text().split()
    assert {"--states=all", "--user=1234", "--format=%A", "--noheader", "--all"} <= set(args)


def test_squeue_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert squeue_job_ids() is None


@pytest.fixture
def slurm_task(root, tmp_path, monkeypatch):
    """os.environ of task ``SLURM_LOCALID`` of a one-node srun step of job 500, with a
    stand-in squeue on PATH listing this job and job 42; exec recorded instead of done."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "LINRNN_"))] + ["RANK", "LOCAL_RANK", "TMPDIR"]:
        monkeypatch.delenv(key, raising=False)
    _fake_squeue(tmp_path / "bin", f"printf '{OWN}\\n42\\n'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": OWN, "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost",
                       "SLURM_STEP_TASKS_PER_NODE": "2", "LINRNN_LOCAL_ROOT": str(root)}.items():
        monkeypatch.setenv(key, value)

    class Exec(Exception):
        pass

    def execvpe(file: str, args: list[str], env: dict[str, str]) -> None:
        raise Exec(env)

    monkeypatch.setattr(cli.os, "execvpe", execvpe)
    return monkeypatch, Exec


def test_the_launch_entry_point_sweeps_once_per_node(slurm_task, root, capsys):
    monkeypatch, Exec = slurm_task
    monkeypatch.setenv("SLURM_PROCID", "1")  # local rank 1: leaves the sweep to local rank 0
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(Exec):
        cli.main(["--quiet", "--", sys.executable, "-c", "pass"])
    assert _left(root) == ALL
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    with pytest.raises(Exec) as done:
        cli.main(["--quiet", "--", sys.executable, "-c", "pass"])
    assert _left(root) == ALL - {"linrnn-job17", "linrnn-job23"}
    assert "removed 2 directory(ies) of finished jobs" in capsys.readouterr().err
    assert done.value.args[0]["LINRNN_DATA_CACHE"] == str(root / f"linrnn-job{OWN}" / "data")


def test_a_launch_in_a_job_outside_srun_sweeps_too(slurm_task, root):
    monkeypatch, _ = slurm_task
    monkeypatch.delenv("SLURM_STEP_ID")  # e.g. sbatch --wrap "python -m launch --nproc 2 -- ..."
    assert cli.main(["--quiet", "--", sys.executable, "-c", "pass"]) == 0
    assert _left(root) == ALL - {"linrnn-job17", "linrnn-job23"}
