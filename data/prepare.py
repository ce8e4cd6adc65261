"""Corpus -> tokenized, packed MDS shards plus manifest, written atomically.

Pipeline: the main process reads documents (``data.corpus``) and sends batches to a pool
of tokenizer processes (results come back in order, so the output does not depend on the
number of workers); it assigns each document to train or validation by a hash of its
corpus index, packs (``data.packing``) and writes shards with ``streaming.MDSWriter``.

Atomicity: everything is written to ``<out>.partial`` and renamed to ``<out>`` at the end
(the manifest is the last file written). A crashed run leaves only ``.partial``, which the
next run deletes before starting again. A rerun with the same settings on a complete
dataset made from the same files (each file's path, size and mtime, recorded in the
manifest) does nothing; other settings or changed files stop it with a message naming
them, unless ``--overwrite`` (which replaces prepared datasets only: a non-empty directory
without a manifest is never replaced). Remote outputs (s3://, gs://, ...) are staged locally and uploaded:
first the remote manifest is withdrawn (``data.manifest.withdrawn_manifest``), then the shards go
up, the manifest last, so a reader never sees a manifest over shards it does not describe; the
loader also checks each remote index.json against the manifest. On a remote output only a
missing or withdrawn manifest means "no dataset (or an interrupted upload): write it"; one
that cannot be read (credentials, network) stops prepare.

In parts (``--parts N --part I``, e.g. a SLURM array of N jobs): each job reads its share of
the corpus (``data.corpus.iter_documents``) and writes a complete dataset, as above, to
``<out>/part-0000I``, whose manifest records the part and a group id shared by the parts of
one preparation. A failed part is rerun alone; ``data.manifest.read_dataset`` reads
``<out>`` as all N parts (refusing a missing or foreign one), and training reads them as
one dataset.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .config import PrepareConfig
from .corpus import (
    HUB_PREFIX,
    ResolvedCorpus,
    count_documents,
    input_change,
    input_fingerprint,
    iter_documents,
    resolve_corpus,
)
from .errors import DataError
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    MANIFEST_NAME,
    IncompleteDataset,
    RemoteReadError,
    dataset_id,
    is_remote,
    join_path,
    part_name,
    read_manifest,
    sha256_file,
    withdrawn_manifest,
    write_json_atomic,
)
from .packing import Packer, token_dtype
from .tokenizer import MODEL_FILENAME, Tokenizer, encode_task, init_worker

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
log = logging.getLogger(__name__)


class OutputMismatch(DataError):
    """``--out`` holds a complete dataset made with other settings or from other input files."""


class OutputBusy(DataError):
    """Another live prepare holds ``--out``'s lock (``--part all`` moves on to the next part)."""


def validation_mask(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which documents (by corpus index) are held out: splitmix64(seed, index) < fraction."""
    if fraction <= 0:
        return np.zeros(len(indices), dtype=bool)
    z = indices.astype(np.uint64) + np.uint64((seed * _GOLDEN + _GOLDEN) & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


# Settings recorded from a later version on, with the value every dataset made before then
# has: there they count as unrecorded, so such a dataset (or part) stays reusable.
_LEGACY_DEFAULTS: dict[str, Any] = {"shard_size": 64 << 20}


def _settings(cfg: PrepareConfig, tok: Tokenizer, source: str) -> dict[str, Any]:
    """The options that decide the output; with equal input files (``corpus.input_fingerprint``)
    a rerun is a no-op. ``source`` is informative: the files' identity decides."""
    c = cfg.corpus
    return {"source": source, "format": c.format, "text_field": c.text_field,
            "hub_config": c.hub_config, "hub_split": c.split, "max_documents": c.max_documents,
            "text_sample_by": c.text_sample_by, "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed, "add_bos": cfg.add_bos, "tokenizer_hash": tok.hash,
            "seq_len": cfg.seq_len, "compression": cfg.compression, "shard_size": shard_bytes(cfg.shard_size),
            **({"parts": cfg.parts, "part": cfg.part} if cfg.parts > 1 else {}), **_part_cut(cfg, source)}


def _part_cut(cfg: PrepareConfig, source: str) -> dict[str, str]:
    """How a hub corpus is cut into parts, where it is not the default (streamed: by data file);
    parts cut otherwise hold other documents, so their settings (and group id) must differ."""
    if cfg.parts > 1 and source.startswith(HUB_PREFIX) and not cfg.corpus.streaming:
        return {"part_cut": "contiguous rows (--no-streaming)"}
    return {}


def shard_bytes(size: str | int) -> int:
    """``--shard-size`` in bytes (``64mb``, ``1gb``, ``1000000``); DataError when it is not a size."""
    from streaming.base.util import bytes_to_int

    try:
        value = bytes_to_int(size)
    except (ValueError, TypeError):
        value = -1
    if not 0 < value < 1 << 32:
        raise DataError(f"--shard-size {size!r} is not a shard size: give bytes or a size such as 64mb, "
                        "above 0 and below 4gb")
    return value


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as reruns and parts compare them: without keys at their legacy default."""
    return {k: v for k, v in settings.items() if not (k in _LEGACY_DEFAULTS and _LEGACY_DEFAULTS[k] == v)}


def _tasks(docs: Iterator[str], per_task: int, add_bos: bool, stats: dict) -> Iterator[tuple]:
    """Batches of (corpus indices, texts); whitespace-only documents are skipped and counted."""
    idx, texts = [], []
    for i, text in enumerate(docs):
        if not text.strip():
            stats["skipped_empty"] += 1
            continue
        idx.append(i)
        texts.append(text)
        if len(texts) == per_task:
            yield np.array(idx, dtype=np.int64), texts, add_bos
            idx, texts = [], []
    if texts:
        yield np.array(idx, dtype=np.int64), texts, add_bos


def tokenizer_pool(tok: Tokenizer, workers: int) -> Any:
    """Processes that each hold the model and run ``encode_task``.

    fork starts them instantly and shares the imported modules; spawn where fork is missing.
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(workers, initializer=init_worker, initargs=(tok.model_bytes,))


@contextlib.contextmanager
def _out_lock(final: Path) -> Iterator[None]:
    lock_path = final.parent / f".{final.name}.lock"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"another prepare is writing {str(final)!r} (lock {str(lock_path)!r} "
                             "is held): wait for it or choose another --out") from None
        yield


