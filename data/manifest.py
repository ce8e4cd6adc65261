"""The manifest written beside prepared shards, and checks of a prepared dataset.

Layout of a prepared dataset::

    <root>/manifest.json      written last: its presence means "complete"
    <root>/tokenizer.model    copy of the tokenizer the shards were written with
    <root>/train/index.json   streaming's MDS index + shard.NNNNN.mds[.zstd]
    <root>/val/...            held-out documents (absent when val_fraction = 0)

The manifest records the tokenizer hash, vocab size and special ids, the token dtype,
seq_len, per-split document/token/sequence counts and the sha256 of each split's
index.json, so a run can refuse shards written for another tokenizer or seq_len, and a
swapped or truncated shard set is caught before training starts.

While a remote dataset is (re)uploaded its manifest is *withdrawn*: replaced by a marker
(``WITHDRAWN_FORMAT``) that readers refuse as "being written", since object stores give no
atomic rename and streaming's uploaders cannot delete. A reader that took the old manifest
just before still meets a new index.json, which ``check_index`` refuses.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from .config import local_path
from .errors import DataError

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"
FORMAT = "linrnn-packed-mds"
FORMAT_VERSION = 1
WITHDRAWN_FORMAT = FORMAT + "-withdrawn"
# the store's answers that mean "no such object" (S3 and S3-compatible stores, GCS via boto)
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


class IncompleteDataset(DataError):
    """No complete dataset: its manifest is missing (an interrupted prepare) or withdrawn (being rewritten)."""


class RemoteReadError(DataError):
    """A remote file could not be read for a reason other than its absence (credentials, network)."""


def withdrawn_manifest() -> dict[str, Any]:
    """The marker that stands in for a remote manifest while its dataset is rewritten."""
    return {"format": WITHDRAWN_FORMAT, "note": "being written by linrnn-prepare; the manifest is uploaded last"}


def is_remote(path: str) -> bool:
    return urllib.parse.urlparse(path).scheme not in ("", "file")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def dataset_id(manifest: dict[str, Any]) -> str:
    """Identity of a prepared dataset: its tokenizer, seq_len and exact shard indexes."""
    parts = [manifest["tokenizer"]["hash"], str(manifest["seq_len"])]
    parts += [f"{k}={v['index_sha256']}" for k, v in sorted(manifest["splits"].items())]
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; datasets are often shared
    os.replace(tmp, path)


def _not_found(error: BaseException | None) -> bool:
    """Whether a download failed because the object does not exist (not for want of access).
    Each store says it its own way: FileNotFoundError (streaming's own checks), botocore's
    ClientError (S3: ``response["Error"]["Code"]``), google-api-core's NotFound (``code`` 404),
    OCI's ServiceError (``status`` 404), Azure's ResourceNotFoundError (``status_code`` 404)."""
    while error is not None:
        if isinstance(error, FileNotFoundError):
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict) and str(response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES:
            return True
        if any(_is_404(getattr(error, name, None)) for name in ("code", "status", "status_code")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _is_404(value: object) -> bool:
    try:
        return int(value) == 404  # type: ignore[call-overload]  (an int or an HTTPStatus)
    except (TypeError, ValueError):
        return False


def fetch_file(root: str, relpath: str, cache_dir: str | os.PathLike, timeout: float = 60.0) -> Path:
    """A file of a prepared dataset as a local path (remote files are downloaded to cache); the
    path does not exist when the file does not. RemoteReadError when the store cannot be read."""
    if not is_remote(root):
        return Path(urllib.parse.urlparse(root).path if root.startswith("file:") else root) / relpath
    from streaming.base.storage import CloudDownloader

    local = Path(cache_dir) / relpath
    if local.exists():
        local.unlink()  # always re-read remote metadata: it may have been re-prepared
    local.parent.mkdir(parents=True, exist_ok=True)
    remote = root.rstrip("/") + "/" + relpath
    try:
        CloudDownloader.direct_download(remote, str(local), timeout)
    except Exception as e:
        if _not_found(e):
            return local
        raise RemoteReadError(f"cannot read {remote} ({type(e).__name__}: {str(e)[:200]}): check the credentials "
                              "and network access and retry (on S3 a missing object also reads as 403 without "
                              "s3:ListBucket permission)") from None
    return local


def read_manifest(root: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load and sanity-check ``<root>/manifest.json``; DataError naming the file otherwise
    (IncompleteDataset when it is missing or withdrawn, RemoteReadError when unreachable)."""
    if not is_remote(root) and not os.path.isdir(root):
        raise DataError(f"prepared dataset {root!r} does not exist ({os.path.abspath(root)}: relative paths are "
                        "read from the current directory): check data.sources[].path or run "
                        "`linrnn-prepare prepare --out ...` first")
    cache = cache_dir or tempfile.mkdtemp(prefix="linrnn-manifest-")
    path = fetch_file(root, MANIFEST_NAME, cache)
    where = join_path(root, MANIFEST_NAME) if is_remote(root) else str(path)
    if not path.is_file():
        raise IncompleteDataset(f"{where!r} is missing: {root!r} is not a complete prepared dataset "
                                "(an interrupted prepare leaves no manifest); rerun `linrnn-prepare prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where!r} is unreadable or corrupt ({e}): re-prepare the dataset "
                        "(`linrnn-prepare prepare --overwrite`)") from None
    if isinstance(manifest, dict) and manifest.get("format") == WITHDRAWN_FORMAT:
        raise IncompleteDataset(f"{root!r} is being (re)written by `linrnn-prepare prepare` (its manifest is "
                                "withdrawn until every shard is uploaded), or that prepare was interrupted: wait "
                                "for it to finish, or rerun it")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where!r} is not a {FORMAT} manifest: point data.sources at a "
                        "`linrnn-prepare prepare` output")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where!r} has format version {manifest.get('format_version')}, this "
                        f"code reads {FORMAT_VERSION}: re-prepare the dataset")
    return manifest


