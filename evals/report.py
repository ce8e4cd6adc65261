"""Write results: ``results.json`` (everything), ``results.md`` (tables), PNG plots.

The Markdown table puts every variant of a task side by side with the columns the
literature reports: accuracy at the longest trained length, at the longest tested length,
and the longest length at which whole sequences are right. Every file is written atomically
(temp + rename), so results rewritten after each run survive a kill at any moment.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write (temp + rename) so a crash never leaves half a result."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable))


def write_text(path: Path, text: str) -> None:
    """Atomic text write: readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (set, tuple)):
        return list(v)
    return str(v)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _metric_name(task: str, is_mqar: bool) -> str:
    """What the table and plot show for ``task``: per-query accuracy (MQAR), the cumulative
    sequence accuracy of tasks labelled at every prefix, else the final answer's accuracy."""
    if is_mqar:
        return "per-query accuracy"
    from .tasks import make_task

    try:
        prefix_scored = make_task(task).prefix_scored
    except ValueError:  # a task name this version does not know: the common case
        prefix_scored = True
    return "cumulative sequence accuracy" if prefix_scored else "accuracy of the final answer"


def benchmark_markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = ["# Architecture benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        conds = trows[0]["by_condition"]
        is_mqar = any(c["pairs"] for c in conds)
        names = [f"{c['length']}/{c['pairs']}" if is_mqar else str(c["length"]) for c in conds]
        metric = "token_acc" if is_mqar else "seq_acc"
        what = _metric_name(task, is_mqar)
        lines += ["", f"## {task}", "",
                  f"{what[0].upper() + what[1:]} (%) {'at seq_len/pairs' if is_mqar else 'by length'}; "
                  f"trained up to length {trows[0]['train_max']}; best learning rate of the sweep, mean over seeds.", ""]
        cols = ["model", "params", "lr", "converged", "steps", "val acc", "longest solved", *names]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in trows:
            solved = str(r["longest_solved"]) if r["longest_solved"] == r["longest_solved_max"] \
                else f"{r['longest_solved']}-{r['longest_solved_max']}"
            converged = f"{r['converged']}/{len(r['seeds'])}"
            if r.get("stopped_by_time_limit"):
                converged += f" ({r['stopped_by_time_limit']} stopped by time limit)"
            cells = [r["variant"], _count(r["params"]), f"{r['lr']:g}", converged, f"{r['steps']:.0f}",
                     _pct(r["val_acc"]), solved,
                     *(_pct(c[metric]) for c in r["by_condition"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def benchmark_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per task: accuracy against length (or seq_len/pairs) for every variant."""
    paths = []
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        is_mqar = any(c["pairs"] for c in trows[0]["by_condition"])
        for r in trows:
            if is_mqar:
                xs = list(range(len(r["by_condition"])))
                ax.plot(xs, [c["token_acc"] for c in r["by_condition"]], marker="o", label=r["variant"])
                ax.set_xticks(xs, [f"{c['length']}/{c['pairs']}" for c in r["by_condition"]], rotation=30)
            elif r["curve"]:
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["variant"])
            else:
                ax.plot([c["length"] for c in r["by_condition"]], [c["seq_acc"] for c in r["by_condition"]],
                        marker="o", label=r["variant"])
        if not is_mqar:
            ax.axvline(trows[0]["train_max"], color="grey", linestyle=":", label="longest trained")
        ax.set_xlabel("seq_len / pairs" if is_mqar else "sequence length")
        ax.set_ylabel(_metric_name(task, is_mqar))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def line_plot(path: Path, xs: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str,
              title: str, logx: bool = False, vline: tuple[float, str] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, ys in series.items():  # None (not scored) leaves a gap
        ax.plot(xs[: len(ys)], [math.nan if y is None else y for y in ys], marker="o", label=name)
    if vline is not None:
        ax.axvline(vline[0], color="grey", linestyle=":", label=vline[1])
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1 or vline is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap(path: Path, matrix: list[list[float | None]], rows: list[str], cols: list[str], xlabel: str,
            ylabel: str, title: str) -> Path:
    """None cells (not scored) are blank and marked '—'."""
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(cols), 1 + 0.5 * len(rows)))
    values = [[math.nan if v is None else v for v in row] for row in matrix]
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            color = "grey" if v is None else "white" if v < 0.6 else "black"  # None: a blank cell
            ax.text(j, i, "—" if v is None else f"{v:.2f}", ha="center", va="center", color=color, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
