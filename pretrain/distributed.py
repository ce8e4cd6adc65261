"""Process-group set-up for one process, ``torchrun`` and ``srun`` alike.

Rank and world size come from the torch.distributed variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), else, inside an srun step, from SLURM's (read by
``launch.slurm_env``), else a single process. On a machine without CUDA DeepSpeed runs on its
CPU accelerator over gloo; its shared-memory collective op is switched off because it is
a C++ extension that would be compiled on first use (minutes) and is not needed.
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launch.slurm_env import LAUNCHED, check_resolves, in_srun_step, torch_env_from_slurm

from .config_loader import ConfigError

if TYPE_CHECKING:
    import torch


class LaunchError(ConfigError):
    """A job layout this process cannot run in (ranks per node, GPUs per rank): bad input,
    so the CLI stops with its message and exit 2 rather than a traceback."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def env_from_launcher() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size), filling the torch variables in.

    Under a plain ``srun`` (no ``python -m launch``) SLURM's variables are read the way
    launch/ reads them, so both agree on the local world size and the port; outside an
    srun step (the batch script itself) a process is a single rank whatever SLURM_NTASKS
    says, as no other rank will ever join it.
    """
    e = os.environ
    srun_task = in_srun_step(e)
    # inside an srun step, torch variables count only when a launcher set them (launch/ or
    # torchrun): sbatch hands every task the submitting shell's, e.g. a MASTER_ADDR=localhost
    launched = not srun_task or e.get(LAUNCHED) or e.get("TORCHELASTIC_RUN_ID")
    if launched and "RANK" in e and "WORLD_SIZE" in e:
        rank, world = int(e["RANK"]), int(e["WORLD_SIZE"])
        local = int(e.get("LOCAL_RANK", rank))
        local_world = int(e.get("LOCAL_WORLD_SIZE", world))
    elif srun_task:
        rank, world, local, local_world = _from_srun_step(e)
    else:
        _warn_if_batch_step(e)
        rank, world, local, local_world = 0, 1, 0, 1
    e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(local_world))
    e.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in e:
        if world > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with torchrun or srun")
        e["MASTER_PORT"] = str(free_port())
    return rank, world, local, local_world


def _from_srun_step(e: MutableMapping[str, str]) -> tuple[int, int, int, int]:
    """A task of a plain srun step: launch/'s rules (LINRNN_MASTER_ADDR/PORT override)."""
    try:
        t = torch_env_from_slurm(e)
        if int(t["WORLD_SIZE"]) > 1:
            check_resolves(t["MASTER_ADDR"])
    except (RuntimeError, ValueError) as err:
        raise LaunchError(str(err)) from None
    e["MASTER_ADDR"], e["MASTER_PORT"] = t["MASTER_ADDR"], t["MASTER_PORT"]
    return int(t["RANK"]), int(t["WORLD_SIZE"]), int(t["LOCAL_RANK"]), int(t["LOCAL_WORLD_SIZE"])


def _warn_if_batch_step(e: Mapping[str, str]) -> None:
    """The batch script of a multi-task job runs one process: say how to start them all."""
    if int(e.get("SLURM_NTASKS", "1") or "1") > 1:
        print(f"[distributed] SLURM_NTASKS={e['SLURM_NTASKS']} but this process runs outside an srun step (in the "
              "job's batch script): it runs as a single rank; start one rank per task with "
              "`srun python -m launch -- COMMAND` (as slurm/pretrain.sbatch does)", file=sys.stderr, flush=True)


