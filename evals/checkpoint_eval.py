"""Checkpoint evaluation suites on an exported model: ``lm`` (perplexity, bits per byte and
the length-extrapolation curve on a text file), ``passkey``, ``kv_lookup``, ``fewshot``;
``checkpoint`` runs them all. Writes results.json, results.md and PNG plots.

Under several ranks every rank runs every part on its share of the part's items
(``evals.sharding``) and rank 0 writes the files."""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import incontext, lm
from .checkpoint import LoadedCheckpoint
from .report import heatmap, line_plot, write_json, write_text
from .sharding import Shard

PartResult = tuple[list[str], bool]  # Markdown lines, stopped by the time limit

CHECKPOINT_SUITES = {"lm": ["lm"], "passkey": ["passkey"], "kv_lookup": ["kv_lookup"], "fewshot": ["fewshot"],
                     "checkpoint": ["lm", "passkey", "kv_lookup", "fewshot"]}


@dataclass
class CheckpointEvalOptions:
    text: str | None = None
    heldout: str | None = None  # "run" (the run's validation split) or a prepared dataset dir
    heldout_batches: int = 50
    context: int | None = None  # default: the run's data.seq_len, else 512
    extrapolation_factor: int = 8
    max_tokens: int | None = 200_000
    passkey_lengths: list[int] | None = None  # default: context/2 .. factor*context
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5
    kv_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    fewshot_lengths: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    shots: int = 8
    seed: int = 0
    progress: bool = True


def expand(suite: str) -> list[str]:
    parts: list[str] = []
    for s in [x.strip() for x in suite.split(",") if x.strip()]:
        parts += [p for p in CHECKPOINT_SUITES[s] if p not in parts]
    return parts


def run_checkpoint_evals(ck: LoadedCheckpoint, parts: list[str], opts: CheckpointEvalOptions,
                         out: Path, deadline: float | None = None, shard: Shard = Shard()) -> dict[str, Any]:
    """Run the parts in order; results.json and results.md are rewritten (atomically) after
    each one, so a call killed from outside keeps the parts it finished. ``deadline``
    (``time.monotonic()``): a running part stops its loops at it (keeping what it scored,
    listed under ``stopped_by_time_limit``) and later parts are skipped (``not_started``)."""
    if "lm" in parts and not (opts.text or opts.heldout):
        if not ((ck.run_config or {}).get("data") or {}).get("sources"):
            raise ValueError("suite 'lm' needs --text FILE and/or --heldout run|DATASET_DIR (this export "
                             "has no run config whose validation split --heldout run could score)")
        opts = dataclasses.replace(opts, heldout="run")
        if shard.leader:
            print("linrnn-eval: suite 'lm' scores the run's own validation split (--heldout run); pass --text "
                  "or --heldout DATASET_DIR to score other data", file=sys.stderr)
    if "passkey" in parts and opts.passkey_lengths:  # before any part runs
        floor = incontext.passkey_floor(ck.tokenizer, ck.bos)
        if min(opts.passkey_lengths) < floor:
            raise ValueError(f"--passkey-lengths {min(opts.passkey_lengths)} is too short: with this tokenizer the "
                             f"prompt without filler (intro, needle, question) takes {floor} tokens; use lengths "
                             f">= {floor}")
    if shard.leader:
        out.mkdir(parents=True, exist_ok=True)
    context = opts.context or ck.train_context or 512
    start = time.time()
    weight = next(ck.model.parameters())
    where = {"device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
             "torch": torch.__version__}
    res: dict[str, Any] = {"kind": "checkpoint_eval", "checkpoint": str(ck.path), "meta": ck.meta,
                           "train_context": context, "ranks": shard.world, **where, "complete": False,
                           "not_started": [], "stopped_by_time_limit": [], "results": {}}
    head = [f"# Checkpoint evaluation: {ck.path}", "", f"- training context: {context} tokens",
            f"- step: {ck.meta.get('step', 'unknown')}",
            f"- {ck.bos_note()}",
            f"- ranks: {shard.world} on {where['device']} ({where['dtype']}), torch {where['torch']}", ""]
    sections: list[str] = []

    def save(complete: bool) -> None:
        if not shard.leader:
            return
        res["complete"], res["wall_time_s"] = complete, round(time.time() - start, 1)
        skipped = [f"Stopped by the time limit (partial results, '—' not scored): "
                   f"{', '.join(res['stopped_by_time_limit'])}.", ""] if res["stopped_by_time_limit"] else []
        if res["not_started"]:
            skipped += [f"Not started (time limit): {', '.join(res['not_started'])}.", ""]
        write_json(out / "results.json", res)
        write_text(out / "results.md", "\n".join(head + skipped + sections) + "\n")

    for i, part in enumerate(parts):
        if shard.time_is_up(deadline):
            res["not_started"] = parts[i:]
            break
        md, stopped = PARTS[part](ck, opts, context, out, res["results"], deadline, shard)
        sections += md
        if stopped:
            res["stopped_by_time_limit"].append(part)
        save(complete=False)
    save(complete=True)
    return res


