"""Read raw documents through ``datasets``: local files (jsonl, json, parquet, csv, text;
files, directories, globs) or a hub dataset (``hub:<name>``).

Local files are read one by one in streaming mode (no Arrow cache is written), with the
hub's offline flags set, so a local source never touches the network and every error can
name the file it came from.
"""
from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import CorpusConfig
from .errors import DataError

HUB_PREFIX = "hub:"
_EXT_FORMATS = {
    ".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
    ".csv": "csv", ".txt": "text", ".text": "text", ".md": "text",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd")


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
    """Expand ``cfg.source`` into readable files (or a hub name); DataError when it cannot."""
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
        if not part:
            continue
        expanded = os.path.expanduser(part)
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise DataError(f"no files match {part!r}: check the pattern and the directory")
            candidates = [Path(m) for m in matches if os.path.isfile(m)]
        elif os.path.isdir(expanded):
            candidates = sorted(p for p in Path(expanded).rglob("*") if p.is_file())
            candidates = [p for p in candidates if _file_format(p, cfg.format)]
            if not candidates:
                raise DataError(
                    f"directory {part!r} holds no jsonl/json/parquet/csv/txt files: "
                    "point --input at the files or pass --format")
        elif os.path.exists(expanded):
            candidates = [Path(expanded)]
        else:
            raise DataError(f"corpus path {part!r} does not exist: check the path "
                            f"(hub datasets are written {HUB_PREFIX}NAME)")
        for path in candidates:
            fmt = _file_format(path, cfg.format)
            if fmt is None:
                raise DataError(f"cannot tell the format of {str(path)!r} from its name: pass --format")
            if not os.access(path, os.R_OK):
                raise DataError(f"corpus file {str(path)!r} is not readable: fix its permissions")
            files.append((path, fmt))
    if not files:
        raise DataError(f"corpus {source!r} names no files")
    return ResolvedCorpus("local", files)


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


def _iter_hub(name: str, cfg: CorpusConfig) -> Iterator[str]:
    import datasets

    where = f"hub dataset {name!r} (config {cfg.hub_config!r}, split {cfg.split!r})"
    try:
        ds = datasets.load_dataset(name, cfg.hub_config, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:
        raise DataError(f"cannot open {where} ({type(e).__name__}: {str(e)[:200]}): check the name, "
                        "config and split, and network access (HF_HUB_OFFLINE must be unset)") from None
    for row in ds:
        yield _text_of(row, cfg.text_field, where)


def iter_documents(cfg: CorpusConfig, resolved: ResolvedCorpus | None = None) -> Iterator[str]:
    """Every document's text in a fixed order, up to ``cfg.max_documents``.

    Raises DataError when the corpus yields no document at all.
    """
    import datasets

    resolved = resolved or resolve_corpus(cfg)
    datasets.disable_progress_bars()
    limit = cfg.max_documents
    count = 0
    if resolved.kind == "hub":
        gen: Iterator[str] = _iter_hub(resolved.hub_name or "", cfg)
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
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
        raise DataError(f"corpus {resolved.describe()} is empty (no documents): check the files")


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
