"""Steps that go wrong: which kind a skipped step was, and fp16's loss-scale floor.

A non-finite loss or gradient skips the step (``max_nonfinite_steps`` in a row stop the
run); fp16's overflows are routine while DeepSpeed's dynamic loss scale settles, until the
scale reaches its floor, where DeepSpeed raises a bare Exception: a diverging run.
"""
from __future__ import annotations

import contextlib
import math


class TrainError(RuntimeError):
    """The run stopped for a reason the user must act on; the message says which."""


@contextlib.contextmanager
def fp16_floor_is_divergence(step: int):
    """fp16: DeepSpeed halves the loss scale at each overflow and, at its floor, raises a bare
    Exception; that is a diverging run, said as one (overflow steps do not count towards
    ``max_nonfinite_steps``, which stops the bf16 and fp32 runs)."""
    try:
        yield
    except Exception as e:
        if "loss scale already at minimum" not in str(e):
            raise
        raise TrainError(f"step {step}: fp16 gradients overflow even at DeepSpeed's minimum loss scale: the run "
                         "diverges. Resume from an earlier checkpoint with a lower optim.lr (linrnn-train ... "
                         "--rewind-to STEP), or train in bf16 (parallel.precision=bf16)") from e


def skip_kind(skipped: bool, loss: float, precision: str) -> str | None:
    """Why a step was skipped: None (it was not); "overflow": fp16's dynamic loss scale
    overflowed with a finite loss, which DeepSpeed handles by lowering the scale (routine
    while the scale settles); "non_finite": a loss or gradient that is not finite, which
    counts towards ``max_nonfinite_steps``."""
    if not skipped:
        return None
    return "overflow" if precision == "fp16" and math.isfinite(loss) else "non_finite"
