"""Read raw documents through ``datasets``: local files (jsonl, json, parquet, csv, text;
files, directories, globs) or a hub dataset (``hub:<name>``).

Local files are read one by one in streaming mode (no Arrow cache is written), with the
hub's offline flags set, so a local source never touches the network and every error can
name the file it came from.

Files are read once each, in the order given: a file named twice (``dir,dir/*.jsonl``) is
read at its first mention. A directory is expanded to the corpus files below it, except
hidden ones (``.name``, or under a ``.name`` directory such as ``.ipynb_checkpoints``): name
such a file explicitly to read it.

Also here: ``input_fingerprint`` (each file's path, size and mtime; what a prepared
dataset records so a rerun notices changed inputs) and ``sample_documents`` (a seeded
sample spread over the whole corpus, for tokenizer training).
"""
from __future__ import annotations

import bisect
import contextlib
import glob
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import CorpusConfig
from .errors import DataError

HUB_PREFIX = "hub:"
_EXT_FORMATS = {
    ".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
    ".csv": "csv", ".txt": "text", ".text": "text", ".md": "text",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd")
log = logging.getLogger(__name__)


@dataclass
class ResolvedCorpus:
    """A corpus source made concrete: the files to read (local) or the hub name."""

    kind: str  # "local" or "hub"
    files: list[tuple[Path, str]]  # (file, datasets builder name) for local sources
    hub_name: str | None = None

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{HUB_PREFIX}{self.hub_name}"
        shown = ", ".join(str(f) for f, _ in self.files[:3])
        more = f" (+{len(self.files) - 3} more)" if len(self.files) > 3 else ""
        return shown + more


def _file_format(path: Path, forced: str) -> str | None:
    if forced != "auto":
        return {"jsonl": "json"}.get(forced, forced)
    name = path.name.lower()
    for comp in _COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _EXT_FORMATS.get(Path(name).suffix)


def resolve_corpus(cfg: CorpusConfig) -> ResolvedCorpus:
    """Expand ``cfg.source`` into readable files (or a hub name); DataError when it cannot.

    Each file counts once (by real path, at its first mention), so overlapping inputs never
    duplicate documents (nor leak copies of training documents into validation).
    """
    source = cfg.source.strip()
    if not source:
        raise DataError("no corpus given: pass --input PATH (file, directory or glob) or hub:NAME")
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX):]
        if not name:
            raise DataError("hub: needs a dataset name, e.g. hub:allenai/c4")
        return ResolvedCorpus("hub", [], hub_name=name)
    files: list[tuple[Path, str]] = []
    for part in (p.strip() for p in source.split(",")):
        if part:
            files += [(path, _checked_format(path, cfg)) for path in _expand(part, cfg)]
    if not files:
        raise DataError(f"corpus {source!r} names no files")
    return ResolvedCorpus("local", _unique(files))