def cuda_index(local_rank: int, visible: int, visible_devices: str | None = None) -> int:
    """The GPU (among those this rank sees) that a rank with ``local_rank`` uses.

    One visible GPU is the rank's own (``--gpus-per-task=1`` binds one per rank); with
    several, the rank takes GPU LOCAL_RANK (every rank sees all GPUs of its node).
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise LaunchError(
        f"local rank {local_rank} sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES={visible_devices or '(unset)'}), so it "
        f"has no GPU {local_rank} of its own: run at most one rank per GPU and let every rank see either all GPUs "
        "of its node (--ntasks-per-node equal to --gpus-per-node) or exactly one (--gpus-per-task=1)")


def check_gpus_per_rank(local_world: int, gpus_on_node: str | None) -> None:
    """More ranks on a node than GPUs SLURM gave the job there (--ntasks-per-node=2
    --gpus-per-node=1): each rank sees the one GPU as its own, and they would share it."""
    if gpus_on_node and gpus_on_node.isdigit() and 0 < int(gpus_on_node) < local_world:
        raise LaunchError(f"{local_world} ranks run on this node but the job has {gpus_on_node} GPU(s) here "
                          "(SLURM_GPUS_ON_NODE): run one rank per GPU (--ntasks-per-node equal to --gpus-per-node)")


def rank_cuda_index() -> int:
    """This process's GPU index by ``cuda_index`` (LOCAL_RANK, default 0)."""
    import torch

    check_gpus_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), os.environ.get("SLURM_GPUS_ON_NODE"))
    visible = torch.cuda.device_count()
    return cuda_index(int(os.environ.get("LOCAL_RANK", "0")), visible, os.environ.get("CUDA_VISIBLE_DEVICES"))


def prepare_accelerator() -> None:
    """Pick DeepSpeed's accelerator before it is imported (it decides once, at import)."""
    if "deepspeed" not in sys.modules and not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def disable_shm_comm() -> None:
    """Stop DeepSpeed's CPU backend from compiling/loading its shared-memory allreduce op."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    comm_torch = sys.modules.get("deepspeed.comm.torch")
    if comm_torch is not None:  # ``import deepspeed.comm.torch as m`` would give the torch package
        comm_torch.build_shm_op = lambda: None


def init_distributed() -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (idempotent)."""
    rank, world, local, local_world = env_from_launcher()
    prepare_accelerator()
    import deepspeed
    import torch
    import torch.distributed as dist

    disable_shm_comm()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(rank_cuda_index())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        if world > 1:
            leave_group_at_exit()
    return DistEnv(rank, world, local, local_world, backend)


_leaving_registered = False


def leave_group_at_exit() -> None:
    """Tear the process group down before the interpreter does. Left to the interpreter's
    own teardown, gloo's worker threads abort the process now and then, after all its work
    ("terminate called without an active exception", exit 134: 2 in 30 two-rank runs here,
    0 in 60 with this), so a finished job read as failed."""
    global _leaving_registered
    if not _leaving_registered:
        import atexit

        atexit.register(_leave_group)
        _leaving_registered = True


def _leave_group() -> None:
    """gloo's threads end only with the last reference to their group: DeepSpeed's teardown
    also drops the groups it keeps in module globals (a ``Shard`` keeps none)."""
    import sys

    import torch.distributed as dist

    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()


def allreduce_sum(values: list[float | torch.Tensor], dev: torch.device) -> list[float]:
    """Sums over all ranks, in one collective (and one host sync)."""
    import torch
    import torch.distributed as dist

    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(dev) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def ranks_failing(failed: bool) -> int:
    """How many ranks report ``failed`` (collective; 0 or 1 without a multi-rank process group)."""
    return round(allreduce_sum([float(failed)], device())[0])


def fail_together(error: Exception | None, others: Callable[[int], Exception]) -> None:
    """Collective: when any rank has an ``error``, every rank raises (its own, or ``others(n)``
    for the n ranks that failed), rather than the others waiting in their next collective
    until a timeout."""
    failing = ranks_failing(error is not None)
    if error is not None:
        raise error
    if failing:
        raise others(failing)


def broadcast_from_rank0(value: str) -> str:
    """Rank 0's ``value`` on every rank (as is without a multi-rank process group): how a
    failure only rank 0 can see (a lock, a conversion) stops all ranks with its message."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def device() -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", rank_cuda_index())
    return torch.device("cpu")
