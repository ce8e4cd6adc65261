"""Loss spikes, noticed while the run trains (``logging.spike_sigma``).

A step whose loss lies more than ``spike_sigma`` standard deviations above the mean of the
last ``WINDOW`` ordinary steps is a spike: the run prints a warning and logs a
``loss_spike`` event. When the loss stays up for ``PATIENCE`` steps in a row, one more line
says how to go back (stop the job, ``linrnn-train ... --rewind-to`` the newest checkpoint
before the spike, optionally skipping its data: ``rewind.py``), and from then on the new
level counts as ordinary. The history (the last ``WINDOW`` ordinary losses, and a run of spikes under way) is saved
with each checkpoint, so a resumed run judges its first steps as the interrupted run would.
"""
from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt

WINDOW = 200
MIN_HISTORY = 50
PATIENCE = 20


@dataclass
class Spike:
    step: int
    loss: float
    mean: float  # of the window of ordinary steps before it
    sigmas: float  # how many standard deviations above that mean
    since: int  # the first step of this run of spikes
    sustained: bool  # the PATIENCE-th spike in a row


class SpikeWatch:
    def __init__(self, sigma: float):
        self.sigma = sigma
        self.window: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.since: int | None = None
        self.count = 0

    def observe(self, step: int, loss: float) -> Spike | None:
        """The spike that ``loss`` of ``step`` is, or None (it then joins the window)."""
        if not self.sigma or not math.isfinite(loss):
            return None
        if len(self.window) >= MIN_HISTORY:
            mean = statistics.fmean(self.window)
            std = max(statistics.pstdev(self.window, mean), 1e-3 * abs(mean), 1e-8)
            sigmas = (loss - mean) / std
            if sigmas > self.sigma:
                self.since = step if self.since is None else self.since
                self.count += 1
                spike = Spike(step, loss, mean, sigmas, self.since, self.count == PATIENCE)
                if spike.sustained:  # a new level: judge what follows against it
                    self.window.clear()
                    self.since, self.count = None, 0
                return spike
        self.since, self.count = None, 0
        self.window.append(loss)
        return None

    def state(self) -> dict:
        """What goes into a checkpoint, so that a resumed run judges its first steps as this
        run would have (keys of the run state; ``spike_run`` is [since, count] mid-spike)."""
        return {"recent_losses": list(self.window),
                "spike_run": [self.since, self.count] if self.since is not None else None}

    def restore(self, state: dict) -> None:
        """Back to a checkpoint's :meth:`state` (older checkpoints hold only the history)."""
        self.window.clear()
        self.window.extend(float(v) for v in state.get("recent_losses", []))
        run = state.get("spike_run")
        self.since, self.count = (int(run[0]), int(run[1])) if run else (None, 0)


def spike_message(spike: Spike, checkpoint_dir: str | Path) -> str:
    """The warning line for ``spike``; a sustained one names the checkpoint to rewind to."""
    if not spike.sustained:
        return (f"loss spike at step {spike.step}: {spike.loss:.4f}, {spike.sigmas:.1f} standard deviations above "
                f"the mean {spike.mean:.4f} of the steps before it")
    # the loss of step s comes from the weights of checkpoint s - 1: the newest checkpoint whose
    # weights produced no spike loss is before since - 1
    before = [s for s, _, ok in ckpt.list_checkpoints(checkpoint_dir) if ok and s < spike.since - 1]
    if not before:
        back = "no checkpoint precedes it: keep watching, or restart the run with a lower optim.lr"
    else:
        back = (f"if it does not come back, stop the job and run `linrnn-train <the run's arguments> --rewind-to "
                f"{before[-1]} --skip-steps {spike.since - before[-1]}` (back to the newest checkpoint before the "
                "spike, past the data that led to it; see --rewind-to), then submit the job again")
    return f"the loss has stayed high for {PATIENCE} steps since step {spike.since}: {back}"
