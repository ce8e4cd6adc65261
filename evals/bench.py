"""Architecture benchmarks: every (task, model variant, learning rate, seed) trained from
scratch, then scored by length; the best learning rate per (task, variant) is reported.

A variant is a model (preset name, model YAML, or exported checkpoint's config) plus
``key=value`` overrides; ``neg_eigval`` and ``n_h`` expand into the right keys for the
pattern's mixers so several eigenvalue ranges and Householder counts compare in one run.
With a deadline, every run gets an equal share of the time left when it starts (time a
run does not use passes on to the next) and runs nothing is left for are not started.
"""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from pretrain.config_loader import ConfigError, apply_overrides, build_dataclass, load_model_config
from pretrain.model_config import ModelConfig
from pretrain.models import build_model

from .metrics import evaluate_task, longest_solved
from .suites import BenchTask
from .tasks import Condition, Task, make_task
from .train import TrainConfig, train_on_task


@dataclass
class Variant:
    name: str
    model: str
    overrides: list[str] = field(default_factory=list)


class ModelSpecError(ValueError):
    """A model argument that is neither a preset, a model YAML, nor a checkpoint directory."""


def model_config(model: str, overrides: list[str]) -> ModelConfig:
    """A preset / YAML via the config loader, or the ``config.yaml`` of an exported checkpoint."""
    p = Path(model)
    if p.is_dir():
        cfg_file = p / "config.yaml"
        if not cfg_file.is_file():
            raise ModelSpecError(f"checkpoint directory {str(p)!r} has no config.yaml: is it an export "
                                 f"(linrnn-export)?")
        raw = apply_overrides(yaml.safe_load(cfg_file.read_text()) or {}, overrides)
        return build_dataclass(ModelConfig, raw, prefix="model")
    if ("/" in model or model.endswith((".yaml", ".yml"))) and not p.exists():
        raise ModelSpecError(f"checkpoint or model file {model!r} does not exist")
    try:
        return load_model_config(model, overrides)
    except ConfigError as e:
        raise ModelSpecError(str(e)) from None


def expand_variants(model: str, overrides: list[str], neg_eigval: list[bool] | None = None,
                    n_h: list[int] | None = None) -> list[Variant]:
    """One variant per (eigenvalue range, n_h) combination, named by what differs."""
    base = model_config(model, overrides)
    letters = set(base.pattern)
    label = Path(model).name if Path(model).is_dir() else Path(model).stem
    if neg_eigval and not letters & {"D", "M"}:
        raise ModelSpecError(f"pattern {base.pattern!r} has no eigenvalue setting (needs D or M layers)")
    if n_h and "D" not in letters:
        raise ModelSpecError(f"pattern {base.pattern!r} has no GatedDeltaProduct layer for n_h")
    out = []
    for neg, nh in itertools.product(neg_eigval or [None], n_h or [None]):
        extra, parts = [], []
        if nh is not None:
            extra.append(f"deltaproduct.num_householder={nh}")
            parts.append(f"nh{nh}")
        if neg is not None:
            extra += [f"{fam}.allow_neg_eigval={str(neg).lower()}" for letter, fam in
                      (("D", "deltaproduct"), ("M", "mamba2")) if letter in letters]
            parts.append("[-1,1]" if neg else "[0,1]")
        out.append(Variant(" ".join([label, *parts]), model, [*overrides, *extra]))
    return out


@dataclass
class RunRecord:
    task: str
    variant: str
    lr: float
    seed: int
    params: int
    train: dict[str, Any]
    eval: dict[str, Any]
    longest_solved: int
    train_max: int


@dataclass(frozen=True)
class Job:
    """One training run to do: a task, a model variant, a learning rate and a seed."""
    task: BenchTask
    variant: Variant
    lr: float
    seed: int

    def describe(self) -> dict[str, Any]:
        return {"task": self.task.task, "variant": self.variant.name, "lr": self.lr, "seed": self.seed}


def eval_tokens(task: Task, conditions: list[Condition], n: int) -> int:
    """Tokens ``evaluate_task`` scores: one batch at the longest length for prefix-scored tasks."""
    if task.prefix_scored:
        return n * max(c.length for c in conditions)
    return n * sum(c.length for c in conditions)


def run_one(bt: BenchTask, variant: Variant, cfg: TrainConfig, eval_size: int,
            threshold: float = 0.99, progress: bool = True, deadline: float | None = None) -> RunRecord:
    """Build the variant for the task's vocabulary, train it from scratch, score it.

    ``deadline`` (``time.monotonic()``) cuts training short so the scoring still ends by it."""
    task = make_task(bt.task, **bt.task_kwargs)
    mcfg = model_config(variant.model, [*variant.overrides, f"vocab_size={task.vocab_size}"])
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    desc = f"{bt.task} | {variant.name} | lr {cfg.lr:g} | seed {cfg.seed}"
    tr = train_on_task(model, task, list(bt.train), cfg, progress=progress, desc=desc, deadline=deadline,
                       eval_tokens=eval_tokens(task, list(bt.test), eval_size))
    ev = evaluate_task(model, task, list(bt.test), eval_size, torch.Generator().manual_seed(cfg.seed + 7919))
    return RunRecord(bt.task, variant.name, cfg.lr, cfg.seed, sum(p.numel() for p in model.parameters()),
                     tr.to_dict(), ev.to_dict(), longest_solved(ev.points, threshold), bt.train_max)


