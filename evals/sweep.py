"""Every evaluated checkpoint of a run side by side: how the scores moved during training.

    linrnn-eval-sweep RUN_DIR [--suite checkpoint] [--evaluate [-- linrnn-eval options]]

Reads ``<RUN_DIR>/exports/step_*/eval/<suite>/results.json`` (what ``slurm/eval_sweep.sh``'s
array tasks write; ``eval_sweep.sh`` also runs this once they are done) and writes
``<RUN_DIR>/exports/sweep-<suite>.{json,md,png}`` (several suites joined by ``+``): one row per checkpoint (step, tokens seen)
with each checkpoint eval's headline numbers (``headline``), and one panel per number
against tokens seen. A checkpoint whose evaluation is missing or stopped early is listed
as such, so a table never hides a gap. Without SLURM, ``--evaluate`` first exports and
evaluates here every complete checkpoint that has no complete evaluation yet, on all the
GPUs of a box under ``python -m launch --nproc N`` (rank 0 exports, every rank scores its
share of each evaluation, rank 0 writes).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from pretrain.export import EXPORTS_DIR

from .report import write_json, write_text
from .sharding import Shard, shard_from_env


def _mean(values: list[Any]) -> float | None:
    flat = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(flat) / len(flat) if flat else None


def headline(results: dict[str, Any]) -> dict[str, float | None]:
    """The numbers that summarise one checkpoint evaluation (``evals.checkpoint_eval`` results)."""
    out: dict[str, float | None] = {}
    for name, label in (("heldout", "held-out"), ("lm", "text")):
        if name in results:
            out[f"{label} perplexity"] = results[name].get("perplexity")
            out[f"{label} bits/byte"] = results[name].get("bits_per_byte")
    ext = results.get("length_extrapolation")
    if ext:
        pairs = list(zip(ext["bucket_starts"], ext["bucket_loss"]))
        out["loss within context"] = _mean([loss for start, loss in pairs if start < ext["train_context"]])
        out["loss past context"] = _mean([loss for start, loss in pairs if start >= ext["train_context"]])
    pk = results.get("passkey")
    if pk:
        out["passkey accuracy"] = _mean([a for row in pk["accuracy"] for a in row])
        out[f"passkey accuracy at {pk['lengths'][-1]}"] = _mean([row[-1] for row in pk["accuracy"]])
    if "kv_lookup" in results:
        out["kv lookup accuracy"] = _mean(results["kv_lookup"]["accuracy"])
    for name, part in sorted(results.items()):
        if name.startswith("fewshot_"):
            out[f"few-shot {part.get('task', name[8:])} accuracy"] = _mean(part["accuracy"])
    return out


# lm-evaluation-harness: the metric a task is summarised by, the first it reports of these
LM_EVAL_HEADLINE = ("acc_norm", "acc", "exact_match", "word_perplexity", "perplexity", "bits_per_byte")


def lm_eval_headline(results: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """One number per lm-evaluation-harness task (``evals.lm_eval_adapter.score`` results)."""
    out: dict[str, float | None] = {}
    for task, metrics in sorted(results.items()):
        named = {k.split(",")[0]: v for k, v in metrics.items() if "_stderr" not in k}
        for name in LM_EVAL_HEADLINE:
            if name in named:
                out[f"{task} {name}"] = named[name]
                break
    return out


def collect(run_dir: Path, suite: str) -> list[dict[str, Any]]:
    """One row per step directory that has an export or an evaluation, oldest first."""
    exports = run_dir / EXPORTS_DIR
    rows = []
    from pretrain.checkpoint import step_of

    for step_dir in sorted(exports.glob("step_*")) if exports.is_dir() else []:
        step = step_of(step_dir)
        if not step_dir.is_dir() or step is None:
            continue
        path = step_dir / "eval" / suite.replace(",", "+") / "results.json"  # as slurm/eval.sbatch names it
        row: dict[str, Any] = {"checkpoint": step_dir.name, "step": step}
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            rows.append({**row, "status": "not evaluated"})
            continue
        meta = res.get("meta") or {}
        status = evaluation_status(res)
        rows.append({**row, "step": meta.get("step", row["step"]), "tokens_seen": meta.get("tokens_seen"),
                     "status": status, "scores": (lm_eval_headline if res.get("kind") == "lm_eval" else headline)(
                         res.get("results") or {})})
    return rows


def evaluation_status(res: dict[str, Any]) -> str:
    """"complete"; "partial (time limit)" when the evaluation finished but its time limit
    stopped a part or left parts unstarted (rerunning it with the same limit stops again);
    "interrupted" when it never finished (killed, e.g. by its job's time limit)."""
    if not res.get("complete", True):
        return "interrupted"
    if res.get("stopped_by_time_limit") or res.get("not_started"):
        return "partial (time limit)"
    return "complete"


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(rows: list[dict[str, Any]], names: list[str], title: str) -> str:
    head = ["checkpoint", "tokens seen", "status", *names]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scores = r.get("scores") or {}
        cells = [r["checkpoint"], _cell(r.get("tokens_seen")), r["status"], *(_cell(scores.get(n)) for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict[str, Any]], names: list[str]) -> Path | None:
    """One panel per headline number against tokens seen (steps where tokens are unknown)."""
    scored = [r for r in rows if r.get("scores")]
    if not scored or not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_tokens = all(r.get("tokens_seen") is not None for r in scored)
    xs = [r["tokens_seen"] if by_tokens else r["step"] for r in scored]
    cols = min(3, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ys = [r["scores"].get(name) for r in scored]
        ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o")
        ax.set_title(name, fontsize=9)
        if "accuracy" in name:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("tokens seen" if by_tokens else "step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarise(run_dir: Path, suite: str) -> dict[str, Any]:
    rows = collect(run_dir, suite)
    if not rows:
        raise ValueError(_nothing_to_summarise(run_dir))
    names: list[str] = []
    for r in rows:
        names += [n for n in r.get("scores") or {} if n not in names]
    out = run_dir / EXPORTS_DIR / f"sweep-{suite.replace(',', '+')}"
    summary = {"run": str(run_dir), "suite": suite, "metrics": names, "checkpoints": rows}
    write_json(out.with_suffix(".json"), summary)
    write_text(out.with_suffix(".md"), markdown(rows, names, f"{run_dir.name}: suite {suite} by checkpoint"))
    plot(out.with_suffix(".png"), rows, names)
    return summary


def _nothing_to_summarise(run_dir: Path) -> str:
    """Why a run directory gave no rows, and what to run: its checkpoints are not exported yet,
    or it is not a run's checkpoint.dir at all."""
    from launch.checkpoints import complete_checkpoints

    if not complete_checkpoints(run_dir):
        return (f"{str(run_dir)!r} has neither exports/step_* directories nor complete checkpoints (step_*): "
                "pass a run's checkpoint.dir")
    return (f"{str(run_dir)!r} has no exports/step_* directories: evaluate its checkpoints first, here with "
            "--evaluate (exports and scores every complete checkpoint; options for linrnn-eval after --), or "
            "on SLURM with slurm/eval_sweep.sh RUN_DIR (or slurm/eval.sbatch per checkpoint)")


def check_arguments(run_dir: Path, suite: str) -> None:
    """Refuse a missing run directory or an unknown suite before anything is evaluated or
    written (a typo would otherwise summarise every checkpoint as "not evaluated")."""
    from .cli import suite_names

    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise ValueError(f"run directory {str(run_dir)!r} {what}: pass a run's checkpoint.dir")
    suite_names(suite.replace("+", ","))  # as the result folders name several suites


def evaluate_missing(run_dir: Path, suite: str, eval_args: list[str], shard: Shard = Shard()) -> list[str]:
    """Export and evaluate, one after another in this process, every complete checkpoint of
    the run without a complete evaluation (what ``slurm/eval_sweep.sh`` does as a job array);
    returns the checkpoints evaluated. A checkpoint whose evaluation fails is reported and
    the others go on (the summary lists it as not evaluated). Under several ranks, rank 0
    exports and decides, and every rank takes its share of each evaluation."""
    from launch.checkpoints import complete_checkpoints

    from .cli import main as eval_main

    done = []
    steps = shard.leader_says([str(s) for s in complete_checkpoints(run_dir)] if shard.leader else None)
    for step in map(Path, steps):
        export = run_dir / EXPORTS_DIR / step.name
        out = export / "eval" / suite.replace(",", "+")
        if not shard.leader_says(_needs_evaluation(step, export, out) if shard.leader else None):
            continue
        if shard.leader:
            print(f"linrnn-eval-sweep: evaluating {step.name} (suite {suite})", file=sys.stderr)
        if eval_main([str(export), "--suite", suite, "--out", str(out), *eval_args]) == 0:
            done.append(step.name)
        else:
            print(f"linrnn-eval-sweep: the evaluation of {step.name} failed (see above)", file=sys.stderr)
    return done


def _needs_evaluation(step: Path, export: Path, out: Path) -> bool:
    """Export ``step`` unless its export is current; whether it still lacks a complete evaluation."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.export import export_checkpoint, export_is_current

    try:
        if not export_is_current(step, export):  # none yet, or of an earlier save of this step
            print(f"linrnn-eval-sweep: exporting {step} -> {export}", file=sys.stderr)
            export_checkpoint(step, export)  # drops the evaluations of a replaced export
    except CheckpointError as e:  # pruned by a running training job meanwhile, say
        print(f"linrnn-eval-sweep: {step.name} skipped: {e}", file=sys.stderr)
        return False
    try:
        return not json.loads((out / "results.json").read_text()).get("complete", True)
    except (OSError, json.JSONDecodeError):
        return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    eval_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="linrnn-eval-sweep", description=__doc__.split("\n\n")[0],
                                epilog="Options after -- go to linrnn-eval (with --evaluate).")
    p.add_argument("run_dir", help="a run's checkpoint.dir (its exports/ holds the evaluated checkpoints)")
    p.add_argument("--suite", default="checkpoint", help="the checkpoint suite evaluated (default: checkpoint)")
    p.add_argument("--evaluate", action="store_true",
                   help="first export and evaluate here, one by one, every complete checkpoint not yet evaluated")
    args = p.parse_args(argv)
    try:
        check_arguments(Path(args.run_dir), args.suite)
        shard = shard_from_env() if args.evaluate else Shard()
        if args.evaluate:
            evaluate_missing(Path(args.run_dir), args.suite, eval_args, shard)
        if not shard.leader:  # rank 0 writes the summary
            return 0
        summary = summarise(Path(args.run_dir), args.suite)
    except ValueError as e:
        print(f"linrnn-eval-sweep: error: {e}", file=sys.stderr)
        return 2
    md = Path(args.run_dir) / EXPORTS_DIR / f"sweep-{args.suite.replace(',', '+')}.md"
    print(md.read_text())
    missing = [r["checkpoint"] for r in summary["checkpoints"] if r["status"] != "complete"]
    if missing:
        print(f"note: {len(missing)} checkpoint(s) without a complete evaluation: {', '.join(missing)}",
              file=sys.stderr)
    print(f"wrote {md} (+ .json, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
