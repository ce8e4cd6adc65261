"""Learning-rate schedules as a pure function of the step.

Computing the rate from the step (instead of stepping a stateful scheduler) makes resume
exact by construction and lets a skipped step keep the schedule on the step count.
"""
from __future__ import annotations

import math

from .config import OptimizerConfig


def lr_at(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Rate for optimizer step ``step`` (0-based) of a ``max_steps`` run.

    All schedules warm up linearly over ``warmup_steps``. ``cosine`` then decays to
    ``lr * min_lr_ratio`` at ``max_steps``; ``wsd`` (warmup-stable-decay) holds ``lr``
    and decays linearly to the minimum over the last ``decay_fraction`` of the run;
    ``constant`` holds ``lr``.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(max_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(int(round(cfg.decay_fraction * max_steps)), 1)
        decay_start = max(max_steps - decay_steps, cfg.warmup_steps)
        if step < decay_start:
            return peak
        progress = min((step - decay_start + 1) / max(max_steps - decay_start, 1), 1.0)
        return peak + (floor - peak) * progress
    raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}")
