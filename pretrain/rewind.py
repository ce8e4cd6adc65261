"""Go back to an earlier checkpoint, e.g. after a loss spike, and optionally skip the data that
came next: ``linrnn-train CONFIG [key=value ...] --rewind-to STEP [--skip-steps M]``.

A one-shot command for a login node while no job trains into ``checkpoint.dir`` (it takes
the run lock, so it refuses while one does). Step directories after STEP, complete or torn,
move to ``<checkpoint.dir>/rewound/<time>-after-step_N/`` (kept, not deleted), so the same
training command resumes from STEP; so do their exports (``exports/step_*``), which evals
would otherwise take for the new steps of the same numbers. With M > 0, ``step_N/skip_data.json`` asks the resume to
read the next M steps' batches and drop them: the step count and learning-rate schedule go
on from STEP and the data from M steps further (PaLM's and OLMo's spike recovery). The
request belongs to that checkpoint: a requeue before the next save skips the same data
again, and later checkpoints hold the data position past it. A W&B run cannot take steps it
has logged again, so the next start logs to a new one (the old id file moves along).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .run_lock import acquire, release
from .export import EXPORTS_DIR as EXPORTS
from .run_log import WANDB_ID_FILE

SKIP_FILE = "skip_data.json"
REWOUND = "rewound"


@dataclass
class Rewind:
    target: Path
    moved: list[str]  # the step directories moved aside
    moved_to: Path | None
    skip_steps: int
    moved_exports: list[str]  # exports/step_* of the moved steps, moved to <moved_to>/exports


def rewind(root: str | os.PathLike, step: int, skip_steps: int = 0, log_dir: str | os.PathLike | None = None) -> Rewind:
    """Make ``step_<step>`` the checkpoint the next start resumes from (see the module doc).
    Raises ``CheckpointError`` naming the cause: a job holds the directory, or ``step`` is
    not a complete checkpoint there."""
    root = Path(root)
    if skip_steps < 0:
        raise ckpt.CheckpointError(f"--skip-steps {skip_steps}: give a number of steps >= 0")
    if not root.is_dir():
        raise ckpt.CheckpointError(f"checkpoint.dir {str(root)!r} does not exist: nothing to rewind")
    fd = acquire(root, wait_s=0.0, log=print)  # no file locks here: a warning says so
    try:
        found = ckpt.list_checkpoints(root)
        complete = [s for s, _, ok in found if ok]
        target = ckpt.step_dir(root, step)
        if step not in complete:
            listed = ", ".join(str(s) for s in complete[-8:]) or "none"
            raise ckpt.CheckpointError(f"{str(target)!r} is not a complete checkpoint: the complete ones in "
                                       f"{str(root)!r} are at steps {listed}")
        if skip_steps and target.is_symlink():
            raise ckpt.CheckpointError(
                f"{str(target)!r} is linked in from another run ({os.path.realpath(target)}): a skip request "
                "written there would apply to that run too. Replace the link by a copy of the directory "
                "(cp -r --remove-destination), or rewind without --skip-steps")
        later = [p for s, p, _ in found if s > step]
        exports = root / EXPORTS
        # exports of the moved steps: evals would take them for the new steps of the same numbers
        stale = sorted(p for p in exports.glob("step_*") if (ckpt.step_of(p) or 0) > step) if exports.is_dir() else []
        moved_to = None
        # the W&B run has logged past the target: the new trajectory goes to a new W&B run
        # (W&B drops steps below its counter), also when no later step directory remains
        wandb_id = Path(log_dir or root / "logs") / WANDB_ID_FILE
        if later or stale or wandb_id.is_file():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            moved_to = root / REWOUND / f"{stamp}-after-{target.name}"
            n = 1
            while moved_to.exists():  # two rewinds within a second
                moved_to, n = root / REWOUND / f"{stamp}-after-{target.name}-{n}", n + 1
            (moved_to / EXPORTS).mkdir(parents=True)
            for p in later:
                os.replace(p, moved_to / p.name)
            for p in stale:
                os.replace(p, moved_to / EXPORTS / p.name)
            if wandb_id.is_file():
                os.replace(wandb_id, moved_to / WANDB_ID_FILE)
        ckpt.write_atomic(root / ckpt.LATEST, target.name + "\n")
        skip = target / SKIP_FILE
        if skip_steps:
            ckpt.write_atomic(skip, json.dumps({"steps": skip_steps, "asked": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        elif not target.is_symlink():  # (a linked step's requests are its own run's)
            skip.unlink(missing_ok=True)  # an earlier rewind's request is not repeated
        return Rewind(target, [p.name for p in later], moved_to, skip_steps, [p.name for p in stale])
    finally:
        release(fd)


def skip_request(step_path: Path) -> int:
    """How many steps of data a resume from ``step_path`` drops first (0: none asked)."""
    try:
        steps = json.loads((step_path / SKIP_FILE).read_text())["steps"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"{str(step_path / SKIP_FILE)!r} cannot be read ({e}): rerun "
                                   "linrnn-train ... --rewind-to with --skip-steps to write it again") from None
    if not isinstance(steps, int) or steps < 0:
        raise ckpt.CheckpointError(f"{str(step_path / SKIP_FILE)!r} asks for {steps!r} steps: rerun "
                                   "linrnn-train ... --rewind-to with --skip-steps to write it again")
    return steps
