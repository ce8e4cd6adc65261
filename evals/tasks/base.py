"""The task interface shared by every synthetic benchmark.

A task turns (number of sequences, a ``Condition``, a ``torch.Generator``) into
``input_ids [N, T]`` and per-position ``labels [N, T]`` (``-100`` where nothing is
scored), so one trainer and one scorer serve all of them. Everything is drawn from the
generator passed in: the same seed gives the same batch on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

IGNORE = -100


@dataclass(frozen=True)
class Condition:
    """One difficulty setting: sequence length, plus key-value pairs for recall tasks."""

    length: int
    pairs: int = 0

    @property
    def label(self) -> str:
        return f"{self.length}/{self.pairs}" if self.pairs else str(self.length)


class Task(Protocol):
    name: str
    vocab_size: int
    # True when every position is labelled with a running answer: then the prefix of a
    # long test sequence is a valid shorter test sequence, and one batch at the longest
    # length scores every shorter length too (cumulative sequence accuracy).
    prefix_scored: bool

    def sample(self, n: int, cond: Condition, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def uniform_length(lo: int, hi: int, gen: torch.Generator) -> int:
    """A length drawn uniformly from ``[lo, hi]`` with the task's generator."""
    if not 1 <= lo <= hi:
        raise ValueError(f"length range must satisfy 1 <= lo <= hi, got [{lo}, {hi}]")
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))
