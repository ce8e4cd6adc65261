"""The sbatch scripts' own logic, without SLURM: bash runs them with stand-in ``srun`` and
``scontrol`` on PATH, so the requeue decisions are checked in a second (the real-cluster
runs are in test_slurm.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
# a stand-in srun: "trains" FAKE_WAIT x 50 ms; a signal stops it with FAKE_STOP_RC (75); it
# saves FAKE_SAVE (a complete checkpoint) at the end or when stopped
FAKE_SRUN = r"""#!/bin/bash
echo "srun $* [cpus ${SRUN_CPUS_PER_TASK:-unset}]" >> "$CALLS"
case "$*" in *--clean*) exit 0;; esac
save() { if [ -n "$FAKE_SAVE" ]; then mkdir -p "$FAKE_SAVE" && touch "$FAKE_SAVE/COMPLETE"; fi; }
trap 'echo got-$((++n)) >> "$CALLS"; [ -n "$FAKE_SLOW_STOP" ] || { save; exit "${FAKE_STOP_RC:-75}"; }' USR1
trap 'save; exit "${FAKE_STOP_RC:-75}"' TERM
[ -n "$FAKE_DIE_ON_USR1" ] && trap - USR1
touch "$READY"
for _ in $(seq "$FAKE_WAIT"); do sleep 0.05; done
save
exit "$FAKE_RC"
"""
FAKE_SCONTROL = '#!/bin/bash\necho "scontrol $*" >> "$CALLS"\n'


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sbatch")) + ["ci_install.sh", "eval_sweep.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_pretrain_defaults_requeue_signal_and_one_log():
    head = [line for line in (SLURM / "pretrain.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in head and "#SBATCH --open-mode=append" in head
    assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in head)
    assert any(line.startswith("#SBATCH --output=") and "%j" in line for line in head)


def _fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """An environment whose srun and scontrol are the stand-ins, and their call log and
    "ready" file (touched once srun runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls, ready = tmp_path / "calls", tmp_path / "ready"
    for f in (calls, ready):
        f.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINRNN_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CALLS=str(calls), READY=str(ready))
    return env, calls, ready