def _expand(part: str, cfg: CorpusConfig) -> list[Path]:
    """The files one comma-separated piece of ``--input`` names."""
    expanded = os.path.expanduser(part)
    if glob.has_magic(expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise DataError(f"no files match {part!r}: check the pattern and the directory")
        return [Path(m) for m in matches if os.path.isfile(m)]
    if os.path.isdir(expanded):
        root = Path(expanded)
        # hidden files and directories (.ipynb_checkpoints, .git, editor backups) are not corpus
        candidates = sorted(p for p in root.rglob("*") if p.is_file()
                            and not any(c.startswith(".") for c in p.relative_to(root).parts))
        candidates = [p for p in candidates if _file_format(p, cfg.format)]
        if not candidates:
            raise DataError(
                f"directory {part!r} holds no jsonl/json/parquet/csv/txt files (hidden ones are skipped): "
                "point --input at the files or pass --format")
        return candidates
    if os.path.exists(expanded):
        return [Path(expanded)]
    raise DataError(f"corpus path {part!r} does not exist: check the path "
                    f"(hub datasets are written {HUB_PREFIX}NAME)")


def _checked_format(path: Path, cfg: CorpusConfig) -> str:
    fmt = _file_format(path, cfg.format)
    if fmt is None:
        raise DataError(f"cannot tell the format of {str(path)!r} from its name: pass --format")
    if not os.access(path, os.R_OK):
        raise DataError(f"corpus file {str(path)!r} is not readable: fix its permissions")
    return fmt


def _unique(files: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """``files`` without repeats of a file (by real path: links and other spellings count), in
    first-mention order; a warning says how many were dropped."""
    seen: set[str] = set()
    kept = []
    for path, fmt in files:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            kept.append((path, fmt))
    if len(kept) < len(files):
        log.warning(f"the corpus names {len(files) - len(kept)} file(s) more than once (overlapping --input "
                    "entries): each file is read once, at its first mention")
    return kept


@contextlib.contextmanager
def offline_hub():
    """Set the hub's offline flags (env and already-imported modules), then restore them."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = (dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcfg.HF_HUB_OFFLINE)
    dcfg.HF_HUB_OFFLINE = dcfg.HF_DATASETS_OFFLINE = hcfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcfg.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _text_of(row: dict, field: str, where: str) -> str:
    if field not in row:
        cols = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where} has no field {field!r} (its fields: {cols}): pass --text-field NAME")
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text: "
                        "pass the --text-field that holds the document text")
    return value


def _iter_local_file(path: Path, fmt: str, cfg: CorpusConfig) -> Iterator[str]:
    import datasets

    kwargs = {}
    field = cfg.text_field
    if fmt == "text":
        kwargs = {"sample_by": cfg.text_sample_by, "keep_linebreaks": True}
        field = "text"
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(path)], split="train", streaming=True, **kwargs)
        for row in ds:
            yield _text_of(row, field, f"corpus file {str(path)!r}")
    except DataError:
        raise
    except StopIteration:  # datasets raises it for a file with no rows
        return
    except Exception as e:
        raise DataError(f"cannot read corpus file {str(path)!r} as {fmt} ({type(e).__name__}: "
                        f"{str(e)[:200]}): fix the file or pass the right --format") from None


def _iter_hub(name: str, cfg: CorpusConfig, part: int = 0, parts: int = 1) -> Iterator[str]:
    """The hub dataset's rows, or part ``part`` of ``parts`` of them, cut by data files when
    streamed (``IterableDataset.shard``), into contiguous row ranges when downloaded."""
    import datasets

    where = f"hub dataset {name!r} (config {cfg.hub_config!r}, split {cfg.split!r})"
    try:
        ds = datasets.load_dataset(name, cfg.hub_config, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:
        raise DataError(f"cannot open {where} ({type(e).__name__}: {str(e)[:200]}): check the name, "
                        "config and split, and network access (HF_HUB_OFFLINE must be unset)") from None
    if parts > 1 and isinstance(ds, datasets.IterableDataset):
        files = getattr(ds, "num_shards", None) or ds.n_shards  # num_shards from datasets 4 on
        if files < parts:
            raise DataError(f"{where} streams from {files} data file(s), too few for --parts {parts}: "
                            f"use at most {files} parts, or --no-streaming")
        ds = ds.shard(num_shards=parts, index=part)
    elif parts > 1:
        ds = ds.shard(num_shards=parts, index=part, contiguous=True)
    for row in ds:
        yield _text_of(row, cfg.text_field, where)


def iter_documents(cfg: CorpusConfig, resolved: ResolvedCorpus | None = None, part: int = 0,
                   parts: int = 1) -> Iterator[str]:
    """Every document's text in a fixed order, up to ``cfg.max_documents``; with ``parts`` > 1
    only part ``part``'s share (``_part_documents``).

    Raises DataError when the corpus (or the part) yields no document at all.
    """
    import datasets

    resolved = resolved or resolve_corpus(cfg)
    datasets.disable_progress_bars()
    limit = cfg.max_documents
    count = 0
    if parts > 1:
        gen: Iterator[str] = _part_documents(cfg, resolved, part, parts)
        ctx: contextlib.AbstractContextManager = offline_hub() if resolved.kind == "local" else contextlib.nullcontext()
    elif resolved.kind == "hub":
        gen = _iter_hub(resolved.hub_name or "", cfg)
        ctx = contextlib.nullcontext()
    else:
        gen = (t for path, fmt in resolved.files for t in _iter_local_file(path, fmt, cfg))
        ctx = offline_hub()
    with ctx:
        for text in gen:
            if limit is not None and count >= limit:
                break
            count += 1
            yield text
    if count == 0:
        what = f"part {part} of {parts} of corpus" if parts > 1 else "corpus"
        fix = "use fewer --parts" if parts > 1 else "check the files"
        raise DataError(f"{what} {resolved.describe()} is empty (no documents): {fix}")


def _part_documents(cfg: CorpusConfig, resolved: ResolvedCorpus, part: int, parts: int) -> Iterator[str]:
    """Part ``part`` of ``parts``: disjoint shares that together are the corpus, each in corpus order.

    Local files count as one byte stream cut into ``parts`` equal ranges; a part reads the
    documents that start in its range (uncompressed jsonl and txt by line, parquet by row, as
    ``sample_documents`` does), and every other file whole when its first byte is in the
    range. A hub dataset is cut by its data files (``IterableDataset.shard``).
    """
    if not 0 <= part < parts:
        raise DataError(f"--part {part} is outside 0..{parts - 1} (--parts {parts})")
    if cfg.max_documents is not None:
        raise DataError("--max-documents cannot be combined with --parts (which documents are first "
                        "depends on the other parts): drop one of them")
    if resolved.kind == "hub":
        yield from _iter_hub(resolved.hub_name or "", cfg, part, parts)
        return
    sizes = [path.stat().st_size for path, _ in resolved.files]
    total = sum(sizes)
    lo, hi = part * total // parts, (part + 1) * total // parts
    reader = _BlockReader(cfg)
    start = 0
    for (path, fmt), size in zip(resolved.files, sizes):
        a, z = max(lo - start, 0), min(hi - start, size)
        if _addressable(path, fmt, cfg) is not None:
            if a < z:
                yield from reader.read(path, fmt, a, z)
        elif lo <= start < hi:
            yield from _iter_local_file(path, fmt, cfg)
        start += size


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def count_documents(cfg: CorpusConfig, resolved: ResolvedCorpus) -> int | None:
    """A cheap document count for progress bars (None when it would cost a full read).

    An unreadable file gives None here; reading it later raises the DataError that names it.
    """
    try:
        total = _count(cfg, resolved)
    except Exception:
        total = None
    if cfg.max_documents is not None:
        return cfg.max_documents if total is None else min(total, cfg.max_documents)
    return total


def _count(cfg: CorpusConfig, resolved: ResolvedCorpus) -> int | None:
    if resolved.kind == "hub":
        return None
    total = 0
    for path, fmt in resolved.files:
        compressed = path.name.lower().endswith(_COMPRESSED)
        if fmt == "json" and path.suffix == ".jsonl" and not compressed:
            total += _count_lines(path)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        elif fmt == "text" and cfg.text_sample_by == "document":
            total += 1
        elif fmt == "text" and cfg.text_sample_by == "line" and not compressed:
            total += _count_lines(path)
        else:
            return None
    return total


# ----------------------------------------------------------------------------- input identity


def input_fingerprint(cfg: CorpusConfig, resolved: ResolvedCorpus) -> dict[str, Any]:
    """What identifies a corpus, so a rerun can tell whether its inputs changed.

    Local: every file's absolute path, size and mtime_ns (one stat each; contents are not
    hashed, which would cost a full read of a large corpus). Hub: name, config and split.
    """
    if resolved.kind == "hub":
        return {"kind": "hub", "name": resolved.hub_name, "config": cfg.hub_config, "split": cfg.split}
    files = []
    for path, _ in resolved.files:
        try:
            st = path.stat()
        except OSError as e:
            raise DataError(f"corpus file {str(path)!r} cannot be read ({e.strerror}): check that it "
                            "still exists") from None
        files.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"kind": "local", "files": files}


def _mtime(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _source_name(fp: dict[str, Any]) -> str:
    if fp.get("kind") != "hub":
        return f"{len(fp.get('files', []))} local files"
    return f"{HUB_PREFIX}{fp.get('name')} (config {fp.get('config')!r}, split {fp.get('split')!r})"


def input_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """How ``new`` differs from ``old`` (both from ``input_fingerprint``), or None if equal.

    Names the first changed file and counts the others, for one readable error line.
    """
    if old == new:
        return None
    if old.get("kind") != "local" or new.get("kind") != "local":
        return f"the corpus was {_source_name(old)} and is now {_source_name(new)}"
    before = {f["path"]: f for f in old["files"]}
    after = {f["path"]: f for f in new["files"]}
    changes = []
    for path, f in after.items():
        was = before.get(path)
        if was is None:
            changes.append(f"corpus file {path!r} is new")
        elif was["size"] != f["size"]:
            changes.append(f"corpus file {path!r} changed (size {was['size']} -> {f['size']} bytes)")
        elif was["mtime_ns"] != f["mtime_ns"]:
            changes.append(f"corpus file {path!r} changed (modified {_mtime(was['mtime_ns'])} -> "
                           f"{_mtime(f['mtime_ns'])}, same size)")
    changes += [f"corpus file {path!r} is no longer in the corpus" for path in before if path not in after]
    if not changes:  # same files, another order
        return "the corpus lists the same files in another order"
    more = f" (and {len(changes) - 1} more changed files)" if len(changes) > 1 else ""
    return changes[0] + more


# ----------------------------------------------------------------------------- sampling

# Below this many bytes per block a sample would cost a seek per few documents; above it a
# large sample would come from too few places. Blocks are capped so the permutation stays small.
_MIN_BLOCK_BYTES, _MAX_BLOCK_BYTES, _MAX_BLOCKS = 4096, 1 << 20, 1 << 22
_SPANS_PER_SAMPLE = 256


@dataclass
class CorpusSample:
    """Documents drawn for a sample, and how: ``info`` is filled in as they are read."""

    documents: Iterator[str]
    detail: str  # one line for the log: what is drawn and, for a prefix, why
    info: dict[str, Any]  # "method" ("spread" or "prefix"), its parameters, blocks read so far

    def describe(self) -> dict[str, Any]:
        return {**self.info, "detail": self.detail}


def _addressable(path: Path, fmt: str, cfg: CorpusConfig) -> str | None:
    """How a file's documents are reached from a byte position (None: only from its start)."""
    if path.name.lower().endswith(_COMPRESSED):
        return None
    if fmt == "parquet":
        return "parquet"
    if fmt == "json" and (cfg.format == "jsonl" or path.suffix.lower() in (".jsonl", ".ndjson")):
        return "json-lines"
    if fmt == "text" and cfg.text_sample_by in ("line", "document"):
        return f"text-{cfg.text_sample_by}"
    return None


def _prefix_reason(cfg: CorpusConfig, resolved: ResolvedCorpus) -> str | None:
    """Why this corpus can only be sampled from its start (None: it can be sampled anywhere)."""
    if resolved.kind == "hub":
        return f"{HUB_PREFIX}{resolved.hub_name} is read as a stream"
    if cfg.max_documents is not None:
        return f"max_documents={cfg.max_documents} keeps only the first documents"
    for path, fmt in resolved.files:
        if _addressable(path, fmt, cfg) is None:
            what = "compressed" if path.name.lower().endswith(_COMPRESSED) else (
                f"text split by {cfg.text_sample_by}" if fmt == "text" else fmt)
            return f"{str(path)!r} is {what}, which reads only from its start"
    return None


def sample_documents(cfg: CorpusConfig, max_chars: int, seed: int = 0,
                     resolved: ResolvedCorpus | None = None) -> CorpusSample:
    """Documents for a sample of about ``max_chars`` characters, spread over the whole corpus.

    A corpus sorted by source, topic or date would bias a sample taken from its start. Where
    every file can be entered at a byte position (uncompressed jsonl and txt, parquet), the
    corpus is cut into equal byte blocks and the documents starting in each block are read,
    block after block in a seeded random order (each document once), until the consumer has
    enough; a corpus smaller than the sample is read whole. Otherwise (hub streams,
    compressed or csv files, max_documents) documents come in order from the start and
    ``detail`` says why. The same files and seed always give the same documents.
    """
    if seed < 0:
        raise DataError(f"the sample seed must be >= 0, not {seed}: pass --sample-seed 0 or another "
                        "non-negative number")
    resolved = resolved or resolve_corpus(cfg)
    reason = _prefix_reason(cfg, resolved)
    if reason is not None:
        return CorpusSample(iter_documents(cfg, resolved),
                            f"the first {max_chars:,} characters in corpus order ({reason})",
                            {"method": "prefix", "reason": reason})
    sizes = [path.stat().st_size for path, _ in resolved.files]
    total = sum(sizes)
    per_span = min(_MAX_BLOCK_BYTES, max(_MIN_BLOCK_BYTES, max_chars // _SPANS_PER_SAMPLE))
    block = max(-(-total // _MAX_BLOCKS), per_span)
    blocks = max(1, -(-total // block))
    info: dict[str, Any] = {"method": "spread", "seed": seed, "block_bytes": block, "blocks": blocks,
                            "blocks_read": 0}
    detail = (f"whole documents from {block:,}-byte blocks drawn at random (seed {seed}) from all "
              f"{blocks:,} blocks of the corpus ({total:,} bytes in {len(sizes)} files)")
    return CorpusSample(_spread(cfg, resolved, sizes, block, blocks, seed, info), detail, info)


def _spread(cfg: CorpusConfig, resolved: ResolvedCorpus, sizes: list[int], block: int, blocks: int,
            seed: int, info: dict[str, Any]) -> Iterator[str]:
    import numpy as np

    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    order = np.random.default_rng(seed).permutation(blocks)
    reader = _BlockReader(cfg)
    empty = True
    # Strictly in the random order: the consumer stops at any point, and any reordering for
    # locality (sorting a batch of blocks, say) would favour the start of the corpus again.
    for b in order.tolist():
        info["blocks_read"] += 1
        lo, hi = b * block, min((b + 1) * block, starts[-1])
        first = bisect.bisect_right(starts, lo) - 1
        for i in range(first, len(sizes)):  # the files this block overlaps
            if starts[i] >= hi:
                break
            a, z = max(lo - starts[i], 0), min(hi - starts[i], sizes[i])
            for text in reader.read(*resolved.files[i], a, z):
                empty = False
                yield text
    if empty:
        raise DataError(f"corpus {resolved.describe()} is empty (no documents): check the files")


class _BlockReader:
    """The documents that start in a byte range of a file; parquet rows count as spread evenly
    over the file's bytes. Keeps the last parquet file and row group read (small blocks often
    fall in the same one)."""

    def __init__(self, cfg: CorpusConfig) -> None:
        self.cfg = cfg
        self._file: tuple[Path, Any] | None = None
        self._group: tuple[Path, int, list] | None = None

    def read(self, path: Path, fmt: str, lo: int, hi: int) -> Iterator[str]:
        kind = _addressable(path, fmt, self.cfg)
        where = f"corpus file {str(path)!r}"
        try:
            if kind == "parquet":
                yield from self._parquet(path, lo, hi, where)
            elif kind == "text-document":
                if lo == 0:
                    yield path.read_text(encoding="utf-8")
            else:
                for line in _lines_starting_in(path, lo, hi):
                    if kind == "text-line":
                        yield from _text_lines(line)
                    elif line.strip():
                        yield _text_of(_json_object(line), self.cfg.text_field, where)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read {where} as {fmt} ({type(e).__name__}: {str(e)[:200]}): fix "
                            "the file or pass the right --format") from None

    def _parquet(self, path: Path, lo: int, hi: int, where: str) -> Iterator[str]:
        pf = self._parquet_file(path)
        meta, size, name = pf.metadata, path.stat().st_size, self.cfg.text_field
        if name not in pf.schema_arrow.names:
            cols = ", ".join(sorted(pf.schema_arrow.names)) or "none"
            raise DataError(f"{where} has no field {name!r} (its fields: {cols}): pass --text-field NAME")
        # row r "starts" at byte r * size // rows, so the rows starting in [lo, hi) are [first, end)
        first, end = -(-lo * meta.num_rows // size), -(-hi * meta.num_rows // size)
        group_start = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            a, z = max(first, group_start), min(end, group_start + n)
            if a < z:
                for value in self._row_group(pf, path, g)[a - group_start:z - group_start]:
                    yield _text_of({name: value}, name, where)
            group_start += n

    def _parquet_file(self, path: Path) -> Any:
        if self._file is None or self._file[0] != path:
            import pyarrow.parquet as pq

            self._file = (path, pq.ParquetFile(path))
        return self._file[1]

    def _row_group(self, pf: Any, path: Path, g: int) -> list:
        if self._group is None or self._group[:2] != (path, g):
            column = pf.read_row_group(g, columns=[self.cfg.text_field]).column(0)
            self._group = (path, g, column.to_pylist())
        return self._group[2]


def _json_object(line: bytes) -> dict:
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"a line holds a JSON {type(row).__name__}, not an object")
    return row


def _text_lines(line: bytes) -> list[str]:
    """One raw line of a text file as the whole-corpus read (``datasets``' text builder) gives
    it: universal newlines ("\\r\\n" and a lone "\\r" become "\\n", the latter ending a line).
    Parts must tokenize exactly the documents of the whole corpus."""
    return io.StringIO(line.decode("utf-8"), newline=None).readlines()


def _lines_starting_in(path: Path, lo: int, hi: int) -> Iterator[bytes]:
    """The lines of a file whose first byte lies in ``[lo, hi)``, with their newline."""
    with open(path, "rb") as f:
        if lo > 0:
            f.seek(lo - 1)
            f.readline()  # the rest of the line that starts before lo (just "\n" if it ends there)
        pos = f.tell()
        while pos < hi:
            line = f.readline()
            if not line:
                return
            yield line
            pos += len(line)
