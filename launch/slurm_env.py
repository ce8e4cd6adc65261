"""SLURM's variables -> torch.distributed's, plus per-job node-local directories.

Inside an ``srun`` step every task knows its place from SLURM (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_NODEID, the step's node list and tasks per node); torch.distributed
wants RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The
master is the first host of the step's node list (where task 0 runs: tasks must be placed
in blocks, which is checked) and the port is a function of the job and step ids, so every
task computes the same rendezvous without talking to the others, and a requeued job (same
id) gets the same one. ``LINRNN_MASTER_ADDR`` / ``LINRNN_MASTER_PORT`` override them (node
names that do not resolve, a port taken); torch variables inherited from the submitting
shell do not.

Directories: shared file systems make bad caches (Triton's compile cache and streaming's
shard copies thrash NFS/Lustre and race between nodes), so each node gets its own under a
node-local root: ``$LINRNN_LOCAL_ROOT``, else ``$TMPDIR``, else ``/tmp``.
"""
from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from .nodelist import expand_nodelist, expand_tasks_per_node

# Below Linux's ephemeral range (32768+), so the derived port rarely collides with a
# client socket; 20000 consecutive job ids never share a port on one node.
PORT_BASE, PORT_SPAN = 10000, 20000
MAX_TMPDIR_CHARS = 70  # room left for multiprocessing's pymp-XXXX/listener-XXXX socket names
LAUNCHED = "LINRNN_LAUNCHED"  # set by python -m launch in the ranks' environment
TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def in_srun_step(env: Mapping[str, str] | None = None) -> bool:
    """True inside a task started by ``srun`` (not the batch script itself)."""
    env = os.environ if env is None else env
    step = env.get("SLURM_STEP_ID")
    return "SLURM_PROCID" in env and step is not None and step not in ("batch", "extern", "4294967294")


def master_port(job_id: str | int, step_id: str | int = 0) -> int:
    """The rendezvous port of a job's srun step: the same on every node and at every requeue
    (a requeued job keeps its id), another for a second step running beside the first."""
    step = int(step_id) if str(step_id).isdigit() else 0
    return PORT_BASE + (int(job_id) + 7919 * step) % PORT_SPAN


def _hosts(env: Mapping[str, str]) -> list[str]:
    # a task's SLURM_NODELIST is its step's; the job's list is the last resort
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise RuntimeError("SLURM_JOB_NODELIST is not set: not inside a SLURM allocation")
    return expand_nodelist(nodelist)


def ranks_per_node(per_node: list[int], spec: str) -> int:
    """The one rank count every node runs: the data loader and torch's LOCAL_WORLD_SIZE
    assume the same on every node (nodes = world size / ranks per node)."""
    if len(set(per_node)) > 1:
        raise RuntimeError(f"this step runs an uneven number of ranks per node (tasks per node {spec}: "
                           f"{','.join(map(str, per_node))}), but training needs the same number on every node: "
                           "use --ntasks-per-node (e.g. sbatch --nodes=2 --ntasks-per-node=8) so every node runs "
                           "the same number of ranks")
    return per_node[0]


def torch_env_from_slurm(env: Mapping[str, str] | None = None, nproc_per_task: int = 1) -> dict[str, str]:
    """The torch.distributed variables of this srun task.

    ``nproc_per_task > 1``: each task is a node agent that starts that many local ranks
    (one task per node, torchrun-style); the values returned are for its local rank 0 and
    ``RANK`` is the node's first global rank.
    """
    env = os.environ if env is None else env
    try:
        procid, ntasks = int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        nodeid = int(env.get("SLURM_NODEID", "0"))
        job_id = env["SLURM_JOB_ID"]
    except KeyError as e:
        raise RuntimeError(f"{e.args[0]} is not set: not inside an srun step") from None
    hosts = _hosts(env)
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    per_node = expand_tasks_per_node(per_node_spec) if per_node_spec else [ntasks]
    if nproc_per_task > 1:
        if any(n != 1 for n in per_node):
            raise RuntimeError(f"--nproc {nproc_per_task} under srun needs one task per node "
                               f"(this step has tasks per node {per_node_spec}): use srun --ntasks-per-node=1")
        rank, world = procid * nproc_per_task, ntasks * nproc_per_task
        local, local_world = 0, nproc_per_task
    else:
        rank, world = procid, ntasks
        local = int(env.get("SLURM_LOCALID", "0"))
        local_world = ranks_per_node(per_node, per_node_spec)
    node = hosts.index(env["SLURMD_NODENAME"]) if env.get("SLURMD_NODENAME") in hosts else nodeid
    check_block_layout(rank, local, local_world, node, hosts)
    port = env.get("LINRNN_MASTER_PORT") or str(master_port(job_id, env.get("SLURM_STEP_ID", "0")))
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(local_world), "NODE_RANK": str(node),
            "MASTER_ADDR": env.get("LINRNN_MASTER_ADDR") or hosts[0], "MASTER_PORT": port}


