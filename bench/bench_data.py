"""Data pipeline throughput on the demo corpus: tokenization, prepare, loader.

    python -m bench.bench_data [--vocab-size 8192] [--seq-len 2048] [--workers 2]

Prints (1) tokenization tokens/s: raw sentencepiece on one core, our worker code in one
process, and the worker pool with 1..N processes (total and per worker, with the ratio
to raw sentencepiece); (2) prepare throughput (documents, tokens and input MB per second,
end to end including shard writing); (3) steady-state loader tokens/s per rank for one rank
and for each of two simulated ranks, with 0 and N DataLoader workers. Targets from issue 5:
tokenization per worker >= 80% of raw sentencepiece per core; loader >= 1M tokens/s per
rank (20x what one H100 consumes training a 1.3B model, about 50K tokens/s).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}"


def _best(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs (seconds): the least disturbed by other load on the box."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_tokenization(tok, texts: list[str], max_workers: int, repeats: int) -> None:
    from data.prepare import tokenizer_pool
    from data.tokenizer import encode_documents_flat, encode_task

    mb = sum(map(len, texts)) / 1e6
    print(f"\n== tokenization (demo corpus, {len(texts)} documents, {mb:.1f} MB; best of {repeats})")
    n_tokens = sum(map(len, tok.sp.encode(texts, num_threads=1))) + len(texts)  # + EOS each
    raw_s = _best(lambda: tok.sp.encode(texts, num_threads=1), repeats)
    raw_rate = n_tokens / raw_s
    print(f"raw sentencepiece, 1 thread      : {_rate(n_tokens, raw_s):>12} tokens/s")
    s = _best(lambda: encode_documents_flat(tok, texts, add_bos=False), repeats)
    print(f"worker code in-process (1 core)  : {_rate(n_tokens, s):>12} tokens/s  ({raw_s / s:.0%} of raw)")
    chunks = [(None, texts[i:i + 64], False) for i in range(0, len(texts), 64)]
    for w in range(1, max_workers + 1):
        with tokenizer_pool(tok, w) as pool:
            pool.map(encode_task, chunks[: w * 2])  # warm up
            got = sum(len(r[1]) for r in pool.imap(encode_task, chunks))
            assert got == n_tokens
            s = _best(lambda: list(pool.imap(encode_task, chunks)), repeats)
        print(f"pool, {w} worker(s)                : {_rate(got, s):>12} tokens/s total, "
              f"{_rate(got / w, s)} per worker ({got / w / s / raw_rate:.0%} of raw per core)")


def bench_prepare(corpus: Path, tokenizer: Path, out: Path, seq_len: int, workers: int) -> Path:
    from data.config import CorpusConfig, PrepareConfig
    from data.prepare import prepare_dataset

    print(f"\n== prepare (seq_len {seq_len}, {workers} tokenizer workers, end to end)")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    m = prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=str(corpus)), tokenizer=str(tokenizer),
                                      out=str(out), seq_len=seq_len, val_fraction=0.01, num_workers=workers),
                        progress=False)
    s = time.perf_counter() - t
    toks = sum(v["document_tokens"] for v in m["splits"].values())
    docs = sum(v["documents"] for v in m["splits"].values())
    mb = os.path.getsize(corpus) / 1e6
    print(f"prepare_dataset wall {s:.2f} s   : {_rate(toks, s):>12} tokens/s, {_rate(docs, s)} docs/s, "
          f"{mb / s:.2f} MB/s of jsonl")
    print(f"  (inside the pipeline, excluding start-up: {m['tokens_per_s']:,.0f} tokens/s)")
    print(f"  train sequences: {m['splits']['train']['sequences']}, dtype {m['dtype']}")
    return out


def _loader_rate(cfg, batch: int, rank: int | None, world: int | None, workers: int) -> float:
    """Steady-state tokens/s of one rank: timed from its first batch to the end of the epoch."""
    from data.loader import TokenLoader

    with TokenLoader(cfg, batch, rank=rank, world_size=world, num_workers=workers) as ld:
        for _ in ld:  # warm-up epoch: copies shards into the job cache
            pass
        tokens, t = 0, None
        for b in ld:
            if t is None:  # workers started and first batch arrived
                t = time.perf_counter()
                continue
            tokens += b["input_ids"].numel()
        return tokens / (time.perf_counter() - t)


def bench_loader(data_dir: Path, seq_len: int, batch: int, workers: int, cache: Path, samples: int) -> None:
    from data.config import DataConfig, DataSource

    print(f"\n== loader (seq_len {seq_len}, batch {batch} per rank, shuffled, epoch upsampled to "
          f"{samples} sequences)")
    for w in sorted({0, workers}):
        cfg = DataConfig(sources=[DataSource(path=str(data_dir))], seq_len=seq_len, cache_root=str(cache),
                         job_id=f"bench{w}", num_workers=w, epoch_size=samples)
        one = _loader_rate(cfg, batch, None, None, w)
        two = [_loader_rate(cfg, batch, r, 2, w) for r in (0, 1)]
        print(f"{w} DataLoader workers: 1 rank {one:,.0f} tokens/s; 2 simulated ranks (run in turn) "
              + ", ".join(f"rank {r} {x:,.0f}" for r, x in enumerate(two)) + " tokens/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="tokenization: best of this many runs")
    p.add_argument("--loader-samples", type=int, default=4000, help="sequences per timed loader epoch")
    p.add_argument("--work-dir", default=None, help="default: a temp dir, removed afterwards")
    a = p.parse_args(argv)

    from data.config import CorpusConfig
    from data.corpus import iter_documents
    from data.demo_corpus import fetch_demo_corpus
    from data.tokenizer import Tokenizer, train_tokenizer

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="linrnn-bench-data-"))
    try:
        print(json.dumps({"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                          "start_method": mp.get_start_method(), "vocab_size": a.vocab_size,
                          "seq_len": a.seq_len}))
        corpus = fetch_demo_corpus()
        texts = list(iter_documents(CorpusConfig(source=str(corpus))))
        t = time.perf_counter()
        tok_path = train_tokenizer(texts, work / "tok", vocab_size=a.vocab_size, train_chars=10_000_000)
        print(f"trained a {a.vocab_size}-piece BPE tokenizer in {time.perf_counter() - t:.1f} s")
        tok = Tokenizer.load(tok_path)
        bench_tokenization(tok, texts, a.workers, a.repeats)
        data_dir = bench_prepare(corpus, tok_path, work / "data", a.seq_len, a.workers)
        bench_loader(data_dir, a.seq_len, a.batch, a.workers, work / "cache", a.loader_samples)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
