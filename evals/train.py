"""Train a freshly built model on a synthetic task: plain PyTorch AdamW, CPU or GPU.

Deliberately not the DeepSpeed trainer: benchmarks are small, many (models x seeds x
learning rates) and must run anywhere. Each step draws one condition (length, pairs) from
the training set, so a batch needs no padding. Validation runs on a fixed held-out set at
the training conditions and training stops once it reaches ``target_acc``, or early when a
deadline would otherwise leave no time for the final validation and the test evaluation.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from .metrics import correct_mask, token_accuracy
from .tasks import Condition, Task


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 50
    grad_clip: float = 1.0
    eval_every: int = 100
    val_size: int = 256
    target_acc: float = 0.99
    stop_metric: Literal["token", "sequence"] = "token"
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    steps: int
    converged: bool
    best_val_acc: float
    final_loss: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped_by_time_limit: bool = False
    diverged: str | None = None  # the non-finite loss that ended training (the learning rate too high)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """No weight decay on biases, norms, embeddings' peers and params marked ``_no_weight_decay``."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def validation_set(task: Task, conditions: list[Condition], size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``size`` sequences spread over the training conditions, from a seed of their own."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    per = max(1, size // len(conditions))
    return [task.sample(per, c, gen) for c in conditions]


def validation_accuracy(model: torch.nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]],
                        metric: str) -> float:
    was_training = model.training
    model.eval()
    hits = total = 0.0
    for ids, labels in val:
        correct = correct_mask(model, ids, labels)
        if metric == "sequence":
            hits += float(correct.all(dim=1).sum())
            total += ids.shape[0]
        else:
            scored = int((labels != -100).sum())
            hits += token_accuracy(correct, labels) * scored
            total += scored
    model.train(was_training)
    return hits / max(total, 1.0)


class StopClock:
    """Decides when training must stop so that what follows it still ends by ``deadline``.

    What follows is one more validation and the test evaluation (``eval_tokens`` tokens of
    forward passes). Both are priced per token from the last (warm) validation pass, with a
    margin because test sequences are longer; per token overprices small, overhead-bound
    passes, which errs on the safe side. A step is priced by the median of recent steps,
    so one slow first step (kernel compilation) does not count for long.
    """

    MARGIN = 1.5  # on forward-pass estimates: longer test sequences, batch-size effects

    def __init__(self, deadline: float, val_tokens: int, eval_tokens: int) -> None:
        self.deadline, self.val_tokens, self.eval_tokens = deadline, val_tokens, eval_tokens
        self.steps: deque[float] = deque(maxlen=10)
        self.forward_s_per_token = 0.0

    def step_done(self, seconds: float) -> None:
        self.steps.append(seconds)

    def validation_done(self, seconds: float) -> None:
        self.forward_s_per_token = seconds / max(self.val_tokens, 1)

    def out_of_time(self, validates: bool) -> bool:
        """True when the next step (with its validation if ``validates``) would not fit."""
        val_s = self.forward_s_per_token * self.val_tokens
        tail = self.MARGIN * (val_s * (2 if validates else 1) + self.forward_s_per_token * self.eval_tokens)
        step_s = statistics.median(self.steps) if self.steps else 0.0
        return time.monotonic() + step_s + tail > self.deadline


def _timed_validation(model: torch.nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]], metric: str,
                      clock: StopClock | None) -> float:
    t0 = time.monotonic()
    acc = validation_accuracy(model, val, metric)
    if clock is not None:
        clock.validation_done(time.monotonic() - t0)
    return acc


def train_on_task(model: torch.nn.Module, task: Task, conditions: list[Condition], cfg: TrainConfig,
                  progress: bool = True, desc: str = "train", deadline: float | None = None,
                  eval_tokens: int = 0) -> TrainResult:
    """Train until ``cfg.steps`` or validation accuracy >= ``cfg.target_acc``, then keep the
    weights that scored the best validation accuracy (what a learning-rate sweep ranks runs
    by, so the test scores those weights). A non-finite loss (a learning rate too high)
    ends training there, recorded in ``diverged``, rather than the whole sweep.

    With ``deadline`` (a ``time.monotonic()`` value) training also stops before a step that
    would leave too little time for a last validation and ``eval_tokens`` tokens of test
    evaluation; at least one step always runs, so a deadline already past still gives a
    (barely trained) result, marked ``stopped_by_time_limit``.
    """
    if not conditions:
        raise ValueError("train_on_task: no training conditions")
    device = torch.device(cfg.device)
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    val = validation_set(task, conditions, cfg.val_size, cfg.seed)
    clock = None
    if deadline is not None:
        clock = StopClock(deadline, sum(ids.numel() for ids, _ in val), eval_tokens)
        validation_accuracy(model, val, cfg.stop_metric)  # warm-up: the first pass may compile kernels
        _timed_validation(model, val, cfg.stop_metric, clock)  # prices forward passes
    history: list[dict] = []
    best, loss_value, converged, stopped, done = 0.0, float("nan"), False, False, 0
    # the initial weights until a validation (only a run diverging before its first keeps them)
    best_state, validated, diverged = _snapshot(model), False, None

    def keep_if_best(acc: float) -> None:  # the first validation always counts, even at 0 accuracy
        nonlocal best, best_state, validated
        if not validated or acc > best:
            best, best_state, validated = acc, _snapshot(model), True

    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in range(1, cfg.steps + 1):
        validates = step % cfg.eval_every == 0 or step == cfg.steps
        if clock is not None and done and clock.out_of_time(validates):
            stopped = True
            break
        t0 = time.monotonic()
        try:
            loss_value = _train_step(model, opt, task, conditions, cfg, gen, device, step, desc)
        except FloatingPointError as e:
            diverged = str(e)
            break
        if clock is not None:
            clock.step_done(time.monotonic() - t0)
        done = step
        bar.update(1)
        if validates:
            acc = _timed_validation(model, val, cfg.stop_metric, clock)
            keep_if_best(acc)
            history.append({"step": step, "loss": round(loss_value, 5), "val_acc": round(acc, 5)})
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{acc:.3f}")
            if acc >= cfg.target_acc:
                converged = True
                break
    if stopped and (not history or history[-1]["step"] != done):  # score the weights training ended with
        acc = validation_accuracy(model, val, cfg.stop_metric)
        keep_if_best(acc)
        history.append({"step": done, "loss": round(loss_value, 5), "val_acc": round(acc, 5)})
        converged = acc >= cfg.target_acc
    bar.close()
    model.load_state_dict(best_state)
    return TrainResult(done, converged, best, loss_value, time.perf_counter() - start, history, stopped, diverged)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, task: Task, conditions: list[Condition],
                cfg: TrainConfig, gen: torch.Generator, device: torch.device, step: int, desc: str) -> float:
    """One optimizer step on a batch of one randomly drawn condition; returns the loss."""
    cond = conditions[int(torch.randint(len(conditions), (1,), generator=gen))]
    ids, labels = task.sample(cfg.batch_size, cond, gen)
    for group in opt.param_groups:
        group["lr"] = lr_at(step - 1, cfg)
    loss = model.loss(ids.to(device), labels.to(device))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{desc}: non-finite loss {loss.item()} at step {step}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return float(loss.detach())
