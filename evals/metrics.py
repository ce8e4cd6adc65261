"""Scoring by length: token accuracy, sequence accuracy, and the longest solved length.

Sequence accuracy at length L counts a sequence right only if every labelled prediction
in it is right. For running-answer tasks (every position labelled) it is *cumulative*:
the fraction of sequences whose first L predictions are all right (DeltaProduct), read
off the prefixes of one batch at the longest length.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .tasks import IGNORE, Condition, Task


LOGIT_BUDGET = 2**28  # elements of one evaluation batch's logits


@dataclass
class LengthScore:
    length: int
    pairs: int
    token_acc: float
    seq_acc: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    points: list[LengthScore]
    curve: list[float] = field(default_factory=list)  # cumulative seq acc at L = 1..T (prefix tasks)

    def to_dict(self) -> dict:
        return {"points": [p.to_dict() for p in self.points], "curve": self.curve}


@torch.no_grad()
def correct_mask(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 256) -> torch.Tensor:
    """[N, T] bool: prediction equals label, True where nothing is labelled.

    The batch shrinks so one batch's fp32 logits stay under ~1 GiB (MQAR at 1024 tokens
    with 8192 classes would need 8 GiB for 256 sequences)."""
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    if vocab:
        batch_size = max(1, min(batch_size, LOGIT_BUDGET // (ids.shape[1] * vocab)))
    out = []
    for i in range(0, ids.shape[0], batch_size):
        logits = model(ids[i:i + batch_size].to(device))
        pred = logits.argmax(-1).cpu()
        lab = labels[i:i + batch_size]
        out.append((pred == lab) | (lab == IGNORE))
    return torch.cat(out)


def token_accuracy(correct: torch.Tensor, labels: torch.Tensor) -> float:
    scored = labels != IGNORE
    return float((correct & scored).sum() / scored.sum().clamp_min(1))


def cumulative_sequence_accuracy(correct: torch.Tensor) -> torch.Tensor:
    """[N, T] -> [T]: fraction of rows whose first L+1 positions are all right."""
    return torch.cummin(correct.int(), dim=1).values.float().mean(0)


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, task: Task, conditions: list[Condition], n: int,
                  gen: torch.Generator, batch_size: int = 256) -> EvalResult:
    """Token and sequence accuracy at every condition (n sequences each)."""
    was_training = model.training
    model.eval()
    try:
        if task.prefix_scored:
            longest = max(c.length for c in conditions)
            ids, labels = task.sample(n, Condition(longest), gen)
            correct = correct_mask(model, ids, labels, batch_size)
            curve = cumulative_sequence_accuracy(correct)
            points = [LengthScore(c.length, c.pairs, token_accuracy(correct[:, :c.length], labels[:, :c.length]),
                                  float(curve[c.length - 1])) for c in conditions]
            return EvalResult(points, [round(float(v), 5) for v in curve])
        points = []
        for c in conditions:
            ids, labels = task.sample(n, c, gen)
            correct = correct_mask(model, ids, labels, batch_size)
            points.append(LengthScore(c.length, c.pairs, token_accuracy(correct, labels),
                                      float(correct.all(dim=1).float().mean())))
        return EvalResult(points)
    finally:
        model.train(was_training)


def longest_solved(points: list[LengthScore], threshold: float = 0.99) -> int:
    """The longest length L such that every tested condition of length <= L (all its pair
    counts, for MQAR) has seq accuracy >= threshold (0: none)."""
    best = 0
    for length in sorted({p.length for p in points}):
        if any(p.seq_acc < threshold for p in points if p.length == length):
            break
        best = length
    return best
