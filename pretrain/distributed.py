"""Process-group set-up for one process, ``torchrun`` and ``srun`` alike.

Rank and world size come from the torch.distributed variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), else from SLURM's (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID), else a single process. On a machine without CUDA DeepSpeed runs on its
CPU accelerator over gloo; its shared-memory collective op is switched off because it is
a C++ extension that would be compiled on first use (minutes) and is not needed.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass


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
    """(rank, world_size, local_rank, local_world_size), filling the torch variables in."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        rank, world = int(e["RANK"]), int(e["WORLD_SIZE"])
        local = int(e.get("LOCAL_RANK", rank))
        local_world = int(e.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        rank, world = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
        local = int(e.get("SLURM_LOCALID", 0))
        local_world = int(e.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]) if world > 1 else 1
        if world > 1 and "MASTER_ADDR" not in e:
            if int(e.get("SLURM_NNODES", "1")) > 1:
                raise RuntimeError("multi-node srun without MASTER_ADDR: export MASTER_ADDR (the first "
                                   "host of `scontrol show hostnames $SLURM_JOB_NODELIST`) or use launch/")
            e["MASTER_ADDR"] = "127.0.0.1"
        e.setdefault("MASTER_PORT", str(10000 + int(e.get("SLURM_JOB_ID", "0")) % 50000))
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(local_world))
    e.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in e:
        if world > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with torchrun or srun")
        e["MASTER_PORT"] = str(free_port())
    return rank, world, local, local_world


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
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistEnv(rank, world, local, local_world, backend)


def broadcast_from_rank0(value: str) -> str:
    """Rank 0's ``value`` on every rank (as is without a multi-rank process group): how a
    failure only rank 0 can see (a lock, a conversion) stops all ranks with its message."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def device() -> "torch.device":  # noqa: F821
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
