"""sentencepiece tokenizers: train on a corpus sample, load, hash, encode in batches.

Special ids are fixed for every tokenizer this project trains, so configs and models can
rely on them: ``pad=0, bos=1, eos=2, unk=3``. Byte fallback is on by default, so any text
(newlines, rare characters) encodes without ``unk`` and ``decode(encode(text)) == text``
(normalisation is the identity and whitespace is kept as is).

A tokenizer is identified by ``tokenizer_hash`` (sha256 of the model file bytes); prepared
shards record it, and the loader refuses shards whose hash differs from the run's.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import CorpusConfig, TokenizerTrainConfig
from .errors import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_FILENAME = "tokenizer.model"
# sentencepiece skips training "sentences" longer than this; longer lines are cut first.
_MAX_SENTENCE_CHARS = 4096


def tokenizer_hash(model_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(model_bytes).hexdigest()


class Tokenizer:
    """A loaded sentencepiece model; picklable (worker processes get the model bytes)."""

    def __init__(self, model_bytes: bytes, path: str | None = None) -> None:
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.path = path
        self.hash = tokenizer_hash(model_bytes)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
            where = path or "<bytes>"
            raise DataError(
                f"{where} is not a sentencepiece model ({e}); pass the .model file written by "
                "`linrnn-prepare tokenizer`") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        p = Path(path)
        if p.is_dir():
            p = p / MODEL_FILENAME
        if not p.is_file():
            raise DataError(
                f"tokenizer file {str(p)!r} does not exist: train one with "
                "`linrnn-prepare tokenizer --out DIR` or fix the path")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise DataError(f"tokenizer file {str(p)!r} is not readable ({e}): fix its permissions") from None
        return cls(data, str(p))

    def __getstate__(self) -> dict:
        return {"model_bytes": self.model_bytes, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"], state["path"])

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self.sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self.sp.unk_id())

    def check_specials(self, add_bos: bool) -> None:
        """Refuse, before any work, a model that lacks the EOS ending every document (or the BOS
        that ``add_bos`` puts in front): sentencepiece would fail inside a pool worker."""
        where = self.path or "the tokenizer"
        if self.eos_id < 0:
            raise DataError(f"tokenizer {where!r} has no EOS id, which prepare appends to every document: train "
                            "the tokenizer with an eos id (`linrnn-prepare tokenizer` uses eos=2)")
        if add_bos and self.bos_id < 0:
            raise DataError(f"tokenizer {where!r} has no BOS id for --add-bos: drop --add-bos, or train the "
                            "tokenizer with a bos id (`linrnn-prepare tokenizer` uses bos=1)")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """Encode many texts with sentencepiece's own thread pool (0 threads: all cores)."""
        threads = num_threads if num_threads > 0 else (os.cpu_count() or 1)
        return self.sp.encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"hash": self.hash, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}


def encode_documents_flat(tok: Tokenizer, texts: list[str], add_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents, each followed by EOS (and preceded by BOS when asked).

    Returns the concatenated ids (uint32) and each document's length in tokens, the cheap
    form to move between processes and to pack.
    """
    ids = tok.sp.encode(texts, add_bos=add_bos, add_eos=True, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


# ----------------------------------------------------------------------------- workers

_WORKER_TOKENIZER: Tokenizer | None = None


def init_worker(model_bytes: bytes) -> None:
    """Pool initializer: load the model once per worker process."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(model_bytes)


def encode_task(task: tuple[Any, list[str], bool]) -> tuple[Any, np.ndarray, np.ndarray, int]:
    """Worker entry: (key, texts, add_bos) -> (key, flat ids, lengths, characters).

    The key (prepare passes the documents' corpus indices) comes back unchanged.
    """
    key, texts, add_bos = task
    assert _WORKER_TOKENIZER is not None, "init_worker was not called"
    flat, lengths = encode_documents_flat(_WORKER_TOKENIZER, texts, add_bos)
    return key, flat, lengths, sum(map(len, texts))


# ----------------------------------------------------------------------------- training


def _training_sentences(documents: Iterable[str], max_chars: int, progress: bool = False,
                        stats: dict[str, int] | None = None) -> Iterator[str]:
    """Lines of the documents, long ones cut at spaces, until ``max_chars`` characters.

    ``stats`` gets the documents and characters taken, for the report.
    """
    from tqdm import tqdm

    stats = {} if stats is None else stats
    stats.update(documents=0, chars=0)

    def counted() -> Iterator[str]:
        for doc in documents:
            stats["documents"] += 1
            yield doc

    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="tokenizer sample", disable=not progress,
              mininterval=1.0, dynamic_ncols=True) as bar:
        for piece in _cut_lines(counted(), max_chars):
            bar.update(len(piece))
            stats["chars"] += len(piece)
            yield piece