def _existing_outcome(cfg: PrepareConfig, settings: dict, inputs: dict, cache: str) -> dict | None:
    """A complete dataset at ``out`` made from these settings and files -> its manifest (nothing
    to do); None -> (re)write it. OutputMismatch when it was made otherwise and may not be replaced;
    RemoteReadError when a remote manifest cannot be read (it may well exist)."""
    out = cfg.out
    if not is_remote(out):
        p = Path(out)
        if not p.exists():
            return None
        if not (p / MANIFEST_NAME).is_file():
            if p.is_dir() and not any(p.iterdir()):
                return None
            # --overwrite replaces datasets only: this could be a home or project directory
            raise DataError(f"{out!r} exists and is not a prepared dataset, so it is not replaced (not even "
                            "with --overwrite): choose another --out, or empty or remove it yourself")
    try:
        manifest = read_manifest(out, cache)
    except IncompleteDataset:
        return None  # remote: none yet, or an interrupted upload; redo it
    except RemoteReadError:
        raise  # unreachable is not absent: writing on could replace a complete dataset
    except DataError:
        if cfg.overwrite:
            return None
        raise
    if cfg.overwrite:
        return None
    _check_reusable(out, manifest, settings, inputs)
    return manifest


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_reusable(out: str, manifest: dict, settings: dict, inputs: dict) -> None:
    """Raise OutputMismatch unless ``manifest`` was written for these settings and input files.

    A manifest from before input fingerprints were recorded cannot tell: it is reused, with a
    warning, as older versions did (refusing it would force a full re-prepare to upgrade). A
    setting recorded only later (``_LEGACY_DEFAULTS``) counts, where missing, at the value it had.
    """
    recorded = manifest.get("inputs")
    old, settings = _comparable(manifest.get("settings") or {}), _comparable(settings)
    ignore = {"source"} if recorded is not None else set()  # the files' identity decides instead
    changed = sorted(k for k in settings.keys() | old.keys() if k not in ignore and old.get(k) != settings.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {_short(old.get(k, _LEGACY_DEFAULTS.get(k)))} -> "
                          f"{_short(settings.get(k, _LEGACY_DEFAULTS.get(k)))}" for k in changed)
        raise OutputMismatch(f"{out!r} already holds a prepared dataset with other settings ({diffs}): "
                             "pass --overwrite to replace it or choose another --out")
    if recorded is None:
        log.warning(f"{out!r} was prepared by an older version that did not record its input files, so "
                    "whether they changed since is unknown: reusing it; pass --overwrite to re-prepare it")
        return
    change = input_change(recorded, inputs)
    if change is not None:
        raise OutputMismatch(f"{out!r} was prepared from other input files: {change}; pass --overwrite to "
                             "re-prepare it from the current files or choose another --out")