def _run(tmp_path: Path, rc: int, restart: int = 0, send: signal.Signals | tuple | None = None,
         max_requeues: str | None = None, die_on_usr1: bool = False, config: str = "run.yaml",
         **extra: str) -> tuple[int, str, str]:
    env, calls, ready = _fake_slurm(tmp_path)
    env.update(FAKE_RC=str(rc), FAKE_WAIT="400" if send else "0", LINRNN_PYTHON=sys.executable,
               SLURM_JOB_ID="77", SLURM_RESTART_COUNT=str(restart), SLURM_JOB_NODELIST="vm", SLURM_NTASKS="2",
               SLURM_JOB_NUM_NODES="1", PYTHONPATH=str(ROOT), **extra)
    if die_on_usr1:  # the rank has not installed its signal handler yet
        env["FAKE_DIE_ON_USR1"] = "1"
    if max_requeues is not None:
        env["LINRNN_MAX_REQUEUES"] = max_requeues
    p = subprocess.Popen(["bash", str(SLURM / "pretrain.sbatch"), config, "optim.lr=1e-3"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send is not None:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        for i, sig in enumerate(send if isinstance(send, tuple) else (send,)):
            if i:
                time.sleep(0.3)  # the script forwards one before the next comes
            p.send_signal(sig)
    out, _ = p.communicate(timeout=30)
    return p.returncode, out, calls.read_text() if calls.exists() else ""


def test_finished_run_cleans_up_and_does_not_requeue(tmp_path):
    code, out, calls = _run(tmp_path, rc=0)
    assert code == 0 and "scontrol" not in calls, out
    assert "-m launch -- " in calls and "-m pretrain run.yaml optim.lr=1e-3" in calls and "--clean" in calls
    assert "SLURM_RESTART_COUNT=0" in out and "[cpus unset]" in calls
    # the job's --cpus-per-task reaches the ranks: srun (Slurm >= 22.05) reads it from SRUN_CPUS_PER_TASK
    code, out, calls = _run(tmp_path, rc=0, SLURM_CPUS_PER_TASK="16")
    assert code == 0 and calls.count("[cpus 16]") == calls.count("srun "), calls


def test_failed_run_does_not_requeue(tmp_path):
    code, out, calls = _run(tmp_path, rc=1)
    assert code == 1 and "scontrol" not in calls, out


def test_a_failure_after_a_new_checkpoint_requeues_one_without_progress_does_not(tmp_path):
    root = tmp_path / "ckpt"
    config = tmp_path / "run.yaml"
    config.write_text(f"name: crash\ncheckpoint:\n  dir: {root}\n")
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "COMPLETE").touch()
    # a rank crashed (SIGKILL: 137) after the run saved step 20 in this start: requeued
    code, out, calls = _run(tmp_path, rc=137, restart=1, config=str(config), FAKE_SAVE=str(root / "step_00000020"))
    assert code == 0 and "scontrol requeue 77" in calls, out
    assert "failed (exit 137) after saving step_00000020 in this start (it began from step_00000010)" in out
    # a rank the watchdog ended (3: hung) after the run saved step 22: requeued the same way
    code, out, calls = _run(tmp_path, rc=3, restart=1, config=str(config), FAKE_SAVE=str(root / "step_00000022"))
    assert code == 0 and "scontrol requeue 77" in calls and "failed (exit 3) after saving step_00000022" in out, out
    # the same failure again before the next save: not requeued (it would fail the same way)
    code, out, calls = _run(tmp_path, rc=1, restart=2, config=str(config))
    assert code == 1 and "scontrol" not in calls and "without saving a checkpoint in this start" in out, out
    # bad input (2) and an opt-out are never requeued, whatever was saved
    for rc, extra in ((2, {}), (1, {"LINRNN_REQUEUE_ON_FAILURE": "0"})):
        code, out, calls = _run(tmp_path, rc=rc, config=str(config), FAKE_SAVE=str(root / f"step_000000{30 + rc}"),
                                **extra)
        assert code == rc and "scontrol" not in calls, out


def test_requeue_code_requeues_the_job(tmp_path):
    code, out, calls = _run(tmp_path, rc=75, restart=2)
    assert code == 0 and "scontrol requeue 77" in calls, out
    assert "--clean" not in calls  # the resumed job keeps its node-local cache


def _run_config(tmp_path: Path, saved: int | None = 10) -> tuple[Path, str]:
    """A run config whose checkpoint.dir holds a complete step ``saved``: (dir, config path)."""
    root = tmp_path / "ckpt"
    config = tmp_path / "run.yaml"
    config.write_text(f"name: crash\ncheckpoint:\n  dir: {root}\n")
    if saved is not None:
        (root / f"step_{saved:08d}").mkdir(parents=True, exist_ok=True)
        (root / f"step_{saved:08d}" / "COMPLETE").touch()
    return root, str(config)


def test_usr1_is_forwarded_once_and_leads_to_requeue(tmp_path):
    root, config = _run_config(tmp_path)
    code, out, calls = _run(tmp_path, rc=0, send=signal.SIGUSR1, config=config, FAKE_SAVE=str(root / "step_00000020"))
    assert "got SIGUSR1" in out and calls.count("got-") == 1, (out, calls)
    assert code == 0 and "scontrol requeue 77" in calls and "stopped to be requeued (exit 75, after SIGUSR1)" in out


def test_usr1_before_a_new_checkpoint_is_not_requeued(tmp_path):
    """The time-limit warning before this start saved anything (stopped at once, or a rank
    still starting up killed by it, 138): every requeue would stop the same way."""
    root, config = _run_config(tmp_path)
    for die in (False, True):
        code, out, calls = _run(tmp_path, rc=0, send=signal.SIGUSR1, die_on_usr1=die, config=config)
        assert code == (138 if die else 75) and "scontrol" not in calls, out
        assert "the time limit is shorter than start-up plus the signal's lead time" in out and "Raise --time" in out
        assert "--clean" in calls  # over for good


def test_a_failure_after_usr1_is_requeued_when_this_start_saved(tmp_path):
    """The preemption save hung (watchdog: 3) or failed (1) after SIGUSR1: the failure rule
    (requeue only after a new checkpoint) holds as without a signal, and says why."""
    root, config = _run_config(tmp_path)
    code, out, calls = _run(tmp_path, rc=0, send=signal.SIGUSR1, config=config, FAKE_STOP_RC="3",
                            FAKE_SAVE=str(root / "step_00000020"))
    assert code == 0 and "scontrol requeue 77" in calls, out
    assert "failed (exit 3, after SIGUSR1) after saving step_00000020 in this start (it began from step_00000010)" in out
    code, out, calls = _run(tmp_path, rc=0, send=signal.SIGUSR1, config=config, FAKE_STOP_RC="1")
    assert code == 1 and "scontrol" not in calls, out
    assert "failed (exit 1, after SIGUSR1) without saving a checkpoint in this start: not requeuing" in out


def test_a_time_limit_reached_during_the_preemption_save_is_named_and_judged_as_the_stop(tmp_path):
    """SIGUSR1, then SLURM's SIGTERM at the time limit while the ranks still save: the log says
    the warning's lead was too short; the job is requeued if this start saved, as after a stop."""
    root, config = _run_config(tmp_path)
    slow = dict(FAKE_SLOW_STOP="1", FAKE_STOP_RC="143")
    code, out, calls = _run(tmp_path, rc=0, send=(signal.SIGUSR1, signal.SIGTERM), config=config,
                            FAKE_SAVE=str(root / "step_00000020"), **slow)
    assert "s after the time-limit warning (SIGUSR1): the stop and its save took longer than the warning's lead" in out
    assert code == 0 and "scontrol requeue 77" in calls, out
    assert "failed (exit 143, after SIGUSR1) after saving step_00000020" in out
    code, out, calls = _run(tmp_path, rc=0, send=(signal.SIGUSR1, signal.SIGTERM), config=config, **slow)
    assert code == 143 and "scontrol" not in calls and "without saving a checkpoint in this start" in out, out


def test_sigterm_stops_without_requeue(tmp_path):
    code, out, calls = _run(tmp_path, rc=0, send=signal.SIGTERM)
    assert code == 75 and "scontrol" not in calls and "not requeuing" in out, out


def test_requeue_cap(tmp_path):
    code, out, calls = _run(tmp_path, rc=75, restart=3, max_requeues="3")
    assert code == 75 and "scontrol" not in calls and "requeue cap reached" in out, out


def test_eval_script_on_an_export_passes_suite_and_options(tmp_path):
    import sys

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$CALLS"\n')
    (bin_dir / "srun").chmod(0o755)
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CALLS=str(calls), SLURM_JOB_ID="5",
               SLURM_JOB_NUM_NODES="1", LINRNN_PYTHON=sys.executable, LINRNN_EVAL_SUITE="parity",
               PYTHONPATH=str(ROOT))
    # an option right after the checkpoint is not taken for the suite
    r = subprocess.run(["bash", str(SLURM / "eval.sbatch"), str(export), "--seeds", "0,1"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    first = calls.read_text().splitlines()[0]
    assert first.endswith(f"-m evals.cli {export} --suite parity --out {export}/eval/parity --no-progress "
                          "--seeds 0,1"), first
    # lm-evaluation-harness tasks: one suite, its comma-separated tasks in one results folder
    calls.unlink()
    r = subprocess.run(["bash", str(SLURM / "eval.sbatch"), str(export), "lm_eval:piqa,arc_easy"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    first = calls.read_text().splitlines()[0]
    assert first.endswith(f"--suite lm_eval:piqa,arc_easy --out {export}/eval/lm_eval:piqa+arc_easy --no-progress")


def test_an_eval_sweep_pins_its_checkpoints_and_a_pruned_one_fails_alone(tmp_path):
    """eval_sweep.sh submits one array task per complete checkpoint with the list pinned in
    LINRNN_EVAL_STEPS, passes what follows -- to linrnn-eval, and submits the summary to run
    after the array; a task whose checkpoint training removed meanwhile stops with its name
    before exporting anything."""
    import shlex
    import shutil
    import sys

    root = tmp_path / "run"
    for step in (5, 10, 15):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "COMPLETE").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_sbatch = ('#!/bin/bash\necho "STEPS=$LINRNN_EVAL_STEPS OUT=${LINRNN_EVAL_OUT:-unset}" >> "$CALLS"\n'
                   'echo "sbatch $(printf \'%q \' "$@")" >> "$CALLS"\necho "$((40 + $(grep -c ^sbatch "$CALLS")))"\n')
    (bin_dir / "sbatch").write_text(fake_sbatch)
    (bin_dir / "sbatch").chmod(0o755)
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LINRNN_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CALLS=str(calls), LINRNN_PYTHON=sys.executable,
               PYTHONPATH=str(ROOT), LINRNN_EVAL_OUT=str(tmp_path / "one"))  # left exported in the shell
    r = subprocess.run(["bash", str(SLURM / "eval_sweep.sh"), str(root), "parity", "--partition=h100", "--",
                        "--steps", "5"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    steps_line, sbatch_line, _, summary_line = calls.read_text().splitlines()
    names = "step_00000005,step_00000010,step_00000015"
    assert steps_line == f"STEPS={names} OUT=unset"  # every task writes beside its own export
    assert "ignoring LINRNN_EVAL_OUT" in r.stderr
    del env["LINRNN_EVAL_OUT"]
    assert shlex.split(sbatch_line) == ["sbatch", "--parsable", "--array=0-2", "--partition=h100",
                                        str(SLURM / "eval.sbatch"), str(root), "parity", "--steps", "5"]
    summary = shlex.split(summary_line)  # after the array (job 41), on the same partition, no GPU
    assert summary[:4] == ["sbatch", "--parsable", "--dependency=afterany:41", "--partition=h100"]
    assert "--gpus-per-node=0" in summary
    assert shlex.split(summary[-1]) == [sys.executable, "-m", "evals.sweep", str(root), "--suite", "parity"]
    assert "Submitted batch job 41: 3 array task(s)" in r.stdout and "Submitted batch job 42: the summary" in r.stdout
    shutil.rmtree(root / "step_00000005")  # training pruned it while the array waited
    env.update(LINRNN_EVAL_STEPS=names, SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="9")
    r = subprocess.run(["bash", str(SLURM / "eval.sbatch"), str(root), "parity"], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "step_00000005' (array task 0) is gone" in r.stderr, r.stderr
    assert not (root / "exports").exists()


def _run_prepare(tmp_path: Path, args: list[str], restart: int = 0, **extra: str) -> tuple[int, str, str]:
    """prepare_data.sbatch with stand-ins, sent SIGUSR1 (the time limit) once srun runs."""
    env, calls, ready = _fake_slurm(tmp_path)
    env.update(FAKE_RC="0", FAKE_WAIT="400", SLURM_JOB_ID="78", SLURM_RESTART_COUNT=str(restart),
               SLURM_JOB_NODELIST="vm", **extra)
    p = subprocess.Popen(["bash", str(SLURM / "prepare_data.sbatch"), *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=30)
    return p.returncode, out, calls.read_text() if calls.exists() else ""


def test_a_preparation_in_parts_requeues_itself_at_the_time_limit(tmp_path):
    """--part all keeps finished parts, so the time limit requeues the job; a single output
    would start over, so it is not requeued; the cap holds."""
    head = [line for line in (SLURM / "prepare_data.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in head and any(line.startswith("#SBATCH --signal=B:USR1@") for line in head)
    parts = ["prepare", "--input", "c.jsonl", "--out", "d", "--parts", "8", "--part", "all"]
    code, out, calls = _run_prepare(tmp_path, parts)
    assert code == 0 and "scontrol requeue 78" in calls and "goes on with the first unfinished part" in out, out
    code, out, calls = _run_prepare(tmp_path, parts[:-4])
    assert code == 75 and "scontrol" not in calls and "not requeuing (the output would start over)" in out, out
    code, out, calls = _run_prepare(tmp_path, parts, restart=20)
    assert code == 75 and "scontrol" not in calls and "requeue cap reached" in out, out


def test_a_preparation_that_finished_before_the_signal_is_not_requeued(tmp_path):
    """--part all stopped by the time limit, but linrnn-prepare had finished (0) or refused
    its input (2): nothing is left that a requeue could do."""
    parts = ["prepare", "--input", "c.jsonl", "--out", "d", "--parts", "8", "--part", "all"]
    for rc, says in (("0", "finished before it stopped"), ("2", "bad input (exit 2): not requeuing")):
        code, out, calls = _run_prepare(tmp_path, parts, FAKE_STOP_RC=rc)
        assert code == int(rc) and "scontrol" not in calls and says in out, out


@pytest.mark.parametrize("script", ["pretrain.sbatch", "eval.sbatch", "prepare_data.sbatch"])
def test_scripts_outside_a_slurm_job_stop_before_any_work(tmp_path, script):
    """`bash slurm/X.sbatch` outside any allocation: one message, exit 2, nothing started."""
    env, calls, _ = _fake_slurm(tmp_path)
    env.update(LINRNN_PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", str(SLURM / script), "x"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not inside a SLURM job (SLURM_JOB_ID is unset)" in r.stderr, r.stdout + r.stderr
    assert "unbound variable" not in r.stderr and not calls.exists()


def test_pretrain_inside_salloc_without_ntasks(tmp_path):
    """`bash slurm/pretrain.sbatch` in an salloc without -n: SLURM_NTASKS and the node count
    are unset, which the script must survive (srun picks the task count)."""
    env, calls, _ = _fake_slurm(tmp_path)
    env.update(FAKE_RC="0", FAKE_WAIT="0", LINRNN_PYTHON=sys.executable, PYTHONPATH=str(ROOT), SLURM_JOB_ID="80")
    r = subprocess.run(["bash", str(SLURM / "pretrain.sbatch"), "run.yaml"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "unbound variable" not in r.stderr, r.stdout + r.stderr
    assert "srun --ntasks=1 --ntasks-per-node=1" in calls.read_text()


def test_arrays_expand_safely_when_empty():
    """bash < 4.4 (RHEL 7 login nodes) calls an empty "${A[@]}" unbound under set -u: every
    array expansion in the scripts uses ${A[@]+"${A[@]}"}."""
    import re

    for path in sorted(SLURM.glob("*.s*")):
        text = re.sub(r'\$\{(\w+)\[@\]\+"\$\{\1\[@\]\}"\}', "", path.read_text())
        assert not re.findall(r'"\$\{\w+\[@\]\}"', text), f"{path.name}: unguarded array expansion"
