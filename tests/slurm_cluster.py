"""A throw-away one-node SLURM cluster for the ``slurm`` tests (no tests here).

Everything lives in one directory: slurm.conf (generated from ``hostname -s`` and the
machine's CPU count), state, spool, daemon logs. munged is started as the munge user
unless one is already running; slurmctld and slurmd run in the foreground as children
of this process, so ``stop()`` can always end them even when ``scontrol shutdown``
fails. Client commands find the cluster through ``SLURM_CONF`` (set in ``env()``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing_reason() -> str | None:
    """Why the tests cannot start a cluster here, or None."""
    for prog in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged"):
        if shutil.which(prog) is None and not Path(f"/usr/sbin/{prog}").exists():
            return f"{prog} is not installed (run slurm/ci_install.sh: apt packages slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "starting a test SLURM cluster needs root (SlurmUser=root, munged as the munge user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _sbin(prog: str) -> str:
    return shutil.which(prog) or f"/usr/sbin/{prog}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None

    # ------------------------------------------------------------------ set-up

    def env(self, **extra: str) -> dict[str, str]:
        e = dict(os.environ)
        e = {k: v for k, v in e.items() if not k.startswith("SLURM_")}
        e["SLURM_CONF"] = str(self.conf)
        e.update(extra)
        return e

    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        mem_mb = max(512, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8))
        r = self.root
        self.conf.write_text(f"""\
ClusterName=linrnntest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return  # a running munged (the system's) is used as it is, and left running
        if not MUNGE_KEY.exists():
            keygen = shutil.which("mungekey") or shutil.which("create-munge-key")
            if keygen is None:
                raise RuntimeError(f"{MUNGE_KEY} is missing and neither mungekey nor create-munge-key exists")
            subprocess.run([keygen] + (["--create"] if keygen.endswith("mungekey") else []), check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        pidfile = MUNGE_SOCKET_DIR / "munged.pid"
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True, capture_output=True)
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                self.munged_pid = int(pidfile.read_text().strip())
                return
            time.sleep(0.05)
        raise RuntimeError("munged started but wrote no pid file")

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        self.start_munge()
        env = self.env()
        for prog in ("slurmctld", "slurmd"):
            log = open(self.root / "log" / f"{prog}.out", "w")
            args = [_sbin(prog), "-D", "-f", str(self.conf)] + (["-c", "-i"] if prog == "slurmctld" else [])
            self.procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}: {self.daemon_logs()}")
            r = self.run("sinfo", "-h", "-o", "%T", check=False)
            if r.returncode == 0 and r.stdout.strip() == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"the node did not become idle in {timeout}s: {self.daemon_logs()}")

    def daemon_logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """scontrol shutdown, then end whatever is left: daemons, then the munged we started."""
        if self.procs:
            self.run("scontrol", "shutdown", check=False, timeout=20)
            deadline = time.monotonic() + 15
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            self.procs = []
        if self.munged_pid is not None:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.munged_pid = None

    # ------------------------------------------------------------------ jobs

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        r = subprocess.run(["sbatch", "--parsable", *args], env=self.env(**(env or {})), cwd=cwd,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, Reason, ...)."""
        r = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for item in r.stdout.split():
            k, sep, v = item.partition("=")
            if sep:
                fields.setdefault(k, v)
        return fields

    def wait(self, job_id: str, until, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll the job until ``until(fields)`` holds; fails with the job's fields and logs."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if until(fields):
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout}s: {fields}")
            time.sleep(poll)

    def wait_done(self, job_id: str, timeout: float) -> dict[str, str]:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
        return self.wait(job_id, lambda f: f.get("JobState") in done, timeout)

    def release_requeued(self, job_id: str) -> None:
        """A requeued job waits ~2 minutes (its BeginTime); start it (almost) now.

        Not within the second its last run was killed: slurmd refuses a batch launch whose
        credential is not newer, in whole seconds, than the job's revocation ("Job N already
        killed, do not launch batch job", and the job FAILs); the BeginTime delay keeps real
        requeues clear of that."""
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