def check_block_layout(rank: int, local: int, local_world: int, node: int, hosts: list[str]) -> None:
    """Ranks must fill the step's nodes in order (node n: ranks n*L .. n*L+L-1): rank 0 then
    runs on the first host, where everyone meets (MASTER_ADDR), and the data loader's
    node of a rank is rank // L. SLURM_HOSTFILE or --distribution=cyclic|plane break it."""
    if rank != node * local_world + local:
        raise RuntimeError(
            f"rank {rank} (local rank {local}) runs on {hosts[node]}, node {node} of this step, where ranks "
            f"{node * local_world}..{node * local_world + local_world - 1} belong: the tasks are not placed in blocks, "
            "so rank 0 would not run on the first host, where the ranks meet. Unset SLURM_HOSTFILE and use "
            "srun --distribution=block (the default)")


def check_resolves(host: str) -> None:
    """MASTER_ADDR must resolve on every node; said here rather than as a rendezvous timeout."""
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise RuntimeError(f"the rendezvous host {host!r} (MASTER_ADDR, the step's first node) does not resolve on "
                           f"{socket.gethostname()} ({e}): set LINRNN_MASTER_ADDR to an address of that node that "
                           "every node reaches") from None


def local_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("LINRNN_LOCAL_ROOT") or env.get("TMPDIR") or "/tmp")


def job_tag(env: Mapping[str, str] | None = None) -> str:
    """``job<id>`` under SLURM (array tasks have their own job id), else ``local<pid>``."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    return f"job{job}" if job else f"local{os.getpid()}"


def job_dir(env: Mapping[str, str] | None = None) -> Path:
    """This job's directory on this node (kept short: sockets live under its tmp/)."""
    return local_root(env) / f"linrnn-{job_tag(env)}"


def job_dirs_env(env: Mapping[str, str] | None = None, create: bool = True) -> dict[str, str]:
    """TMPDIR, LINRNN_DATA_CACHE and TRITON_CACHE_DIR for this job on this node.

    TMPDIR and the data cache are per job (a requeued job has the same id and finds its
    shard copies again); the Triton cache is per node and user, kept across jobs because
    compiled kernels stay valid and compiling them costs minutes. Values the user set
    (LINRNN_DATA_CACHE, TRITON_CACHE_DIR) are kept.
    """
    env = os.environ if env is None else env
    root = job_dir(env)
    out = {"LINRNN_DATA_CACHE": env.get("LINRNN_DATA_CACHE") or str(root / "data"),
           "TRITON_CACHE_DIR": env.get("TRITON_CACHE_DIR")
           or str(local_root(env) / f"linrnn-triton-{os.getuid()}")}
    if len(str(root / "tmp")) <= MAX_TMPDIR_CHARS:  # else the environment's own, not a longer one:
        out["TMPDIR"] = str(root / "tmp")  # multiprocessing's AF_UNIX sockets live there (108-byte paths)
    if create:
        for path in out.values():
            os.makedirs(path, exist_ok=True)
    return out


def clean_job_dir(env: Mapping[str, str] | None = None) -> Path:
    """Remove this job's directory on this node (the sbatch script calls it once the job
    is over for good, not before a requeue, so the resumed job keeps its cache)."""
    path = job_dir(env)
    shutil.rmtree(path, ignore_errors=True)
    return path


def describe(torch_env: Mapping[str, str], env: Mapping[str, str] | None = None) -> str:
    """One log line per rank: where it runs and how it meets the others."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    where = f"job {job} restart {env.get('SLURM_RESTART_COUNT', '0')}, " if job else ""
    return (f"[launch] {where}rank {torch_env['RANK']}/{torch_env['WORLD_SIZE']} local "
            f"{torch_env['LOCAL_RANK']}/{torch_env['LOCAL_WORLD_SIZE']} on {socket.gethostname()}, "
            f"master {torch_env['MASTER_ADDR']}:{torch_env['MASTER_PORT']}")
