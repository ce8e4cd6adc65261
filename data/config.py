"""Typed settings for the data pipeline (plain dataclasses, no loading logic).

``DataConfig`` is the ``data`` section of the run config: which prepared datasets to read
and how. ``PrepareConfig`` (with ``CorpusConfig`` and ``TokenizerTrainConfig``) drives the
offline ``linrnn-prepare`` steps. Range limits use the run-config convention
``metadata={"ge": x}`` etc., checked by ``bound_violation`` (for the run config in
``pretrain.config_loader``, for the ``linrnn-prepare`` options in ``data.cli``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal


def _rng(default, **bounds):
    return field(default=default, metadata=bounds)


def local_path(path: str) -> str:
    """``file:///abs/dir`` as ``/abs/dir`` (URLs of local directories are read and written in
    place, like plain paths); any other path or URL unchanged."""
    if not path.startswith("file://"):
        return path
    from urllib.parse import unquote, urlsplit

    url = urlsplit(path)
    if url.netloc not in ("", "localhost"):
        raise ValueError(f"{path!r} names a directory on host {url.netloc!r}: a file:// URL must be local "
                         "(file:///absolute/path)")
    return unquote(url.path)


_BOUNDS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}


def bound_violation(value: Any, bounds: Any) -> str | None:
    """``"must be >= 2, got 0"`` when a number breaks its field's range metadata (``_rng``),
    else None. Shared with ``pretrain.config_loader``."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and math.isnan(value):
        return "NaN is not allowed"
    for name, bound in bounds.items():
        ok, op = _BOUNDS.get(name, (None, None))
        if ok is not None and not ok(value, bound):
            return f"must be {op} {bound}, got {value!r}"
    return None