def _lm_part(ck: LoadedCheckpoint, opts: CheckpointEvalOptions, context: int, out: Path,
             r: dict[str, Any], deadline: float | None, shard: Shard) -> PartResult:
    md: list[str] = []
    stopped = False
    if opts.heldout:
        dcfg = lm.heldout_data_config(opts.heldout, ck.run_config)
        held = lm.heldout_perplexity(ck.model, ck.tokenizer, dcfg, opts.heldout_batches, progress=opts.progress,
                                     deadline=deadline, shard=shard)
        stopped = held.stopped_by_time_limit
        r["heldout"] = {"data": opts.heldout, "split": dcfg.val_split, **held.to_dict()}
        md += ["## Held-out shards", "", "| data | split | tokens | perplexity | bits/byte |", "|---|---|---|---|---|",
               f"| {opts.heldout} | {dcfg.val_split} | {held.tokens} | {held.perplexity:.3f} | "
               f"{held.bits_per_byte:.4f} |", ""]
    if opts.text and shard.time_is_up(deadline):  # the held-out shards used the time up
        return md + ["## Language modelling", "", "Text file: not started (time limit).", ""], True
    if opts.text:
        text_md, text_stopped = _text_lm(ck, opts, context, out, r, deadline, shard)
        md, stopped = md + text_md, stopped or text_stopped
    return md, stopped


def _text_lm(ck: LoadedCheckpoint, opts: CheckpointEvalOptions, context: int, out: Path,
             r: dict[str, Any], deadline: float | None, shard: Shard) -> PartResult:
    """Perplexity and bits per byte of the text file, then the length-extrapolation curve."""
    tok = ck.tokenizer
    stream, n_bytes = lm.encode_text(tok, lm.read_text(opts.text), opts.max_tokens, bos=ck.bos)
    ppl = lm.perplexity(ck.model, stream, n_bytes, context, progress=opts.progress, deadline=deadline,
                        prefix_bytes=lambda n: len(tok.decode(stream[1:1 + n].tolist()).encode("utf-8")),
                        shard=shard)
    r["lm"] = {"text": opts.text, **ppl.to_dict()}
    md = ["## Language modelling", "", "| text | tokens | context | perplexity | bits/byte |", "|---|---|---|---|---|",
          f"| {opts.text} | {ppl.tokens} | {ppl.context} | {ppl.perplexity:.3f} | {ppl.bits_per_byte:.4f} |", ""]
    if shard.time_is_up(deadline):
        return md + ["Length extrapolation: not started (time limit).", ""], True
    ext = lm.length_extrapolation(ck.model, stream, context, opts.extrapolation_factor, deadline=deadline,
                                  shard=shard)
    r["length_extrapolation"] = ext.to_dict()
    if shard.leader:
        line_plot(out / "length_extrapolation.png", ext.bucket_starts, {"loss": ext.bucket_loss},
                  "position (tokens)", "loss (nats)", "loss by position", vline=(context, "training context"))
    md += [f"Length extrapolation: {ext.windows} windows of {ext.length} tokens; loss by position in "
           f"`length_extrapolation.png`.", ""]
    return md, ppl.stopped_by_time_limit or ext.stopped_by_time_limit


