"""The tiny end-to-end data set of ``make demo``: Shakespeare -> tokenizer -> shards.

Layout under ``out_dir``: ``corpus/shakespeare.jsonl`` is not copied (it stays in the
demo-corpus cache); ``tokenizer/tokenizer.model`` and ``data/`` (a prepared dataset) are
written here. Each step is skipped when its output already exists with the same settings,
so rerunning is cheap; other settings (vocab size, seq_len...) or a changed corpus file
rewrite the outputs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import CorpusConfig, PrepareConfig, TokenizerTrainConfig
from .demo_corpus import fetch_demo_corpus
from .prepare import OutputMismatch, prepare_dataset
from .tokenizer import MODEL_FILENAME, Tokenizer, train_tokenizer_on_corpus


def build_demo_data(out_dir: str | os.PathLike, *, vocab_size: int = 2048, seq_len: int = 256,
                    max_documents: int | None = None, val_fraction: float = 0.05,
                    num_workers: int = 0, progress: bool = True) -> dict[str, Path]:
    """Fetch the demo corpus, train its tokenizer and prepare shards; returns the paths."""
    out = Path(out_dir)
    corpus = fetch_demo_corpus()
    corpus_cfg = CorpusConfig(source=str(corpus), max_documents=max_documents)
    tok_path = out / "tokenizer" / MODEL_FILENAME
    retrain = not tok_path.is_file() or Tokenizer.load(tok_path).vocab_size != vocab_size
    if retrain:
        log = (lambda line: print(line, file=sys.stderr)) if progress else None
        train_tokenizer_on_corpus(corpus_cfg, tok_path.parent,
                                  TokenizerTrainConfig(vocab_size=vocab_size, train_chars=10_000_000),
                                  progress=progress, log=log)
    data_dir = out / "data"
    cfg = PrepareConfig(corpus=corpus_cfg, tokenizer=str(tok_path), out=str(data_dir), seq_len=seq_len,
                        val_fraction=val_fraction, num_workers=num_workers, overwrite=retrain)
    try:
        prepare_dataset(cfg, progress=progress)
    except OutputMismatch:  # other settings or a re-fetched corpus
        cfg.overwrite = True  # the demo owns its directory: rewrite the shards
        prepare_dataset(cfg, progress=progress)
    return {"corpus": corpus, "tokenizer": tok_path, "data": data_dir}