def range_violation(cfg: Any) -> str | None:
    """The first field of ``cfg`` (nested dataclasses included) outside its range metadata,
    as ``"seq_len must be >= 2, got 0"``; None when all fit. For settings built in code (the
    ``linrnn-prepare`` options), which ``pretrain.config_loader`` does not see."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        problem = range_violation(value) if dataclasses.is_dataclass(value) else bound_violation(value, f.metadata)
        if problem is not None:
            return problem if dataclasses.is_dataclass(value) else f"{f.name} {problem}"
    return None


@dataclass
class DataSource:
    """One prepared dataset (a ``linrnn-prepare prepare`` output) in the training mixture."""

    path: str = ""  # local directory or any remote streaming supports (s3://, gs://, ...)
    # Relative share of the training mixture, normalised over all sources (e.g. 3 and 1:
    # three quarters from the first). None on every source: each is read once per epoch,
    # i.e. in proportion to its size, as if the datasets were one (Megatron's default).
    weight: float | None = _rng(None, gt=0.0)

    def __post_init__(self) -> None:
        try:
            self.path = local_path(self.path)
        except ValueError as e:  # "key: message", as ``check`` methods raise
            raise ValueError(f"path: {e}") from None


@dataclass
class DataConfig:
    """How a training rank reads prepared data.

    Batches hold ``seq_len`` tokens per sequence; ``labels`` are the next tokens with -100
    at the last position of every document segment (see ``data.packing``).
    """

    sources: list[DataSource] = field(default_factory=list)
    # sentencepiece model the run expects; None: the tokenizer.model stored with the
    # first source. Every source must have been prepared with a tokenizer of this hash.
    tokenizer: str | None = None
    seq_len: int = _rng(2048, ge=2)  # must equal the seq_len the shards were written with
    train_split: str = "train"
    val_split: str = "val"
    shuffle: bool = True
    shuffle_seed: int = _rng(17, ge=0)
    shuffle_algo: Literal["py1e", "py1br", "py1b", "py1s", "py2s", "naive"] = "py1e"
    shuffle_block_size: int | None = None  # None: streaming's default
    # Fix this for a run that may change its node count: the global sample order depends
    # on it (None: the number of nodes of the first launch, stored in the loader state).
    num_canonical_nodes: int | None = None
    epoch_size: int | None = None  # sequences per epoch of the mixture; None: all sources once
    num_workers: int = _rng(2, ge=0)  # DataLoader worker processes per rank
    prefetch_factor: int = _rng(2, ge=1)
    # Page-locked batches, so the trainer's non-blocking copy to the GPU is really asynchronous
    # (from pageable memory it waits for the GPU). None: where CUDA is available.
    pin_memory: bool | None = None
    # Local uncompressed datasets are read in place. Remote or compressed ones (or all, with
    # copy_local) are copied shard by shard into a node-local cache under cache_root
    # (None: $LINRNN_DATA_CACHE or <system tmp>/linrnn-data-<uid>), one subdir per job.
    copy_local: bool = False  # e.g. to move data off a slow shared filesystem
    cache_root: str | None = None
    job_id: str | None = None  # None: SLURM_JOB_ID, torchrun's master port, or the pid
    cache_limit: str | None = None  # e.g. "200gb": evict least recently used cached shards
    predownload: int | None = None  # samples to fetch ahead per worker (None: 8 * batch)
    download_timeout: float = _rng(300.0, gt=0.0)
    # Check shards before reading: "size" (every shard present with its recorded size; cheap),
    # "hash" (also xxh64 of every byte), "none".
    verify: Literal["none", "size", "hash"] = "size"
    clean_stale_shm: bool = True  # unlink shared memory left by a killed job (once per process)
    drop_last: bool = True  # drop a rank's final partial batch of an epoch


@dataclass
class CorpusConfig:
    """Where raw documents come from.

    ``source`` is a local file, directory or glob (comma-separated for several), or
    ``hub:<name>`` for a Hugging Face hub dataset. Local sources never touch the network.
    """

    source: str = ""
    format: Literal["auto", "jsonl", "json", "parquet", "text", "csv"] = "auto"
    text_field: str = "text"
    hub_config: str | None = None  # hub only: the dataset config name
    split: str = "train"  # hub only: which split to read
    streaming: bool = True  # hub only: stream instead of downloading everything first
    max_documents: int | None = _rng(None, ge=1)
    text_sample_by: Literal["document", "paragraph", "line"] = "document"  # .txt files


@dataclass
class TokenizerTrainConfig:
    """sentencepiece training on a sample of a corpus (ids: pad 0, bos 1, eos 2, unk 3)."""

    vocab_size: int = _rng(32000, ge=16)
    model_type: Literal["bpe", "unigram"] = "bpe"
    train_chars: int = _rng(50_000_000, ge=1)  # characters of the corpus sampled for training
    sample_seed: int = _rng(0, ge=0)  # which documents the sample draws (from all over the corpus)
    character_coverage: float = _rng(0.9995, gt=0.0, le=1.0)
    byte_fallback: bool = True
    split_digits: bool = True
    num_threads: int = _rng(0, ge=0)  # 0: all cores


@dataclass
class PrepareConfig:
    """Tokenize a corpus and write packed MDS shards plus a manifest to ``out``."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: str = ""  # path to a sentencepiece .model
    out: str = ""  # local directory or remote URL (s3://...); staged locally, then renamed/uploaded
    seq_len: int = _rng(2048, ge=2)
    val_fraction: float = _rng(0.005, ge=0.0, lt=1.0)  # documents held out for validation
    split_seed: int = 0  # which documents go to validation (a hash of seed and index)
    add_bos: bool = False  # prepend BOS to every document (EOS is always appended)
    num_workers: int = _rng(0, ge=0)  # tokenizer processes; 0: all cores
    docs_per_task: int = _rng(256, ge=1)  # documents sent to a worker at a time
    compression: str | None = None  # e.g. "zstd" or "zstd:7"
    shard_size: str = "64mb"  # uncompressed bytes per shard
    overwrite: bool = False  # replace a complete dataset at ``out``
    staging_dir: str | None = None  # remote ``out`` only: where shards are written first
    # One part of a preparation split over several jobs (a SLURM array): part ``part`` of
    # ``parts`` reads its share of the corpus (``data.corpus.iter_documents``) and writes a
    # complete dataset to ``<out>/part-XXXXX``; training reads ``<out>`` as all parts together.
    parts: int = _rng(1, ge=1)
    part: int = _rng(0, ge=0)

    def __post_init__(self) -> None:
        from .errors import DataError

        try:
            self.out = local_path(self.out)
        except ValueError as e:
            raise DataError(f"--out {e}") from None
