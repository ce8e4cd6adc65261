"""The run config schema: one typed tree for model, data, optimizer, parallelism,
checkpointing, logging and eval, saved beside every checkpoint.

Loading, overrides and validation live in ``pretrain.config_loader``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from data.config import DataConfig

from .model_config import ModelConfig

# Range constraints read by the loader: metadata={"ge": x} / {"gt": x} / {"le": x} / {"lt": x}.


def _rng(default, **bounds):
    return field(default=default, metadata=bounds)


@dataclass
class OptimizerConfig:
    lr: float = _rng(3e-4, gt=0.0)
    min_lr_ratio: float = _rng(0.1, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = _rng(1e-8, gt=0.0)
    weight_decay: float = _rng(0.01, ge=0.0)
    grad_clip: float = _rng(1.0, ge=0.0)  # 0 disables clipping
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = _rng(512, ge=0)
    decay_fraction: float = _rng(0.1, gt=0.0, le=1.0)  # wsd: share of steps spent decaying

    def check(self) -> None:
        if not math.isfinite(self.lr):
            raise ValueError(f"lr: must be a finite number > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: both must lie in [0, 1), got {list(self.betas)} (e.g. [0.9, 0.95])")


@dataclass
class ParallelConfig:
    zero_stage: int = _rng(1, ge=0, le=3)
    pipeline_stages: int = _rng(1, ge=1)
    micro_batch_size: int = _rng(8, ge=1)  # sequences per rank per micro-step
    global_batch_size: int = _rng(256, ge=1)  # sequences per optimizer step, all ranks
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    reduce_bucket_size: int = _rng(50_000_000, ge=1)  # ZeRO communication bucket (elements)
    gpu_memory_gb: float = _rng(80.0, gt=0.0)  # the plan (--dry-run) warns above this per GPU
    plan_world_size: int | None = _rng(None, ge=1)  # ranks the plan assumes (None: $WORLD_SIZE or 1)

    def check(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} must be a multiple of "
                f"parallel.micro_batch_size={self.micro_batch_size}")
        if self.pipeline_stages > 1 and self.zero_stage != 1:
            raise ValueError(
                f"pipeline_stages: {self.pipeline_stages} stages need parallel.zero_stage=1 (DeepSpeed's "
                f"pipeline engine shards only the optimizer state; got {self.zero_stage}): set zero_stage=1, "
                "or pipeline_stages=1 for ZeRO-2/3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "offload_optimizer: true needs parallel.zero_stage >= 1 (DeepSpeed offloads the ZeRO "
                "optimizer partitions, which ZeRO-0 has not): set zero_stage=1, or offload_optimizer=false")


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int = _rng(1000, ge=0)  # 0: only at the end and on preemption
    keep_last: int = _rng(3, ge=1)
    # also keep, for good, every checkpoint whose step is a multiple of this (0: none), e.g.
    # a series to evaluate over training (slurm/eval_sweep.sh); each holds the full state
    keep_every_steps: int = _rng(0, ge=0)
    resume: bool = True  # resume from the newest complete checkpoint in ``dir``
    lock_wait_s: float = _rng(120.0, ge=0.0)  # how long to wait for another job's lock on ``dir``
    # every rank flushes its checkpoint files to the storage before the COMPLETE marker
    # (syncfs), so a node crash cannot leave a marker over data still in its page cache
    flush_to_storage: bool = True
    # A resume whose data differs from the checkpoint's (data.sources or their weights,
    # data.seq_len, parallel.global_batch_size): "refuse" (the default: exact resume only);
    # "continue" (same sources, new global batch: read on from the saved position, e.g. a
    # batch-size ramp); "restart" (a new mixture or sequence length, e.g. an annealing or
    # long-context stage: the new data from its beginning). A resume with unchanged data is
    # always exact, so the setting can stay in the config through later requeues.
    on_data_change: Literal["refuse", "continue", "restart"] = "refuse"
    # A resume whose model settings differ from the checkpoint's: "refuse" (the default), or
    # "allow" when the weights keep their shapes (a longer attention window or another RoPE
    # base for a long-context stage, say); a change of shapes is always refused.
    on_model_change: Literal["refuse", "allow"] = "refuse"
    # An export (linrnn-export) whose weights a new run starts from, with a fresh optimizer,
    # schedule and data order; ignored once ``dir`` holds this run's own checkpoints.
    init_from: str | None = None


@dataclass
class LoggingConfig:
    every_steps: int = _rng(10, ge=1)
    log_dir: str | None = None  # defaults to <checkpoint.dir>/logs
    wandb_project: str | None = None  # the key comes from WANDB_API_KEY, never the config
    tensorboard: bool = True  # also write TensorBoard scalars (when tensorboard is installed)
    # [first, last]: record a torch.profiler trace of steps first..last on every rank, written
    # to <log_dir>/profile/ (open it in Perfetto or chrome://tracing); [] records nothing
    profile_steps: list[int] = field(default_factory=list)
    # record CUDA allocations and write <log_dir>/memory/rank<R>-oom.pickle if the GPU runs out
    # of memory (for pytorch.org/memory_viz); costs a little time per allocation
    memory_snapshot: bool = False
    # a step whose loss is this many standard deviations above the recent steps' mean is
    # reported as a loss spike (pretrain/spikes.py); 0 turns the watch off
    spike_sigma: float = _rng(6.0, ge=0.0)
    # at each logging step, name a rank whose data loading or forward passes took this many
    # times the median rank's (pretrain/stragglers.py; ZeRO 0-2 without pipeline); null: off
    straggler_ratio: float | None = _rng(1.25, gt=1.0)

    def check(self) -> None:
        s = self.profile_steps
        if s and not (len(s) == 2 and 1 <= s[0] <= s[1]):
            raise ValueError(f"profile_steps: {s} should be [first, last] steps with 1 <= first <= last, "
                             "e.g. [10, 12]; or [] for no profile")


DEFAULT_VAL_SEQUENCES = 1024


@dataclass
class EvalConfig:
    """Periodic validation over one fixed list of held-out sequences (``pretrain/validation.py``)."""

    every_steps: int = _rng(0, ge=0)  # 0: no periodic validation
    # sequences of data.val_split per validation, all ranks together, spread evenly over the
    # split (all of it when it has fewer); None: DEFAULT_VAL_SEQUENCES
    val_sequences: int | None = _rng(None, ge=1)
    # deprecated: val_batches x parallel.micro_batch_size sequences in all (it used to count
    # micro-batches per data-parallel rank, so the set changed with the rank count)
    val_batches: int | None = _rng(None, ge=1)
    suites: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.val_sequences is not None and self.val_batches is not None:
            raise ValueError(
                "val_batches: it is the deprecated form of eval.val_sequences and both are set; "
                "keep only eval.val_sequences (held-out sequences per validation, all ranks together)")

    def num_sequences(self, micro_batch_size: int) -> int:
        """Sequences per validation: ``val_sequences``, else the deprecated ``val_batches`` in sequences."""
        if self.val_sequences is not None:
            return self.val_sequences
        if self.val_batches is not None:
            return self.val_batches * micro_batch_size
        return DEFAULT_VAL_SEQUENCES


@dataclass
class FaultConfig:
    """Deterministic fault injection, for tests and drills of the recovery paths."""

    nan_loss_steps: list[int] = field(default_factory=list)  # make these steps' loss NaN
    preempt_at_step: int | None = None  # raise the preemption flag before this step
    crash_in_save_at_step: int | None = None  # kill the process midway through this save
    oom_at_step: int | None = None  # raise a CUDA out-of-memory error in this step
    hang_at_step: int | None = None  # stop making progress once this many steps are done
    hang_in_restore: bool = False  # stop making progress while restoring a checkpoint (a dead file system)
    slow_rank: int | None = None  # this rank's forward passes take 0.2 s longer (a throttled GPU)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 1234
    max_steps: int = _rng(1000, ge=1)
    wall_clock_budget_s: float | None = None  # stop and save before a job's time limit
    # a rank with no progress (step, validation, save) for this long prints its stacks and
    # exits with 3, so a hung job fails (and requeues) instead of idling to its time limit
    hang_timeout_s: float | None = _rng(1800.0, gt=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_nonfinite_steps: int = _rng(5, ge=1)  # this many skipped steps in a row stop the run
    faults: FaultConfig = field(default_factory=FaultConfig)
