"""Estimated GPU memory per rank for a run layout, so a 7B job fails at planning, not at
step 1 after an hour in the queue.

Model states (bytes per parameter, mixed precision with fp32 master weights, ZeRO paper
accounting): weights 2 (bf16) or 4 (fp32); gradients the same; optimizer 12 (fp32 master
+ Adam m, v). In pure fp32 the optimizer is 8 (Adam m, v) for ZeRO-0 and ZeRO-3, which step
the weights themselves, but 12 for ZeRO-1/2, whose optimizer steps its own fp32 copy of the
partition. ZeRO-1 shards the optimizer over the data-parallel ranks, ZeRO-2 also the
gradients, ZeRO-3 also the weights; pipeline stages divide all of them.

``offload_optimizer`` moves the optimizer off the GPU into host memory, where DeepSpeed
keeps per rank: the fp32 master partition and Adam's m, v (12), the partition's fp32
gradient (4) and, for ZeRO-1/2, a weight-precision copy for the upload (2 or 4) and, with
gradient accumulation, the partition's gradients accumulated between micro-batches (2 or 4).
The GPU keeps the weights and gradients as without offload (pessimistic: ZeRO-1/2 free a
gradient once it is copied to the host).

Activations (bytes per token): every block says what it keeps for backward
(``Block.activation_bytes_per_token``: projection outputs, kernel inputs, per-chunk scan
states, attention's blocked keys/values and mask bias; the norms and gates keep only their
half-precision inputs, ``pretrain/models/lean_autograd.py``), averaged over the stage's
blocks so hybrid patterns count every mixer. ``tests/test_memory_activations.py`` holds this
to within 5 % of what autograd really keeps for every family. With activation
checkpointing only each block's input is kept, plus the largest block's full set during its
recomputation. The final norm and head input add ``2 d_model`` elements and the fp32 logits
and their gradient ``8 V`` bytes per token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import RunConfig
from .ds_config import grad_accum_steps
from .models import build_model


@dataclass
class MemoryEstimate:
    parameters: int
    world_size: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    budget_gb: float
    host_optimizer_gb: float = 0.0  # offloaded optimizer state per rank, in host memory

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.budget_gb

    def describe_parts(self) -> str:
        return (f"{self.total_gb:.1f} GB per GPU (weights {self.weights_gb:.1f}, gradients {self.grads_gb:.1f}, "
                f"optimizer {self.optimizer_gb:.1f}, activations {self.activations_gb:.1f})")

    def describe(self) -> str:
        optimizer = (f"optimizer offloaded ({self.host_optimizer_gb:.1f} GB host memory per rank)"
                     if self.host_optimizer_gb else f"optimizer {self.optimizer_gb:.1f} GB")
        return (f"estimated memory per GPU ({self.world_size} rank(s)): weights {self.weights_gb:.1f} GB, "
                f"gradients {self.grads_gb:.1f} GB, {optimizer}, activations "
                f"{self.activations_gb:.1f} GB = {self.total_gb:.1f} GB of {self.budget_gb:.0f} GB")


def block_activation_bytes(model: nn.Module, elem: int, seq_len: int) -> list[float]:
    """Bytes per token each block keeps for its backward (without checkpointing)."""
    return [block.activation_bytes_per_token(elem, seq_len) for block in model.blocks]


def measured_activation_bytes(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward of ``module``.

    Counts every tensor handed to autograd's saved-tensor hooks once per storage, leaving
    out parameters: the ground truth the per-block estimates are tested against (run it
    with the kernels' autograd functions, i.e. on a GPU or under ``TRITON_INTERPRET=1``
    with ``LINRNN_KERNEL_BACKEND=triton``).
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(seen.values())


def optimizer_bytes_per_param(cfg: RunConfig, grad_accum: int) -> tuple[int, int]:
    """(GPU, host) bytes per parameter of the optimizer state, before sharding (see the top)."""
    p = cfg.parallel
    half = p.precision in ("bf16", "fp16")
    elem = 2 if half else 4
    state = 12 if half or p.zero_stage in (1, 2) else 8
    if not p.offload_optimizer:
        return state, 0
    host = 12 + 4  # fp32 master + Adam m, v; the fp32 gradient partition
    if p.zero_stage in (1, 2):
        host += elem + (elem if grad_accum > 1 else 0)
    return 0, host


def estimate_memory(cfg: RunConfig, world_size: int | None = None) -> MemoryEstimate:
    """The estimate for the fullest GPU: with a pipeline, the heaviest stage as DeepSpeed
    splits the layers (by parameters, a tied head counting as a second embedding), stage
    ``s`` holding ``pp - s`` micro-batches in flight (1F1B)."""
    p = cfg.parallel
    world = world_size or p.plan_world_size or int(os.environ.get("WORLD_SIZE", "1"))
    pp = p.pipeline_stages
    dp = max(world // pp, 1)
    model = build_model(cfg.model, device="meta")
    half = p.precision in ("bf16", "fp16")
    elem = 2 if half else 4  # bytes of a weight, a gradient and an activation
    gas = grad_accum_steps(cfg, dp)  # the engine's own count; a batch that does not divide is refused
    o_gpu, o_host = optimizer_bytes_per_param(cfg, gas)
    tokens = p.micro_batch_size * cfg.data.seq_len
    per_block = block_activation_bytes(model, elem, cfg.data.seq_len)
    d, gb = cfg.model.d_model, 2**30
    n = sum(t.numel() for t in model.parameters())
    estimates = []
    for s, (params, blocks, first, last) in enumerate(_stages(cfg, model, n)):
        if p.activation_checkpointing:
            act = tokens * (blocks * d * elem + max(per_block)) if blocks else 0.0
        else:
            act = tokens * blocks * sum(per_block) / len(per_block)
        act *= pp - s  # micro-batches in flight on this stage (one without a pipeline)
        act += tokens * d * elem * first + tokens * (d * elem + 8 * cfg.model.vocab_size) * last
        weights = params * elem / (dp if p.zero_stage >= 3 else 1)
        grads = params * elem / (dp if p.zero_stage >= 2 else 1)
        shard = dp if p.zero_stage >= 1 else 1
        estimates.append(MemoryEstimate(n, world, weights / gb,
                                        grads / gb, params * o_gpu / shard / gb, act / gb, p.gpu_memory_gb,
                                        params * o_host / shard / gb))
    return max(estimates, key=lambda e: e.total_gb)


def _stages(cfg: RunConfig, model: nn.Module, n: int) -> list[tuple[int, int, bool, bool]]:
    """(parameters, blocks, holds the embedding, holds the head) of each pipeline stage;
    ``model``: the LM on the meta device, of ``n`` parameters."""
    pp, n_layers = cfg.parallel.pipeline_stages, cfg.model.n_layers
    if pp == 1:
        return [(n, n_layers, True, True)]
    from deepspeed.runtime.utils import partition_balanced

    from .models.pipeline import layer_param_counts

    counts = layer_param_counts(cfg.model, model)  # embedding, blocks, final norm, head
    bounds = partition_balanced(weights=counts, num_parts=pp)
    return [(sum(counts[a:b]), sum(1 <= i <= n_layers for i in range(a, b)), a == 0, b == len(counts))
            for a, b in zip(bounds, bounds[1:])]


def out_of_memory_message(cfg: RunConfig, where: str, error: BaseException, resuming: bool,
                          world_size: int | None = None) -> str:
    """What to change when the GPU ran out of memory ``where`` (e.g. "at step 12"): the
    plan's estimate beside the GPU's size, then the settings that lower it, those a resume
    may change first (``resuming``: the run has checkpoints, so ``zero_stage`` is fixed).
    ``world_size``: the job's ranks (not ``parallel.plan_world_size``, which may differ)."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    try:
        plan = estimate_memory(cfg, world_size).describe_parts()
    except Exception as e:  # noqa: BLE001 - the diagnosis must not replace the out-of-memory report
        plan = f"no estimate ({type(e).__name__}: {e})"
    gpu = ""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
        gpu = f"; this GPU has {total:.0f} GB and peaked at {torch.cuda.max_memory_allocated() / 1e9:.1f} GB allocated"
    fixes = [f"lower parallel.micro_batch_size (now {cfg.parallel.micro_batch_size}; gradient accumulation keeps "
             f"parallel.global_batch_size)"]
    if not cfg.parallel.activation_checkpointing:
        fixes.append("set parallel.activation_checkpointing=true")
    if not cfg.parallel.offload_optimizer and cfg.parallel.zero_stage >= 1:
        fixes.append("set parallel.offload_optimizer=true")
    if cfg.parallel.zero_stage < 3:
        fixes.append("raise parallel.zero_stage" + (" (a new run only: a resume keeps the checkpoint's)"
                                                     if resuming else ""))
    return (f"out of GPU memory {where} ({first}): the plan estimates {plan}{gpu}. To fit: " + "; or ".join(fixes)
            + ". `linrnn-train <config> --dry-run` prints the plan of a layout; the micro-batch size, activation "
              "checkpointing and offload may change at a resume")
