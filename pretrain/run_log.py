"""Metrics out of rank 0: stdout, a JSONL file, TensorBoard and (optionally) W&B.

The JSONL file is the machine-readable record (tests compare per-step losses from it);
every record carries ``step`` and an ``event`` ("train", "val", "skip", "resume", ...).
TensorBoard scalars go to ``<log_dir>/tensorboard``; a resumed run marks its restart step
there, so TensorBoard hides what the interrupted run logged after its checkpoint (the steps
are logged again, and after a rewind differ). W&B only when
``logging.wandb_project`` is set, with the key read by wandb from ``WANDB_API_KEY``
(never passed, printed or saved here); a resumed job continues the same W&B run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

WANDB_ID_FILE = "wandb_run_id"


class RunLog:
    def __init__(self, log_dir: str | os.PathLike, *, enabled: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, run_name: str = "run", config: dict | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._tb_purge_step: int | None = None
        self._tb_wanted = False
        self._wandb = None
        if not enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        torn = self.path.is_file() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        self._file = open(self.path, "a", buffering=1)
        if torn:  # a kill mid-line: end it, so the next record starts a line of its own
            self._file.write("\n")
        self._tb_wanted = tensorboard  # the writer opens at the first record (see continue_after)
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                         id=self._wandb_run_id(), resume="allow")
            except ImportError:
                print("warning: logging.wandb_project is set but wandb is not installed", file=sys.stderr)

    def continue_after(self, step: int) -> None:
        """A resumed run goes on after ``step``: TensorBoard drops the records of later steps
        that the interrupted run wrote, from the first record of this run on."""
        self._tb_purge_step = step + 1
        if self._tb is not None:  # records came first: start the file again with the mark
            self._tb.close()
            self._tb = None

    def _tensorboard(self):
        if self._tb is None and self._tb_wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: logging.tensorboard is set but the tensorboard package is not installed "
                      "(pip install tensorboard); metrics go to metrics.jsonl only", file=sys.stderr)
                self._tb_wanted = False
                return None
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=self._tb_purge_step)
        return self._tb

    def _wandb_run_id(self) -> str:
        """One W&B run for the whole job, across requeues: its id is kept in the log directory
        (without it every resume would start a new W&B run). A copied run directory (a branch
        of an experiment) gets a run of its own: the file also names the directory."""
        path, here = self.dir / WANDB_ID_FILE, str(self.dir.resolve())
        try:
            saved = json.loads(path.read_text())
            if saved.get("dir") == here and saved.get("id"):
                return str(saved["id"])
        except (OSError, ValueError, AttributeError):
            pass
        run_id = uuid.uuid4().hex[:16]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": run_id, "dir": here}) + "\n")
        tmp.replace(path)
        return run_id

    def write(self, event: str, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "step": step, **fields}
        self._file.write(json.dumps(rec, default=_json_default) + "\n")  # type: ignore[union-attr]
        numeric = {k: v for k, v in fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tb = self._tensorboard() if numeric else None
        if tb is not None:
            for k, v in numeric.items():
                tb.add_scalar(f"{event}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{event}/{k}": v for k, v in numeric.items()}, step=step)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def read_metrics(path: str | os.PathLike, event: str = "train") -> list[dict]:
    """Records of one event type from a metrics.jsonl file, in file order. A line cut short
    (a kill mid-write, or a read while the line is being written) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == event:
                out.append(rec)
    return out


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
