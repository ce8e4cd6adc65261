"""``python -m launch`` without SLURM: N local ranks, signal forwarding, combined exit code."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_root():
    """A node-local root short enough for a per-job TMPDIR under it (pytest's tmp_path is
    not: AF_UNIX socket paths must stay under 108 bytes, so launch keeps TMPDIR then)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
# a stand-in rank: records its environment, then behaves as told by argv
RANK_SCRIPT = r"""
import json, os, signal, sys, time
out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TMPDIR",
        "LINRNN_DATA_CACHE", "TRITON_CACHE_DIR", "OMP_NUM_THREADS")
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({k: os.environ.get(k) for k in keys} | {"tmp_exists": os.path.isdir(os.environ.get("TMPDIR") or "/tmp")}, f)
if mode == "ok":
    sys.exit(0)
if mode == "fail1":  # rank 1 fails, rank 0 hangs in a "collective" that ignores SIGTERM
    if rank == 1:
        sys.exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
    sys.exit(0)
if mode == "preempt":  # wait for the forwarded signal, then exit with the requeue code
    open(f"{out}/ready{rank}", "w").close()
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        time.sleep(0.02)
    open(f"{out}/sig{rank}", "w").write(",".join(got))
    sys.exit(75 if got else 9)
"""


def _launch(tmp_path: Path, mode: str, *launch_args: str, local: Path | None = None, **popen) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), LINRNN_LOCAL_ROOT=str(local or tmp_path / "local"))
    env.pop("LINRNN_DATA_CACHE", None)
    env.pop("OMP_NUM_THREADS", None)  # the launch sets it
    return subprocess.Popen([sys.executable, "-m", "launch", *launch_args, "--", sys.executable, str(script),
                             str(tmp_path), mode], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True, **popen)


