"""Synthetic tasks by name: ``make_task("s3")``, ``make_task("mqar", vocab_size=8192)``."""
from __future__ import annotations

import difflib
from typing import Any

from .base import IGNORE, Condition, Task, uniform_length
from .groups import GroupWordTask, ParityTask, group_table, running_products
from .modular import ModularArithmeticTask
from .mqar import MQARTask

GROUPS = ("s3", "s4", "a5", "s5", "z60")
TASK_NAMES = ("mqar", "parity", "parity_tagged", "modular_arithmetic", "modular_arithmetic_brackets", *GROUPS)


def make_task(name: str, **kwargs: Any) -> Task:
    """A task from its name; group names of the form s<n>, a<n>, z<n> all work."""
    key = name.lower()
    if key == "mqar":
        return MQARTask(**kwargs)
    if key in ("parity", "parity_tagged"):  # the final answer scored (the literature's form), or every prefix
        return ParityTask(**{"scoring": "last" if key == "parity" else "every", **kwargs})
    if key in ("modular_arithmetic", "modular_arithmetic_brackets"):
        return ModularArithmeticTask(brackets=key.endswith("brackets"), **kwargs)
    if key[:1] in ("s", "a", "z") and key[1:].isdigit():
        return GroupWordTask(key, **kwargs)
    close = difflib.get_close_matches(key, TASK_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown task {name!r}{hint}; known tasks: {', '.join(TASK_NAMES)}")


__all__ = [
    "IGNORE", "Condition", "GROUPS", "GroupWordTask", "MQARTask", "ModularArithmeticTask",
    "ParityTask", "TASK_NAMES", "Task", "group_table", "make_task", "running_products",
    "uniform_length",
]