def passkey_lengths(ck: LoadedCheckpoint, context: int, factor: int) -> list[int]:
    """The default lengths: half the context to ``factor`` times it, none shorter than the
    prompt without filler (a short context with a small vocabulary)."""
    floor = incontext.passkey_floor(ck.tokenizer, ck.bos)
    return sorted({max(64, context // 2, floor), *(max(floor, context * f) for f in (1, 2, 4, 8) if f <= factor)})


def _passkey_part(ck: LoadedCheckpoint, opts: CheckpointEvalOptions, context: int, out: Path,
                  r: dict[str, Any], deadline: float | None, shard: Shard) -> PartResult:
    lengths = opts.passkey_lengths or passkey_lengths(ck, context, opts.extrapolation_factor)
    pk = incontext.passkey(ck.model, ck.tokenizer, lengths, opts.depths, opts.trials, opts.seed, opts.progress,
                           deadline=deadline, shard=shard, bos=ck.bos)
    r["passkey"] = pk.to_dict()
    md = ["## Passkey retrieval", "", "| depth \\ length | " + " | ".join(map(str, lengths)) + " |",
          "|---|" + "---|" * len(lengths)]
    md += [f"| {d:.2f} | " + " | ".join(map(_cell, row)) + " |" for d, row in zip(pk.depths, pk.accuracy)]
    if shard.leader:
        heatmap(out / "passkey.png", pk.accuracy, [f"{d:.2f}" for d in pk.depths], [str(L) for L in lengths],
                "context length (tokens)", "needle depth", "passkey retrieval accuracy")
    return md + [""], pk.stopped_by_time_limit


def _kv_lookup_part(ck: LoadedCheckpoint, opts: CheckpointEvalOptions, context: int, out: Path,
                    r: dict[str, Any], deadline: float | None, shard: Shard) -> PartResult:
    kv = incontext.kv_lookup(ck.model, ck.tokenizer, opts.kv_pairs, max(opts.trials, 10), opts.seed, opts.progress,
                             deadline=deadline, shard=shard, bos=ck.bos)
    r["kv_lookup"] = kv
    if shard.leader:
        line_plot(out / "kv_lookup.png", kv["pairs"], {"accuracy": kv["accuracy"], "chance": kv["chance"]},
                  "key-value pairs", "accuracy", "in-context key-value lookup", logx=True)
    return (["## In-context key-value lookup", "", *_accuracy_table("pairs", kv["pairs"], kv["accuracy"])],
            kv["stopped_by_time_limit"])


def _fewshot_part(ck: LoadedCheckpoint, opts: CheckpointEvalOptions, context: int, out: Path,
                  r: dict[str, Any], deadline: float | None, shard: Shard) -> PartResult:
    md: list[str] = []
    series = {}
    stopped = False
    for task in ("parity", "modular_arithmetic"):
        if stopped:  # the time ran out in the previous task
            md += [f"## Few-shot {task}", "", "Not started (time limit).", ""]
            continue
        fs = incontext.fewshot(ck.model, ck.tokenizer, task, opts.fewshot_lengths, opts.shots,
                               max(opts.trials, 10), opts.seed, opts.progress, deadline=deadline, shard=shard,
                               bos=ck.bos)
        r[f"fewshot_{task}"] = fs
        stopped = fs["stopped_by_time_limit"] or shard.time_is_up(deadline)
        series[f"{task} (chance {fs['chance']:.2f})"] = fs["accuracy"]
        md += [f"## Few-shot {task} ({opts.shots} shots)", "",
               *_accuracy_table("length", fs["lengths"], fs["accuracy"])]
    if shard.leader:
        line_plot(out / "fewshot.png", opts.fewshot_lengths, series, "length", "accuracy", "few-shot state tracking")
    return md, stopped


def _cell(a: float | None) -> str:
    return "—" if a is None else f"{a:.2f}"


def _accuracy_table(name: str, columns: list, accuracy: list[float | None]) -> list[str]:
    """A one-row Markdown table: accuracy under each column value (pairs, lengths); '—' not scored."""
    return [f"| {name} | " + " | ".join(map(str, columns)) + " |", "|---|" + "---|" * len(columns),
            "| accuracy | " + " | ".join(map(_cell, accuracy)) + " |", ""]


PARTS = {"lm": _lm_part, "passkey": _passkey_part, "kv_lookup": _kv_lookup_part, "fewshot": _fewshot_part}
