"""SLURM's compact host lists and task counts, expanded in pure Python.

``scontrol show hostnames`` does the same but needs the SLURM client on the compute node's
PATH and a round trip per task; the syntax is small enough to parse here:
``node[01-03,07],gpu-a1`` -> node01 node02 node03 node07 gpu-a1 (zero padding kept,
several bracket groups in one name form their product: ``r[1-2]n[1-2]``).
"""
from __future__ import annotations

import re


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _expand_range(spec: str, whole: str) -> list[str]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", part)
        if not m:
            raise ValueError(f"bad range {part!r} in node list {whole!r}")
        lo, hi, stride = m.group(1), m.group(2) or m.group(1), int(m.group(3) or 1)
        if int(hi) < int(lo) or stride < 1:
            raise ValueError(f"bad range {part!r} in node list {whole!r}")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1, stride)]
    return out


def _expand_name(name: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        if "[" in name or "]" in name:
            raise ValueError(f"bad node list {whole!r}")
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    return [head + v + t for v in _expand_range(m.group(1), whole) for t in _expand_name(tail, whole)]


def expand_nodelist(text: str) -> list[str]:
    """Host names of a SLURM node list, in SLURM's order."""
    hosts: list[str] = []
    for item in _split_top(text):
        hosts += _expand_name(item, text)
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE``-style counts: ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out
