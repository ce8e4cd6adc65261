"""``linrnn-eval``: benchmark an architecture on synthetic tasks, or evaluate a checkpoint.

    linrnn-eval gated_deltaproduct-tiny --suite state_tracking --out runs/eval/gdp
    linrnn-eval gated_deltanet-tiny --suite parity --neg-eigval both --seeds 0,1,2 --out out/
    linrnn-eval mamba2-tiny --suite mqar -o d_model=64 -o n_layers=2 --lr 1e-3,3e-3 --out out/

    linrnn-eval runs/export --suite checkpoint --text heldout.txt --out out/
    linrnn-eval runs/export --suite lm_eval:lambada_openai,hellaswag --out out/

The model is a preset name, a model YAML, or an exported checkpoint directory (whose
config is used for the architecture benchmarks; the checkpoint suites lm, passkey,
kv_lookup, fewshot and checkpoint (all four) evaluate its weights). Results: ``results.json``,
``results.md`` and one PNG per task in ``--out``. Runs can be split over ranks
(``RANK``/``WORLD_SIZE``, e.g. under torchrun or srun): each rank trains its share and
rank 0 writes the report. The checkpoint suites split each part's items (prompts, windows,
batches) over the ranks and gather the scores: the same results as one rank, sooner.

``--time-limit SECONDS`` bounds the whole call: each run gets an equal share of the time
left, stops training early so it can still be scored, and is marked "stopped by time
limit"; runs with no time left are not started. The checkpoint suites check the limit
inside their parts' loops (lm, passkey, kv_lookup, fewshot): a running part keeps what it
scored (listed under ``stopped_by_time_limit``), later parts are skipped and listed under
``not_started``. The result files are rewritten atomically after every run
or part, so a call killed from outside keeps what it finished.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain import export

from . import suites
from .bench import Job, ModelSpecError, RunRecord, expand_variants, record_dict, run_jobs, summarise
from .checkpoint import CheckpointError, load_checkpoint
from .checkpoint_eval import CHECKPOINT_SUITES, CheckpointEvalOptions, expand, run_checkpoint_evals
from .report import benchmark_markdown, benchmark_plots, write_json, write_text
from .sharding import launched_rank, rank_device, shard_from_env
from .train import TrainConfig


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    low, high = int(lo), int(hi or lo)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length range LO:HI with 1 <= LO <= HI")
    return low, high


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        t, x, p = item.strip().lower().partition("x")
        if not (x and t.isdigit() and p.isdigit() and int(t) > 0 and int(p) > 0):
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not SEQ_LENxPAIRS (positive whole numbers), "
                                             "e.g. 64x4,128x8")
        out.append((int(t), int(p)))
    return out


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, e.g. 540, got {text!r}")
    return value


def _bools(text: str) -> list[bool] | None:
    return {"true": [True], "false": [False], "both": [True, False], "none": None}[text]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linrnn-eval", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"architecture suites: {', '.join(suites.SUITES)}; "
                                       f"checkpoint suites: {', '.join(CHECKPOINT_SUITES)}, and "
                                       "lm_eval:TASK,TASK (lm-evaluation-harness tasks)")
    p.add_argument("model", help="model preset name, model YAML, or exported checkpoint directory")
    p.add_argument("--suite", required=True, help="suite name(s), comma-separated")
    p.add_argument("--out", required=True, help="output directory for results.json, results.md, plots")
    g = p.add_argument_group("model variants")
    g.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override (repeatable), e.g. -o d_model=64 -o n_layers=2")
    g.add_argument("--neg-eigval", choices=["true", "false", "both", "none"], default="none",
                   help="eigenvalue range [-1,1] (true), [0,1] (false), both, or the preset's (none)")
    g.add_argument("--n-h", type=_ints, default=None, help="Householder counts to compare, e.g. 1,2,3")
    g = p.add_argument_group("training")
    g.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default 0)")
    g.add_argument("--lr", type=_floats, default=[1e-3], help="learning rates to sweep, e.g. 1e-4,1e-3,1e-2")
    g.add_argument("--steps", type=int, default=TrainConfig.steps)
    g.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    g.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    g.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    g.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    g.add_argument("--val-size", type=int, default=TrainConfig.val_size)
    g.add_argument("--target-acc", type=float, default=TrainConfig.target_acc,
                   help="stop training once validation accuracy reaches this")
    g.add_argument("--stop-metric", choices=["token", "sequence"], default="token")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    g.add_argument("--time-limit", type=_seconds, default=None, metavar="SECONDS",
                   help="wall-clock budget of the whole call (counted once the command has loaded): each "
                        "run gets an equal share of the time left and stops training early to still be "
                        "scored and saved (marked 'stopped by time limit'); runs with no time left are not "
                        "started. A run always trains one step, so the call may end up to one step and "
                        "one evaluation late. Checkpoint suites: a running part (lm, passkey, kv_lookup, fewshot) "
                        "stops its loop and keeps what it scored (at least one item: a passkey cell, a "
                        "perplexity batch); later parts are skipped and listed")
    g = p.add_argument_group("conditions")
    g.add_argument("--train-lengths", type=_range, default=None, help="state tracking: LO:HI, e.g. 3:40")
    g.add_argument("--test-lengths", type=_ints, default=None, help="state tracking: e.g. 40,128,256")
    g.add_argument("--mqar-vocab", type=int, default=None, help="MQAR vocabulary (default 8192)")
    g.add_argument("--mqar-train", type=_pairs, default=None, help="MQAR train grid, e.g. 64x4,128x8")
    g.add_argument("--mqar-test", type=_pairs, default=None, help="MQAR test grid, e.g. 256x16,512x64")
    g.add_argument("--eval-size", type=int, default=512, help="test sequences per condition")
    g.add_argument("--threshold", type=float, default=0.99,
                   help="sequence accuracy that counts a length as solved")
    g = p.add_argument_group("checkpoint suites")
    g.add_argument("--text", default=None, help="text file for perplexity, bits per byte, length curve")
    g.add_argument("--heldout", default=None, metavar="run|DATASET_DIR",
                   help="suite lm: also score prepared shards' validation split (run: the run's own data)")
    g.add_argument("--heldout-batches", type=int, default=50,
                   help="score this many batches of 8 held-out sequences, spread evenly over the split "
                        "(all of it when smaller)")
    g.add_argument("--context", type=int, default=None, help="training context (default: the run's data.seq_len)")
    g.add_argument("--extrapolation-factor", type=int, default=8, help="length curve up to this x context")
    g.add_argument("--max-tokens", type=int, default=200_000, help="score at most this many text tokens")
    g.add_argument("--passkey-lengths", type=_ints, default=None, help="prompt lengths in tokens")
    g.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    g.add_argument("--trials", type=int, default=5, help="prompts per passkey cell (>= 10 for the others)")
    g.add_argument("--kv-pairs", type=_ints, default=[4, 8, 16, 32], help="pairs for key-value lookup")
    g.add_argument("--fewshot-lengths", type=_ints, default=[2, 4, 8, 16], help="lengths for few-shot prompts")
    g.add_argument("--shots", type=int, default=8)
    g = p.add_argument_group("suite lm_eval:TASK,TASK (lm-evaluation-harness tasks on the export's weights)")
    g.add_argument("--lm-eval-batch-size", type=int, default=8, help="sequences per forward pass")
    g.add_argument("--lm-eval-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    g.add_argument("--lm-eval-limit", type=float, default=None,
                   help="documents per task (a fraction if < 1), for a quick look; results then are partial")
    g.add_argument("--lm-eval-include", default=None, metavar="DIR", help="a folder of extra task YAMLs")
    g.add_argument("--lm-eval-bootstrap", type=int, default=100000,
                   help="bootstrap iterations for the standard errors of some metrics (0: none, faster)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (small models on few cores: 1 is often fastest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


LM_EVAL_PREFIX = "lm_eval:"  # the suite that runs lm-evaluation-harness tasks: lm_eval:TASK,TASK
GATHER_GRACE_S = 120.0  # with --time-limit: how long past the deadline rank 0 waits for the other ranks
GATHER_POLL_S = 2.0


def run_benchmarks(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    if (Path(args.model) / export.WEIGHTS).is_file():  # an export: only its config.yaml is used
        print(f"linrnn-eval: note: suite {args.suite!r} trains new models with the architecture of {args.model} "
              f"(its config.yaml), not its trained weights; the checkpoint suites ({', '.join(CHECKPOINT_SUITES)}) "
              "score the weights", file=sys.stderr)
    deadline = start + args.time_limit if args.time_limit else None
    tasks = [suites.customise(bt, train_lengths=args.train_lengths, test_lengths=args.test_lengths,
                              mqar_vocab=args.mqar_vocab, mqar_train=args.mqar_train, mqar_test=args.mqar_test)
             for bt in suites.suite_tasks(args.suite)]
    variants = expand_variants(args.model, args.override, _bools(args.neg_eigval), args.n_h)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, weight_decay=args.weight_decay,
                      warmup=args.warmup, eval_every=args.eval_every, val_size=args.val_size,
                      target_acc=args.target_acc, stop_metric=args.stop_metric, device=device)
    jobs = [Job(bt, v, lr, s) for bt in tasks for v in variants for lr in args.lr for s in args.seeds]
    rank, world = launched_rank()
    cfg.device = device = rank_device(device)  # one GPU per rank on a node
    report = _Report(args, Path(args.out), device, world, start, len(jobs))
    mine = [job for i, job in enumerate(jobs) if i % world == rank]
    if world == 1:
        done: list[dict] = []
        _, skipped = run_jobs(mine, cfg, eval_size=args.eval_size, threshold=args.threshold,
                              progress=not args.no_progress, deadline=deadline,
                              on_record=lambda r: report.write(_add(done, r, len(jobs)), [], complete=False))
        return report.write(done, [j.describe() for j in skipped], complete=True)
    return _run_rank(args, report, mine, cfg, rank, world, deadline)


def _add(done: list[dict], record: RunRecord, total: int) -> list[dict]:
    """Keep a finished run's record and say so on stdout (logs of long calls show progress)."""
    done.append(record_dict(record))
    tr = record.train
    note = ", stopped by time limit" if tr["stopped_by_time_limit"] else ""
    print(f"run {len(done)}/{total} done: {record.task} | {record.variant} | lr {record.lr:g} | seed {record.seed}: "
          f"{tr['steps']} steps, val acc {tr['best_val_acc']:.3f}{note}", flush=True)
    return done


