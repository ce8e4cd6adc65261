"""The DeepSpeed config dict, derived from the run config (never written by hand).

One source of truth: batch sizes, ZeRO stage, precision, clipping and offload come from
``RunConfig``; gradient accumulation is whatever makes the global batch fixed for the
number of data-parallel ranks at hand, so a job can change its GPU count and keep its
optimisation trajectory.
"""
from __future__ import annotations

from typing import Any

from .config import RunConfig
from .config_loader import ConfigError


def grad_accum_steps(cfg: RunConfig, dp_world: int) -> int:
    p = cfg.parallel
    per_step = p.micro_batch_size * dp_world
    if p.global_batch_size % per_step:
        raise ConfigError(
            f"parallel.global_batch_size={p.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel ranks = {p.micro_batch_size} x {dp_world}: "
            "change one of them so the global batch stays fixed")
    return p.global_batch_size // per_step


def deepspeed_config(cfg: RunConfig, dp_world: int) -> dict[str, Any]:
    """``dp_world``: data-parallel ranks (all ranks / pipeline stages)."""
    p = cfg.parallel
    gas = grad_accum_steps(cfg, dp_world)
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:  # ZeRO >= 1 (ParallelConfig.check); torch's AdamW steps on the host copy
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if p.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=p.zero_stage == 2 and p.pipeline_stages == 1,
                    reduce_bucket_size=p.reduce_bucket_size, allgather_bucket_size=p.reduce_bucket_size)
    if p.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    out: dict[str, Any] = {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep torch's AdamW also with offload
        "steps_per_print": 1 << 30,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if p.precision == "bf16":
        out["bf16"] = {"enabled": True, "check_grad_overflow": True}  # skip steps with inf/NaN grads
    elif p.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return out
