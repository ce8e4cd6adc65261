"""Multi-query associative recall as in Zoology (Arora et al. 2024).

Keys come from ``[1, V/2)`` and values from ``[V/2, V)``, distinct within a sequence.
All ``pairs`` key-value pairs come first; then every key is queried once, at an even
offset of the remaining space drawn without replacement with a power law
``p(i) ~ i^(a-1)`` (short gaps likely); the label at a query is its value and every
other position is -100. Unqueried positions hold random tokens (``random_non_queries``).
"""
from __future__ import annotations

import torch

from .base import IGNORE, Condition


class MQARTask:
    name = "mqar"
    prefix_scored = False

    def __init__(self, vocab_size: int = 8192, power_a: float = 0.01, random_non_queries: bool = True):
        if vocab_size < 8:
            raise ValueError(f"MQAR vocab_size must be >= 8, got {vocab_size}")
        self.vocab_size = vocab_size
        self.power_a = power_a
        self.random_non_queries = random_non_queries

    def check(self, cond: Condition) -> None:
        T, P = cond.length, cond.pairs
        if P < 1 or T % 2 or 4 * P > T:
            raise ValueError(f"MQAR needs pairs >= 1, even seq_len and 4*pairs <= seq_len; got {cond.label}")
        if P > self.vocab_size // 2 - 1:
            raise ValueError(f"MQAR: {P} distinct keys do not fit in a vocabulary of {self.vocab_size}")

    def sample(self, n: int, cond: Condition, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        self.check(cond)
        T, P, half = cond.length, cond.pairs, self.vocab_size // 2
        keys = torch.rand(n, half - 1, generator=gen).argsort(dim=1)[:, :P] + 1
        values = torch.rand(n, self.vocab_size - half, generator=gen).argsort(dim=1)[:, :P] + half
        ctx = 2 * P
        space = (T - ctx) // 2
        weights = self.power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (self.power_a - 1)
        gaps = torch.multinomial(weights.expand(n, space), P, replacement=False, generator=gen)
        ids = torch.zeros(n, T, dtype=torch.long)
        ids[:, 0:ctx:2], ids[:, 1:ctx:2] = keys, values
        pos = ctx + 2 * gaps
        ids.scatter_(1, pos, keys)
        labels = torch.full_like(ids, IGNORE)
        labels.scatter_(1, pos, values)
        if self.random_non_queries:
            filler = torch.randint(0, self.vocab_size, (n, T), generator=gen)
            free = torch.ones_like(ids, dtype=torch.bool)
            free[:, :ctx] = False
            free.scatter_(1, pos, False)
            ids = torch.where(free, filler, ids)
        return ids, labels