def _write_splits(cfg: PrepareConfig, tok: Tokenizer, staging: Path, progress: bool,
                  resolved: ResolvedCorpus) -> dict:
    """The shards of ``resolved`` (resolved once by the caller: resolving warns, e.g. about
    files named twice, and the files must be the ones fingerprinted)."""
    from streaming import MDSWriter

    dtype = token_dtype(tok.vocab_size)
    columns = {"tokens": f"ndarray:{dtype.name}:{cfg.seq_len}", "cu_seqlens": "ndarray:int32"}
    split_names = ["train"] + (["val"] if cfg.val_fraction > 0 else [])
    workers = cfg.num_workers or (os.cpu_count() or 1)
    pool = tokenizer_pool(tok, workers)
    writers = {s: MDSWriter(out=str(staging / s), columns=columns, compression=cfg.compression,
                            hashes=["xxh64"], size_limit=shard_bytes(cfg.shard_size)) for s in split_names}
    packers = {s: Packer(cfg.seq_len, dtype) for s in split_names}
    stats = collections.Counter(skipped_empty=0)
    total = count_documents(cfg.corpus, resolved) if cfg.parts == 1 else None
    # a part numbers its documents from 0: its own range of indices keeps the held-out choice
    # independent of the other parts'
    index_offset = np.int64(cfg.part) << np.int64(40)
    bar = tqdm(total=total, unit="doc", desc=f"prepare {Path(cfg.out).name}", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0

    def handle(result: tuple) -> None:
        nonlocal tokens_seen
        indices, flat, lengths, chars = result
        is_val = validation_mask(indices + index_offset, cfg.val_fraction, cfg.split_seed)
        token_is_val = np.repeat(is_val, lengths)
        parts = {"train": (flat[~token_is_val], lengths[~is_val])}
        if "val" in packers:
            parts["val"] = (flat[token_is_val], lengths[is_val])
        for split, (f, lens) in parts.items():
            for tokens, cu in packers[split].add(f, lens):
                writers[split].write({"tokens": tokens, "cu_seqlens": cu})
        tokens_seen += len(flat)
        stats["chars"] += chars
        bar.update(len(indices))
        bar.set_postfix_str(f"{tokens_seen / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)

    try:
        pending: collections.deque = collections.deque()
        docs = iter_documents(cfg.corpus, resolved, cfg.part, cfg.parts)
        for task in _tasks(docs, cfg.docs_per_task, cfg.add_bos, stats):
            pending.append(pool.apply_async(encode_task, (task,)))
            if len(pending) >= 2 * workers + 2:  # bounded: the corpus may be far larger than RAM
                handle(pending.popleft().get())
        while pending:
            handle(pending.popleft().get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        bar.update(stats["skipped_empty"])
        bar.close()
    for w in writers.values():
        w.finish()
    splits: dict[str, Any] = {}
    for s, p in packers.items():
        splits[s] = {"documents": p.documents, "document_tokens": p.document_tokens,
                     "sequences": p.sequences, "tokens": p.sequences * cfg.seq_len,
                     "dropped_tokens": p.dropped_tokens,
                     "index_sha256": sha256_file(staging / s / INDEX_NAME)}
    if splits["train"]["sequences"] == 0:
        raise DataError(f"corpus {resolved.describe()} gives {splits['train']['document_tokens']} training "
                        f"tokens, fewer than one sequence of seq_len={cfg.seq_len}: use more "
                        "documents or a smaller --seq-len")
    if "val" in splits and splits["val"]["sequences"] == 0:
        if cfg.parts == 1:
            raise DataError(f"the validation split of {resolved.describe()} gives no full sequence of "
                            f"{cfg.seq_len} tokens: raise --val-fraction, lower --seq-len, or pass "
                            "--val-fraction 0")
        # one part among several: training validates on the other parts' splits
        log.warning(f"part {cfg.part} of {cfg.parts}: its {splits['val']['documents']} held-out document(s) give "
                    f"no full sequence of {cfg.seq_len} tokens, so this part has no validation split")
        del splits["val"]
        shutil.rmtree(staging / "val")
    elapsed = time.perf_counter() - t0
    return {"splits": splits, "dtype": dtype.name, "columns": columns, "source": resolved.describe(),
            "skipped_empty_documents": stats["skipped_empty"], "chars": stats["chars"],
            "elapsed_s": round(elapsed, 3), "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1)}


def _upload_tree(staging: Path, out: str) -> None:
    """Copy a staged dataset to a remote (or another local dir): withdraw the manifest there
    first, so no reader takes an old manifest over new shards; upload the manifest last."""
    from streaming.base.storage import CloudUploader

    uploader = CloudUploader.get(out=(str(staging), out), keep_local=True, exist_ok=True)
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    files.remove(MANIFEST_NAME)
    _withdraw_manifest(out)
    for rel in files + [MANIFEST_NAME]:
        if not is_remote(out):
            (Path(out) / rel).parent.mkdir(parents=True, exist_ok=True)
        uploader.upload_file(rel)


def _withdraw_manifest(out: str) -> None:
    """Put the "being written" marker in place of ``out``'s manifest (readers refuse it)."""
    from streaming.base.storage import CloudUploader

    with tempfile.TemporaryDirectory(prefix="linrnn-withdraw-") as tmp:
        write_json_atomic(Path(tmp) / MANIFEST_NAME, withdrawn_manifest())
        if not is_remote(out):
            Path(out).mkdir(parents=True, exist_ok=True)
        CloudUploader.get(out=(tmp, out), keep_local=True, exist_ok=True).upload_file(MANIFEST_NAME)


def _part_target(cfg: PrepareConfig) -> PrepareConfig:
    """One part's own output, ``<out>/part-XXXXX`` (``PrepareConfig.parts``)."""
    if not is_remote(cfg.out) and (Path(cfg.out) / MANIFEST_NAME).is_file():
        raise DataError(f"{cfg.out!r} holds a dataset prepared whole, not in parts: choose another --out "
                        "for the parts")
    return dataclasses.replace(cfg, out=join_path(cfg.out, part_name(cfg.part)))


def _part_record(settings: dict, inputs: dict, part: int, parts: int) -> dict[str, Any]:
    """What ties the parts of one preparation together: the same settings (but the part
    number), input files and part count give the same group id."""
    shared = {k: v for k, v in _comparable(settings).items() if k != "part"}
    blob = json.dumps({"settings": shared, "inputs": inputs}, sort_keys=True).encode()
    return {"index": part, "count": parts, "group": hashlib.sha256(blob).hexdigest()[:32]}


def prepare_dataset(cfg: PrepareConfig, progress: bool = True, *, resolved: ResolvedCorpus | None = None,
                    note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole prepare step; returns the manifest written (or already present).

    ``resolved``: ``cfg.corpus`` already resolved (``--part all`` resolves, and warns, once for
    every part). ``note`` gets the line saying an existing dataset was kept, so a rerun that
    does nothing says so.
    """
    if not cfg.out:
        raise DataError("no output given: pass --out DIR (or a remote URL)")
    if not cfg.tokenizer:
        raise DataError("no tokenizer given: pass --tokenizer PATH (train one with `linrnn-prepare tokenizer`)")
    if not 0 <= cfg.part < cfg.parts:
        raise DataError(f"--part {cfg.part} is outside 0..{cfg.parts - 1} (--parts {cfg.parts})")
    tok = Tokenizer.load(cfg.tokenizer)
    tok.check_specials(add_bos=cfg.add_bos)
    if resolved is None:  # fail on a bad --input before touching the output
        resolved = resolve_corpus(cfg.corpus)
    if cfg.parts > 1:
        cfg = _part_target(cfg)
    settings = _settings(cfg, tok, resolved.describe())
    inputs = input_fingerprint(cfg.corpus, resolved)
    remote = is_remote(cfg.out)
    final = Path(cfg.out).resolve() if not remote else None
    with contextlib.ExitStack() as stack:
        tmp_root = stack.enter_context(tempfile.TemporaryDirectory(prefix="linrnn-prepare-"))
        if final is not None:
            stack.enter_context(_out_lock(final))
        existing = _existing_outcome(cfg, settings, inputs, tmp_root)
        if existing is not None:
            if note is not None:
                note(f"{cfg.out} is already prepared with these settings (manifest "
                     f"{join_path(cfg.out, MANIFEST_NAME)}): nothing to do; --overwrite rewrites it")
            return existing
        if final is not None:
            staging = final.parent / f"{final.name}.partial"
        else:
            # one directory per output: parts (or other prepares) sharing --staging-dir on a node
            # never clear each other's; a rerun of the same output clears its own leftover
            staging = Path(cfg.staging_dir or tmp_root) / f"staging-{hashlib.sha256(cfg.out.encode()).hexdigest()[:16]}"
        if staging.exists():  # left by an interrupted run: restart cleanly
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        result = _write_splits(cfg, tok, staging, progress, resolved)
        change = input_change(inputs, input_fingerprint(cfg.corpus, resolved))
        if change is not None:  # the shards may mix old and new contents
            raise DataError(f"the corpus changed while prepare read it ({change}): rerun once its files "
                            "are final")
        shutil.copyfile(tok.path, staging / MODEL_FILENAME)  # type: ignore[arg-type]
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": "linrnn-prepare",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seq_len": cfg.seq_len, "add_bos": cfg.add_bos, "compression": cfg.compression,
            "tokenizer": {**tok.describe(), "file": MODEL_FILENAME},
            "settings": settings, "inputs": inputs, **result,
            **({"part": _part_record(settings, inputs, cfg.part, cfg.parts)} if cfg.parts > 1 else {}),
        }
        manifest["dataset_id"] = dataset_id(manifest)
        write_json_atomic(staging / MANIFEST_NAME, manifest)
        if final is None:
            _upload_tree(staging, cfg.out)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            old = final.parent / f"{final.name}.old-{os.getpid()}"
            if final.exists():
                os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        return manifest