def _run_rank(args: argparse.Namespace, report: _Report, mine: list[Job], cfg: TrainConfig, rank: int,
              world: int, deadline: float | None) -> dict:
    """This rank's share of the runs; its record file is rewritten after each run, and rank 0
    merges every rank's file into the report whenever one grows."""
    fingerprint = _fingerprint(args)
    paths = [report.out / f"records.rank{r}-of-{world}.json" for r in range(world)]
    done: list[dict] = []

    def save(not_started: list[dict], complete: bool) -> None:
        write_json(paths[rank], {"fingerprint": fingerprint, "complete": complete, "records": done,
                                 "not_started": not_started})
        if rank == 0 and not complete:
            report.write(*_merge([_read_rank(p, fingerprint) for p in paths]), complete=False)

    def on_record(rec: RunRecord) -> None:
        _add(done, rec, len(mine))
        save([], complete=False)

    _, skipped = run_jobs(mine, cfg, eval_size=args.eval_size, threshold=args.threshold,
                          progress=not args.no_progress, deadline=deadline, on_record=on_record)
    save([j.describe() for j in skipped], complete=True)
    if rank != 0:
        return {}
    wait_until = time.monotonic() + 24 * 3600 if deadline is None else deadline + GATHER_GRACE_S
    parts = _gather(paths, fingerprint, lambda ps: report.write(*_merge(ps), complete=False), wait_until)
    missing = [r for r, p in enumerate(parts) if not (p and p["complete"])]
    if missing:
        print(f"linrnn-eval: warning: ranks {missing} did not finish; results.json holds the runs they "
              f"reported", file=sys.stderr)
    return report.write(*_merge(parts), complete=not missing, missing_ranks=missing)


