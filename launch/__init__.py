"""Process set-up for distributed runs: SLURM -> torch.distributed variables, per-job
node-local directories, and a torchrun-style local launcher (``python -m launch``).

Nothing here imports torch, so the launcher starts in a fraction of a second.
"""
from .nodelist import expand_nodelist, expand_tasks_per_node
from .slurm_env import in_srun_step, job_dirs_env, master_port, torch_env_from_slurm

__all__ = ["expand_nodelist", "expand_tasks_per_node", "in_srun_step", "job_dirs_env", "master_port",
           "torch_env_from_slurm"]
