"""Benchmark suites: which tasks, trained on which conditions, tested on which.

The tasks are the literature's (checked against the reference generators), and the lengths
its: MQAR at the Zoology paper's (seq_len, pairs) with vocab 8192; parity (final answer
scored) and modular arithmetic trained on lengths 3-40 and tested to 256 (Grazzi et al.);
group word problems trained at length 128 and tested to 512 (DeltaProduct). Protocols
differ where README.md's evals section says so (one MQAR model for the whole grid, training
budgets, the bracket grammar); ``customise`` replaces any task's conditions (CLI flags).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any

from .tasks import GROUPS, Condition

ZOOLOGY_TRAIN = [(64, 4), (128, 8), (256, 16), (512, 64)]
ZOOLOGY_TEST = [(64, 4), (128, 8), (256, 16), (512, 64), (512, 128), (1024, 128), (1024, 256)]
ST_TEST_LENGTHS = [10, 20, 40, 64, 96, 128, 160, 192, 224, 256]
GROUP_TEST_LENGTHS = [32, 64, 128, 192, 256, 320, 384, 448, 512]


@dataclass(frozen=True)
class BenchTask:
    task: str
    train: tuple[Condition, ...]
    test: tuple[Condition, ...]
    task_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def train_max(self) -> int:
        return max(c.length for c in self.train)


def _lengths(lengths: list[int]) -> tuple[Condition, ...]:
    return tuple(Condition(L) for L in lengths)


def mqar_task(vocab_size: int = 8192) -> BenchTask:
    return BenchTask("mqar", tuple(Condition(T, P) for T, P in ZOOLOGY_TRAIN),
                     tuple(Condition(T, P) for T, P in ZOOLOGY_TEST), {"vocab_size": vocab_size})


def state_task(name: str) -> BenchTask:
    if name in GROUPS:
        return BenchTask(name, _lengths([128]), _lengths(GROUP_TEST_LENGTHS))
    return BenchTask(name, _lengths(list(range(3, 41))), _lengths(ST_TEST_LENGTHS))


STATE_TASKS = ("parity", "modular_arithmetic", "modular_arithmetic_brackets", *GROUPS)
SUITES: dict[str, list[str]] = {
    "mqar": ["mqar"],
    "state_tracking": list(STATE_TASKS),
    **{name: [name] for name in STATE_TASKS},
    "parity_tagged": ["parity_tagged"],  # every prefix labelled: learnt in far fewer steps (CPU runs)
}


def suite_tasks(suite: str) -> list[BenchTask]:
    """The tasks of a suite name (or several names joined by commas)."""
    tasks = []
    for name in [s.strip() for s in suite.split(",") if s.strip()]:
        if name not in SUITES:
            close = difflib.get_close_matches(name, list(SUITES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown suite {name!r}{hint}; suites: {', '.join(SUITES)}")
        tasks += [mqar_task() if t == "mqar" else state_task(t) for t in SUITES[name]
                  if t not in {bt.task for bt in tasks}]  # once each (a task named twice is not two seeds)
    if not tasks:
        raise ValueError("no suite given")
    return tasks


def customise(bt: BenchTask, *, train_lengths: tuple[int, int] | None = None,
              test_lengths: list[int] | None = None, mqar_vocab: int | None = None,
              mqar_train: list[tuple[int, int]] | None = None,
              mqar_test: list[tuple[int, int]] | None = None) -> BenchTask:
    """Replace a task's conditions (CLI flags; small settings for CPU runs and tests)."""
    if bt.task == "mqar":
        if mqar_vocab is not None:
            bt = replace(bt, task_kwargs={**bt.task_kwargs, "vocab_size": mqar_vocab})
        if mqar_train:
            bt = replace(bt, train=tuple(Condition(T, P) for T, P in mqar_train))
        if mqar_test:
            bt = replace(bt, test=tuple(Condition(T, P) for T, P in mqar_test))
        return bt
    if train_lengths is not None:
        lo, hi = train_lengths
        bt = replace(bt, train=_lengths(list(range(lo, hi + 1))))
    if test_lengths:
        bt = replace(bt, test=_lengths(sorted(test_lengths)))
    return bt
