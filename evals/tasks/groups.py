"""Group word problems (Merrill et al.; DeltaProduct): running products in a finite group.

Input tokens are group elements drawn uniformly; the label at position t is the product
``x_1 * x_2 * ... * x_t`` (token tagging, every position scored). Elements are indexed
0..|G|-1 with 0 the identity; the product ``a * b`` means "apply a, then b" for
permutations, and addition mod n for cyclic groups. S3 and S4 are solvable, A5 and S5 are
not (NC^1-complete word problems), Z60 is abelian of the same order as A5.
"""
from __future__ import annotations

import itertools

import torch

from .base import Condition


def permutation_group(n: int, even_only: bool = False) -> list[tuple[int, ...]]:
    """Elements of S_n (or A_n) as tuples; the identity comes first."""
    perms = list(itertools.permutations(range(n)))
    if even_only:
        perms = [p for p in perms if _parity(p) == 0]
    return perms


def _parity(p: tuple[int, ...]) -> int:
    inversions = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
    return inversions % 2


def compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """``a`` then ``b``: position i goes to a[i], then to b[a[i]]."""
    return tuple(b[a[i]] for i in range(len(a)))


def permutation_table(elements: list[tuple[int, ...]]) -> torch.Tensor:
    index = {p: i for i, p in enumerate(elements)}
    table = torch.empty(len(elements), len(elements), dtype=torch.long)
    for i, a in enumerate(elements):
        for j, b in enumerate(elements):
            table[i, j] = index[compose(a, b)]
    return table


def cyclic_table(n: int) -> torch.Tensor:
    r = torch.arange(n)
    return (r[:, None] + r[None, :]) % n


def group_table(name: str) -> torch.Tensor:
    """Multiplication table ``[G, G]`` of a named group (S3, S4, A4, A5, S5, Z<n>)."""
    key = name.upper()
    if key[0] == "S" and key[1:].isdigit():
        return permutation_table(permutation_group(int(key[1:])))
    if key[0] == "A" and key[1:].isdigit():
        return permutation_table(permutation_group(int(key[1:]), even_only=True))
    if key[0] == "Z" and key[1:].isdigit() and int(key[1:]) >= 2:
        return cyclic_table(int(key[1:]))
    raise ValueError(f"unknown group {name!r}: use S<n>, A<n> or Z<n> (e.g. S3, A5, Z60)")


def running_products(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [N, T] element ids -> [N, T] prefix products (left to right)."""
    out = torch.empty_like(x)
    state = x[:, 0]
    out[:, 0] = state
    for t in range(1, x.shape[1]):
        state = table[state, x[:, t]]
        out[:, t] = state
    return out


class GroupWordTask:
    """Running product in a finite group; vocabulary = the group's elements."""

    prefix_scored = True

    def __init__(self, group: str):
        self.group = group.upper()
        self.name = self.group.lower()
        self.table = group_table(group)
        self.vocab_size = self.table.shape[0]

    def sample(self, n: int, cond: Condition, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, self.vocab_size, (n, cond.length), generator=gen)
        return x, running_products(x, self.table)


class ParityTask:
    """Bits in, running parity out (the word problem of Z2 on tokens 0/1).

    ``scoring="every"`` labels every position (token tagging, as for the groups; the task
    ``parity_tagged``); ``scoring="last"`` labels only the final position (the task
    ``parity``: the Chomsky-hierarchy form Grazzi et al. train and score).
    """

    vocab_size = 2

    def __init__(self, scoring: str = "every"):
        if scoring not in ("every", "last"):
            raise ValueError(f"parity scoring must be 'every' or 'last', got {scoring!r}")
        self.scoring = scoring
        self.prefix_scored = scoring == "every"
        self.name = "parity_tagged" if self.prefix_scored else "parity"

    def sample(self, n: int, cond: Condition, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 2, (n, cond.length), generator=gen)
        labels = torch.cumsum(x, dim=1) % 2
        if self.scoring == "last":
            labels[:, :-1] = -100
        return x, labels