def test_ranks_get_distinct_ranks_one_rendezvous_and_private_dirs(tmp_path, short_root):
    p = _launch(tmp_path, "ok", "--nproc", "3", local=short_root)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"3"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2"]
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and envs[0]["MASTER_ADDR"] == "127.0.0.1"
    assert all(e["tmp_exists"] for e in envs) and len({e["TMPDIR"] for e in envs}) == 1
    assert envs[0]["TMPDIR"].startswith(str(short_root / "linrnn-local"))
    # one share of the CPUs this process may run on per rank (the parent had no OMP_NUM_THREADS)
    assert {e["OMP_NUM_THREADS"] for e in envs} == {str(max(1, len(os.sched_getaffinity(0)) // 3))}
    assert "rank 2/3" in err
    # the launch's private directory is gone afterwards
    assert not list(short_root.glob("linrnn-local*"))
    # under a long root, the ranks keep the environment's TMPDIR (their sockets would not fit)
    p = _launch(tmp_path, "ok", "--nproc", "2")
    assert p.wait(timeout=30) == 0
    assert json.loads((tmp_path / "rank0.json").read_text())["TMPDIR"] == os.environ.get("TMPDIR")


def test_a_failing_rank_stops_the_others_and_its_code_wins(tmp_path):
    start = time.monotonic()
    p = _launch(tmp_path, "fail1", "--nproc", "2", "--kill-grace", "1")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 3, err
    assert time.monotonic() - start < 20  # the hanging rank was killed, not waited for
    assert "rank 1 exited with 3" in err


def test_signals_are_forwarded_and_the_requeue_code_comes_back(tmp_path):
    p = _launch(tmp_path, "preempt", "--nproc", "2")
    deadline = time.time() + 20
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 75, err
    assert [(tmp_path / f"sig{r}").read_text() for r in range(2)] == ["USR1", "USR1"]


def test_sigterm_is_forwarded_too(tmp_path):
    p = _launch(tmp_path, "preempt", "--nproc", "1")
    deadline = time.time() + 20
    while not (tmp_path / "ready0").exists():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 75 and (tmp_path / "sig0").read_text() == "TERM"


def test_usage_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "launch", "--nproc", "2"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no command given" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch", "--", "no-such-command-xyz"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 127 and "command not found" in r.stderr


def test_combined_exit_code_rules():
    from launch.local import rank_envs, run_ranks

    envs = rank_envs(dict(os.environ), 2)
    code = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(0.3 * r); sys.exit({})"
    # a requeue code never hides a later real failure
    assert run_ranks([sys.executable, "-c", code.format("75 if r == 0 else 4")], envs) == 4
    assert run_ranks([sys.executable, "-c", code.format("75")], envs) == 75
    assert run_ranks([sys.executable, "-c", code.format("0")], envs) == 0
    # killed by a signal: 128 + N
    assert run_ranks([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                     envs[:1]) == 137


def test_checkpoint_picking(tmp_path):
    from launch.checkpoints import pick

    root = tmp_path / "ckpt"
    for step, complete in ((2, True), (4, False), (6, True)):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text("")
    assert pick(root, None).name == "step_00000006"
    assert [pick(root, i).name for i in (0, 1)] == ["step_00000002", "step_00000006"]
    with pytest.raises(ValueError, match="--array=0-1"):
        pick(root, 2)
    assert pick(root / "step_00000002", None) == root / "step_00000002"
    with pytest.raises(ValueError, match="no complete checkpoint"):
        pick(tmp_path / "empty", None)


def test_a_sweep_pins_its_checkpoints_so_pruning_cannot_shift_them(tmp_path, capsys):
    """Names pinned at submission: a task takes its own checkpoint, or says it was removed
    (never the i-th of a list that training changed meanwhile)."""
    import shutil

    from launch.checkpoints import main, pick

    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "COMPLETE").write_text("")
    assert main(["names", str(root)]) == 0
    names = capsys.readouterr().out.strip()
    assert names == "step_00000002,step_00000004,step_00000006"
    shutil.rmtree(root / "step_00000002")  # training saved step 8 and pruned step 2
    (root / "step_00000008").mkdir()
    (root / "step_00000008" / "COMPLETE").write_text("")
    pinned = names.split(",")
    assert [pick(root, i, pinned).name for i in (1, 2)] == ["step_00000004", "step_00000006"]
    assert pick(root, 1).name == "step_00000006"  # unpinned: the list moved on
    assert main(["pick", str(root), "0", "--names", names]) == 2
    assert "step_00000002' (array task 0) is gone: the training run removed it" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pinned 3 checkpoints"):
        pick(root, 3, pinned)


def test_a_local_launch_removes_its_directory_under_tmpdir(tmp_path, short_root):
    """Without LINRNN_LOCAL_ROOT the private directory lives under $TMPDIR, which the ranks
    get rewritten to a folder inside it: what is removed is the launch's own directory."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    tmpdir = short_root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINRNN_"))}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmpdir), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    r = subprocess.run([sys.executable, "-m", "launch", "--nproc", "2", "--", sys.executable, str(script),
                        str(tmp_path), "ok"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "rank0.json").read_text())["TMPDIR"].startswith(str(tmpdir / "linrnn-local"))
    assert list(tmpdir.iterdir()) == []


def test_ranks_leave_their_process_group_before_the_interpreter_exits(tmp_path):
    """Left to the interpreter's teardown, gloo's threads abort a finished rank now and then
    (exit 134, "terminate called without an active exception"; about 1 run in 15 here): the
    group is destroyed at exit, and nothing keeps a reference to it (its threads end only with
    the last one; a Shard holding the group still aborted 1 run in 100). A handler registered
    before runs after it, and sees the group and its threads gone."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, os, sys\n"
        "import torch.distributed as dist\n"
        "def gloo_threads():\n"
        "    names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]\n"
        "    return sum('gloo' in n for n in names)\n"
        "atexit.register(lambda: open(f\"{sys.argv[1]}/left{os.environ['RANK']}\", 'w').write(\n"
        "    f'{dist.is_initialized()} {gloo_threads()}'))\n"
        "from evals.sharding import shard_from_env\n"
        "shard = shard_from_env()\n"
        "assert shard.world == 2 and sorted(shard._all(shard.rank)) == [0, 1] and gloo_threads() > 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "launch", "--quiet", "--nproc", "2", "--", sys.executable, str(script),
                        str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [(tmp_path / f"left{rank}").read_text() for rank in (0, 1)] == ["False 0", "False 0"]