# Set once per launch by the launchers we run under (srun, torchrun): with them in the
# fingerprint, a rerun of the same command into the same --out never merges the rank files
# an earlier launch left there.
LAUNCH_ID_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")


def _fingerprint(args: argparse.Namespace) -> str:
    """Ties rank files to this command line and this launch."""
    launch = {k: os.environ.get(k) for k in LAUNCH_ID_VARS}
    blob = json.dumps({"args": vars(args), "launch": launch}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_rank(path: Path, fingerprint: str) -> dict | None:
    """A rank's record file if it belongs to this command line (files are replaced atomically)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("fingerprint") == fingerprint else None


def _merge(parts: list[dict | None]) -> tuple[list[dict], list[dict]]:
    """Every rank's finished records and not-started runs, in rank order."""
    return ([rec for p in parts if p for rec in p["records"]],
            [job for p in parts if p for job in p.get("not_started", [])])


def _gather(paths: list[Path], fingerprint: str, on_change: Callable[[list[dict | None]], None],
            wait_until: float) -> list[dict | None]:
    """Rank 0 waits until every rank's file says complete (ranks finish at different times) or
    ``wait_until``; ``on_change`` sees the files whenever one has grown. None: never reported."""
    seen = None
    while True:
        parts = [_read_rank(p, fingerprint) for p in paths]
        if all(p and p["complete"] for p in parts) or time.monotonic() > wait_until:
            return parts
        state = [(len(p["records"]), p["complete"]) if p else None for p in parts]
        if state != seen:
            on_change(parts)
            seen = state
        time.sleep(GATHER_POLL_S)


class _Report:
    """``results.json``, ``results.md`` and the plots of this call, rewritten as runs finish."""

    def __init__(self, args: argparse.Namespace, out: Path, device: str, world: int, start: float,
                 n_runs: int) -> None:
        self.args, self.out, self.device, self.world, self.start, self.n_runs = args, out, device, world, start, n_runs
        self.plotted: dict[str, str] = {}  # task -> its rows as last plotted

    def write(self, records: list[dict], not_started: list[dict], *, complete: bool,
              missing_ranks: list[int] | None = None) -> dict[str, Any]:
        """Write every file atomically; ``complete`` is False while runs are still going."""
        a = self.args
        rows = summarise([RunRecord(**r) for r in records])
        header: dict[str, Any] = {
            "model": a.model, "suite": a.suite, "overrides": " ".join(a.override) or "none", "seeds": a.seeds,
            "learning rates": a.lr, "max steps": a.steps, "batch size": a.batch_size, "device": self.device,
            "torch": torch.__version__, "ranks": self.world, "time limit (s)": a.time_limit or "none",
            "runs finished": f"{len(records)} of {self.n_runs}" + ("" if complete else " (in progress)"),
        }
        stopped = sum(bool(r["train"].get("stopped_by_time_limit")) for r in records)
        if stopped:
            header["runs stopped by time limit"] = stopped
        if not_started:
            header["runs not started (time limit)"] = len(not_started)
        if missing_ranks:
            header["ranks that did not finish"] = missing_ranks
        header["wall time (s)"] = round(time.monotonic() - self.start, 1)
        result = {"kind": "architecture_benchmark", "complete": complete, "header": header, "summary": rows,
                  "runs": records, "not_started": not_started}
        write_json(self.out / "results.json", result)
        write_text(self.out / "results.md", benchmark_markdown(rows, header))
        self._plot(rows)
        return result

    def _plot(self, rows: list[dict]) -> None:
        """Redraw only the tasks whose rows changed (one plot per finished run, not all)."""
        by_task: dict[str, list[dict]] = {}
        for r in rows:
            by_task.setdefault(r["task"], []).append(r)
        changed = {t: json.dumps(rs, sort_keys=True, default=str) for t, rs in by_task.items()}
        changed = {t: key for t, key in changed.items() if self.plotted.get(t) != key}
        benchmark_plots([r for r in rows if r["task"] in changed], self.out)
        self.plotted.update(changed)


def run_checkpoint(args: argparse.Namespace) -> dict:
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    _refuse_preset(args)
    shard = shard_from_env()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ck = load_checkpoint(args.model, device=rank_device(device))
    opts = CheckpointEvalOptions(text=args.text, heldout=args.heldout, heldout_batches=args.heldout_batches,
                                 context=args.context, extrapolation_factor=args.extrapolation_factor,
                                 max_tokens=args.max_tokens, passkey_lengths=args.passkey_lengths, depths=args.depths,
                                 trials=args.trials, kv_pairs=args.kv_pairs, fewshot_lengths=args.fewshot_lengths,
                                 shots=args.shots, seed=args.seeds[0], progress=not args.no_progress)
    result = run_checkpoint_evals(ck, expand(args.suite), opts, Path(args.out), deadline, shard)
    return result if shard.leader else {}  # rank 0 reports


def run_lm_eval(args: argparse.Namespace) -> dict:
    """Suite ``lm_eval:TASK,TASK``: lm-evaluation-harness on the export (``evals.lm_eval_adapter.score``)."""
    tasks = [t.strip() for t in args.suite[len(LM_EVAL_PREFIX):].split(",") if t.strip()]  # one at least (suite_names)
    _refuse_preset(args)
    try:
        from .lm_eval_adapter import score
    except ImportError as e:
        raise ValueError(f"suite lm_eval needs lm-evaluation-harness: pip install 'lm_eval==0.4.13' ({e})") from None
    result = score(args.model, tasks, Path(args.out), device=None if args.device == "auto" else args.device,
                   batch_size=args.lm_eval_batch_size, num_fewshot=args.lm_eval_fewshot, limit=args.lm_eval_limit,
                   include_path=args.lm_eval_include, bootstrap_iters=args.lm_eval_bootstrap)
    return result or {}


def _refuse_preset(args: argparse.Namespace) -> None:
    """The checkpoint suites score trained weights: a preset name has none."""
    if not Path(args.model).exists() and "/" not in args.model and args.model in _presets():
        raise CheckpointError(f"suite {args.suite!r} evaluates trained weights: pass an exported checkpoint "
                              f"directory, not the preset {args.model!r}")


def _presets() -> list[str]:
    from pretrain.config_loader import list_model_presets

    return list_model_presets()


def suite_names(suite: str) -> list[str]:
    """The names in ``--suite`` (none for ``lm_eval:TASK,TASK``, whose tasks lm_eval checks),
    refused before any work when one is unknown (a typo would otherwise score nothing);
    ``linrnn-eval-sweep`` checks its ``--suite`` here too."""
    if suite.startswith(LM_EVAL_PREFIX):
        if not suite[len(LM_EVAL_PREFIX):].strip(", "):
            raise ValueError("suite lm_eval: name the tasks, e.g. --suite lm_eval:lambada_openai,hellaswag")
        return []
    names = [s.strip() for s in suite.split(",") if s.strip()]
    unknown = [n for n in names if n not in suites.SUITES and n not in CHECKPOINT_SUITES]
    if unknown or not names:
        all_suites = [*suites.SUITES, *CHECKPOINT_SUITES, f"{LM_EVAL_PREFIX}TASK,..."]
        close = difflib.get_close_matches(unknown[0] if unknown else "", all_suites, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown suite {(unknown or [suite])[0]!r}{hint}; suites: {', '.join(all_suites)}")
    return names


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any model is built."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        lm_eval = args.suite.startswith(LM_EVAL_PREFIX)  # its tasks are comma-separated too
        names = suite_names(args.suite)
        _check_device(args.device)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} exists and is not a directory: pass a directory for the results")
        ckpt_suites = [n for n in names if n in CHECKPOINT_SUITES]
        if ckpt_suites and len(ckpt_suites) != len(names):
            raise ValueError("run checkpoint suites and architecture benchmarks in separate calls "
                             "(they write the same result files)")
        if lm_eval:
            result = run_lm_eval(args)
        else:
            result = run_checkpoint(args) if ckpt_suites else run_benchmarks(args)
    except (ModelSpecError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"linrnn-eval: error: {e}", file=sys.stderr)
        return 2
    if result:
        print(f"wrote {Path(args.out) / 'results.md'}")
        print((Path(args.out) / "results.md").read_text())
    return 1 if result.get("complete") is False else 0


if __name__ == "__main__":
    sys.exit(main())