def check_conditions(tasks: Iterable[BenchTask]) -> None:
    """Draw one sequence of every training and test condition before any training: an
    impossible one (MQAR pairs that do not fit the length or vocabulary) stops the call with
    the task's own ValueError at once, not after the first run has trained."""
    gen = torch.Generator().manual_seed(0)
    for bt in tasks:
        task = make_task(bt.task, **bt.task_kwargs)
        for cond in (*bt.train, *bt.test):
            task.sample(1, cond, gen)


def run_jobs(jobs: list[Job], cfg: TrainConfig, *, eval_size: int = 512, threshold: float = 0.99,
             progress: bool = True, deadline: float | None = None,
             on_record: Callable[[RunRecord], None] | None = None) -> tuple[list[RunRecord], list[Job]]:
    """Run ``jobs`` in order; returns the records and the jobs not started for lack of time.

    With ``deadline`` (``time.monotonic()``) each run may use the time left divided by the
    runs left, less what ``on_record`` took last time (it runs after each of them), so early
    finishers leave more for the rest. ``on_record`` sees every record as soon as its run
    ends (to save results incrementally)."""
    check_conditions({job.task.task: job.task for job in jobs}.values())
    records: list[RunRecord] = []
    record_s = 0.0
    for i, job in enumerate(jobs):
        run_deadline = None
        if deadline is not None:
            share = (deadline - time.monotonic()) / (len(jobs) - i) - record_s
            if share <= 0:
                return records, jobs[i:]
            run_deadline = time.monotonic() + share
        rec = run_one(job.task, job.variant, replace(cfg, lr=job.lr, seed=job.seed), eval_size, threshold,
                      progress, deadline=run_deadline)
        records.append(rec)
        if on_record is not None:
            t0 = time.monotonic()
            on_record(rec)
            record_s = time.monotonic() - t0
    return records, []


def run_benchmark(tasks: list[BenchTask], variants: list[Variant], cfg: TrainConfig, *, lrs: list[float],
                  seeds: list[int], eval_size: int = 512, threshold: float = 0.99,
                  progress: bool = True, time_limit: float | None = None) -> list[RunRecord]:
    """Every (task, variant, lr, seed); ``time_limit`` seconds for all of them together."""
    jobs = [Job(*j) for j in itertools.product(tasks, variants, lrs, seeds)]
    deadline = None if time_limit is None else time.monotonic() + time_limit
    return run_jobs(jobs, cfg, eval_size=eval_size, threshold=threshold, progress=progress, deadline=deadline)[0]


def summarise(records: list[RunRecord]) -> list[dict[str, Any]]:
    """Per (task, variant): the learning rate with the best mean validation accuracy, and
    its seeds' mean test accuracy by condition, longest solved length, steps and how many
    of its runs a time limit cut short."""
    rows = []
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.variant), []).append(r)
    for (task, variant), recs in groups.items():
        by_lr: dict[float, list[RunRecord]] = {}
        for r in recs:
            by_lr.setdefault(r.lr, []).append(r)
        lr, best = max(by_lr.items(), key=lambda kv: statistics.mean(r.train["best_val_acc"] for r in kv[1]))
        points = [rec.eval["points"] for rec in best]
        by_cond = []
        for i, p in enumerate(points[0]):
            by_cond.append({"length": p["length"], "pairs": p["pairs"],
                            "token_acc": statistics.mean(pts[i]["token_acc"] for pts in points),
                            "seq_acc": statistics.mean(pts[i]["seq_acc"] for pts in points)})
        rows.append({
            "task": task, "variant": variant, "lr": lr, "seeds": [r.seed for r in best],
            "params": best[0].params, "train_max": best[0].train_max,
            "converged": sum(r.train["converged"] for r in best),
            "diverged": sum(bool(r.train.get("diverged")) for r in best),
            "stopped_by_time_limit": sum(r.train.get("stopped_by_time_limit", False) for r in best),
            "steps": statistics.mean(r.train["steps"] for r in best),
            "val_acc": statistics.mean(r.train["best_val_acc"] for r in best),
            "longest_solved": min(r.longest_solved for r in best),
            "longest_solved_max": max(r.longest_solved for r in best),
            "by_condition": by_cond,
            "curve": _mean_curve([r.eval.get("curve", []) for r in best]),
        })
    return rows


def _mean_curve(curves: list[list[float]]) -> list[float]:
    if not curves or not all(curves):
        return []
    n = min(len(c) for c in curves)
    return [round(statistics.mean(c[i] for c in curves), 5) for i in range(n)]


def record_dict(r: RunRecord) -> dict[str, Any]:
    return asdict(r)