PART_PREFIX = "part-"


def part_name(part: int) -> str:
    """The directory of one part of a preparation split over jobs (``PrepareConfig.parts``)."""
    return f"{PART_PREFIX}{part:05d}"


def join_path(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_dataset(root: str, cache_dir: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """[(path, manifest)] of a prepared dataset: itself, or, for the ``<out>`` of a preparation
    in parts, every part in order, all of one preparation and all complete; else DataError."""
    try:
        root = local_path(root)  # file:///dir is /dir
    except ValueError as e:
        raise DataError(str(e)) from None
    try:
        return [(root, read_manifest(root, Path(cache_dir) / "whole"))]
    except DataError as whole_error:
        first = join_path(root, part_name(0))
        try:
            manifest = read_manifest(first, Path(cache_dir) / part_name(0))
        except DataError:
            raise whole_error from None
        if not isinstance(manifest.get("part"), dict):
            raise whole_error from None
    group, count = manifest["part"]["group"], manifest["part"]["count"]
    found = [(first, manifest)]
    for i in range(1, count):
        path = join_path(root, part_name(i))
        try:
            m = read_manifest(path, Path(cache_dir) / part_name(i))
        except DataError:
            raise DataError(f"part {i} of the {count} parts of {root!r} is not complete ({path!r} has no "
                            f"manifest): run its prepare (--part {i} --parts {count}, same options), then "
                            "train") from None
        if (m.get("part") or {}).get("group") != group or m["part"].get("index") != i:
            raise DataError(f"{path!r} belongs to another preparation than {first!r} (other settings, input "
                            "files or part count): re-prepare every part with the same options")
        found.append((path, m))
    return found


def check_compatible(manifest: dict[str, Any], root: str, *, seq_len: int,
                     tokenizer_hash: str | None, split: str) -> None:
    """Refuse a dataset written for another seq_len or tokenizer, or lacking ``split``."""
    where = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    if manifest["seq_len"] != seq_len:
        raise DataError(
            f"{where} was prepared with seq_len={manifest['seq_len']} but the run uses "
            f"data.seq_len={seq_len}: set data.seq_len={manifest['seq_len']} or re-prepare the "
            f"dataset with --seq-len {seq_len}")
    if tokenizer_hash is not None and manifest["tokenizer"]["hash"] != tokenizer_hash:
        raise DataError(
            f"{where} was written with tokenizer {manifest['tokenizer']['hash'][:19]}... but the run's "
            f"tokenizer is {tokenizer_hash[:19]}...: use the tokenizer.model stored beside the shards "
            "(data.tokenizer) or re-prepare the dataset with the run's tokenizer")
    if split not in manifest["splits"]:
        have = ", ".join(sorted(manifest["splits"])) or "none"
        raise DataError(f"{where} has no split {split!r} (it has: {have}): prepare with "
                        "--val-fraction > 0 for a validation split, or fix the split name")


def verify_split(split_dir: str | os.PathLike, split_info: dict[str, Any], level: str) -> None:
    """Check a local split directory against the manifest: index hash, shard sizes, hashes.

    ``level`` is "none", "size" (cheap: stat every shard) or "hash" (read every byte).
    """
    if level == "none":
        return
    split_dir = Path(split_dir)
    index_path = split_dir / INDEX_NAME
    if not index_path.is_file():
        raise DataError(f"{str(index_path)!r} is missing: the dataset is incomplete; rerun "
                        "`linrnn-prepare prepare` or re-copy the dataset")
    if not _index_matches(index_path, split_info):
        raise DataError(f"{str(index_path)!r} does not match its manifest (shards replaced or edited): "
                        "re-prepare or re-copy the whole dataset directory")
    try:
        shards = json.loads(index_path.read_text())["shards"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise DataError(f"{str(index_path)!r} is corrupt ({e}): re-prepare the dataset") from None
    for shard in shards:
        info = shard["zip_data"] or shard["raw_data"]
        path = split_dir / info["basename"]
        if not path.is_file():
            raise DataError(f"shard {str(path)!r} listed in {INDEX_NAME} is missing: re-copy the "
                            "dataset or rerun `linrnn-prepare prepare`")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise DataError(f"shard {str(path)!r} has {size} bytes but {INDEX_NAME} records "
                            f"{info['bytes']}: the file is truncated or corrupt; re-copy the dataset "
                            "or rerun `linrnn-prepare prepare --overwrite`")
        if level == "hash":
            _check_hashes(path, info)


def check_index(index_path: str | os.PathLike, split_info: dict[str, Any], remote_split: str) -> None:
    """Refuse a remote split's downloaded index.json unless it is the one its manifest records:
    a dataset rewritten (or damaged) after its manifest was read would mix two shard sets."""
    if not _index_matches(index_path, split_info):
        raise DataError(f"{join_path(remote_split, INDEX_NAME)!r} does not match the manifest read with it: the "
                        "dataset is being (re)written right now, or was damaged: wait for its prepare to finish "
                        "and retry, or rerun `linrnn-prepare prepare --overwrite`")


def _index_matches(index_path: str | os.PathLike, split_info: dict[str, Any]) -> bool:
    """Whether a split's index.json is the one its manifest recorded (by SHA-256)."""
    return sha256_file(index_path) == split_info["index_sha256"]


def _check_hashes(path: Path, info: dict[str, Any]) -> None:
    hashes = info.get("hashes") or {}
    if "xxh64" not in hashes:
        raise DataError(f"{str(path)!r} has no recorded xxh64 hash to verify: use data.verify=size "
                        "or re-prepare the dataset")
    import xxhash

    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != hashes["xxh64"]:
        raise DataError(f"shard {str(path)!r} fails its xxh64 check: the file is corrupt; re-copy "
                        "the dataset or rerun `linrnn-prepare prepare --overwrite`")
