"""``python -m launch [--nproc N] -- COMMAND ...``: run COMMAND as torch.distributed rank(s).

* Inside an ``srun`` step (one task per GPU): set RANK/WORLD_SIZE/LOCAL_RANK/... from
  SLURM plus the per-job directories, then exec COMMAND, so SLURM's signals reach the
  training process itself. With ``--nproc N`` each srun task (one per node) starts N
  local ranks instead.
* Anywhere else: start N local ranks (default 1) on a free port, forward SIGTERM/SIGUSR1,
  and exit with the combined code (75 = preempted, requeue), like torchrun.

``python -m launch --clean`` removes this job's directory on this node (the sbatch
scripts run it once per node when a job is over for good). Under SLURM, each launch
also removes, once per node, the directories there of this user's earlier jobs that SLURM
no longer knows (``launch.stale_dirs``; LINRNN_KEEP_STALE_JOB_DIRS=1 turns it off).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from . import local, slurm_env, stale_dirs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--nproc", type=int, default=1, help="ranks to start per node / per srun task (default 1)")
    p.add_argument("--kill-grace", type=float, default=15.0,
                   help="seconds between SIGTERM and SIGKILL for the other ranks after one fails")
    p.add_argument("--clean", action="store_true", help="remove this job's node-local directory and exit")
    p.add_argument("--quiet", action="store_true", help="no [launch] line per rank on stderr")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.clean:
        print(f"[launch] removed {slurm_env.clean_job_dir()}", file=sys.stderr)
        return 0
    if not cmd:
        parser.error("no command given: python -m launch [--nproc N] -- COMMAND ...")
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if shutil.which(cmd[0]) is None:
        print(f"[launch] error: command not found: {cmd[0]}", file=sys.stderr)
        return 127
    env = dict(os.environ)
    if slurm_env.in_srun_step(env):
        try:
            tenv = slurm_env.torch_env_from_slurm(env, args.nproc)
            if int(tenv["WORLD_SIZE"]) > 1:
                slurm_env.check_resolves(tenv["MASTER_ADDR"])
        except (RuntimeError, ValueError) as e:
            print(f"[launch] error: {e}", file=sys.stderr)
            return 2
        env[slurm_env.LAUNCHED] = "1"  # the ranks take these variables as set, not as inherited
        if tenv["LOCAL_RANK"] == "0":  # once per node; before TMPDIR below moves the local root
            stale_dirs.sweep(env)
        env.update(slurm_env.job_dirs_env(env))
        if env.get("SLURM_CPUS_PER_TASK") and args.nproc == 1:
            env.setdefault("OMP_NUM_THREADS", env["SLURM_CPUS_PER_TASK"])
        if args.nproc == 1:
            env.update(tenv)
            if not args.quiet:
                print(slurm_env.describe(tenv, env), file=sys.stderr, flush=True)
            os.execvpe(cmd[0], cmd, env)
        envs = local.rank_envs(env, args.nproc, first_rank=int(tenv["RANK"]), world_size=int(tenv["WORLD_SIZE"]),
                               master_addr=tenv["MASTER_ADDR"], master_port=int(tenv["MASTER_PORT"]))
        for e in envs:
            e["NODE_RANK"] = tenv["NODE_RANK"]
        return _run(cmd, envs, args)
    private = slurm_env.job_dir(env)  # before TMPDIR below points into it
    stale_dirs.sweep(env)  # inside a SLURM job only (e.g. sbatch --wrap "python -m launch --nproc 8 ...")
    env.update(slurm_env.job_dirs_env(env))
    envs = local.rank_envs(env, args.nproc)
    try:
        return _run(cmd, envs, args)
    finally:
        if not os.environ.get("SLURM_JOB_ID"):  # a private per-launch directory: nobody reuses it
            shutil.rmtree(private, ignore_errors=True)


def _run(cmd: list[str], envs: list[dict[str, str]], args: argparse.Namespace) -> int:
    if not args.quiet:
        for e in envs:
            print(slurm_env.describe(e, e), file=sys.stderr, flush=True)
    return local.run_ranks(cmd, envs, kill_grace=args.kill_grace)


if __name__ == "__main__":
    sys.exit(main())