def _cut_lines(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for doc in documents:
        for line in doc.split("\n"):
            while line:
                piece = line
                if len(piece) > _MAX_SENTENCE_CHARS:
                    cut = piece.rfind(" ", 0, _MAX_SENTENCE_CHARS)
                    cut = cut if cut > 0 else _MAX_SENTENCE_CHARS
                    piece, line = piece[:cut], piece[cut:]
                else:
                    line = ""
                if piece.strip():
                    yield piece
                    seen += len(piece)
                    if seen >= max_chars:
                        return


def train_tokenizer(documents: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int,
                    model_type: str = "bpe", train_chars: int = 50_000_000,
                    character_coverage: float = 0.9995, byte_fallback: bool = True,
                    split_digits: bool = True, num_threads: int = 0, progress: bool = False,
                    stats: dict[str, int] | None = None) -> Path:
    """Train a sentencepiece model on the first ``train_chars`` characters of ``documents``
    (sentencepiece samples and shuffles up to 2M lines of them); write ``out_dir/tokenizer.model``.

    Pass a corpus through ``train_tokenizer_on_corpus`` to train on a sample spread over it
    rather than on its start. ``stats`` gets the documents and characters used. The model is
    written to a temp file and renamed, so a crash never leaves a half model.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} exists and is not a directory: the tokenizer goes into "
                        f"<out>/{MODEL_FILENAME}; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    sentences = _training_sentences(documents, train_chars, progress, stats)
    try:
        first = next(sentences)
    except StopIteration:
        raise DataError("the tokenizer training corpus has no text: check --input and --text-field") from None
    threads = num_threads if num_threads > 0 else (os.cpu_count() or 1)
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".model", dir=out)
    os.close(fd)
    try:
        with open(tmp, "wb") as writer:
            spm.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], sentences), model_writer=writer,
                vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                byte_fallback=byte_fallback, split_digits=split_digits,
                pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, max_sentence_length=4 * _MAX_SENTENCE_CHARS,
                input_sentence_size=2_000_000, shuffle_input_sentence=True,
                num_threads=threads, minloglevel=2)
        final = out / MODEL_FILENAME
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except RuntimeError as e:
        fix = ("raise --vocab-size (it must hold every character kept) or lower --character-coverage"
               if "smaller than required_chars" in str(e) else
               "lower --vocab-size or give it more text (--train-chars)")
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model ({e}); {fix}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final


def train_tokenizer_on_corpus(corpus: CorpusConfig, out_dir: str | os.PathLike, train: TokenizerTrainConfig,
                              *, progress: bool = False,
                              log: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train on about ``train.train_chars`` characters drawn from all over ``corpus``.

    Taking the corpus's start would bias the vocabulary towards whatever the corpus is sorted
    by; ``data.corpus.sample_documents`` draws whole documents from seeded random places where
    the files allow it and says when it must fall back to the start. ``log`` gets that line.
    Returns the model path and the sample's description (method, seed, documents, chars).
    """
    from .corpus import sample_documents

    sample = sample_documents(corpus, train.train_chars, train.sample_seed)
    if log is not None:
        log(f"tokenizer sample: {sample.detail}")
    stats: dict[str, int] = {}
    path = train_tokenizer(sample.documents, out_dir, vocab_size=train.vocab_size, model_type=train.model_type,
                           train_chars=train.train_chars, character_coverage=train.character_coverage,
                           byte_fallback=train.byte_fallback, split_digits=train.split_digits,
                           num_threads=train.num_threads, progress=progress, stats=stats)
    return path, {**sample.describe(), **stats}
