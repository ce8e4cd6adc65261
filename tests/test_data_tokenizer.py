"""Tokenizer: fixed special ids, exact round trip on real text, hash, batched encoding."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from test_data_common import VOCAB, corpus_slice, read_texts, tokenizer, tokenizer_path

from data import DataError
from data.config import CorpusConfig
from data.corpus import iter_documents
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, encode_documents_flat, train_tokenizer


def test_special_ids_and_vocab():
    tok = tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tok.vocab_size == VOCAB
    assert tok.describe()["hash"] == tok.hash and tok.hash.startswith("sha256:")


def test_round_trip_on_real_text_and_unseen_characters():
    tok = tokenizer()
    texts = read_texts(corpus_slice(100, 10)) + ["Tab\tand  two spaces\n\nÜnïcödé — ✓ 12345"]
    for text in texts:
        ids = tok.encode(text)
        assert UNK_ID not in ids  # byte fallback covers every character
        assert tok.decode(ids) == text


def test_batched_and_flat_encoding_agree():
    tok = tokenizer()
    texts = read_texts(corpus_slice(0, 40))[:12]
    single = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=2) == single
    flat, lengths = encode_documents_flat(tok, texts, add_bos=True)
    assert flat.dtype == np.uint32 and lengths.tolist() == [len(s) + 2 for s in single]
    pieces = np.split(flat, np.cumsum(lengths)[:-1])
    for piece, ids in zip(pieces, single):
        assert piece.tolist() == [BOS_ID] + ids + [EOS_ID]


def test_pickle_keeps_model_and_hash():
    tok = tokenizer()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.hash == tok.hash and clone.encode("to be or not") == tok.encode("to be or not")


def test_hash_differs_between_models(tmp_path):
    other = train_tokenizer(iter_documents(CorpusConfig(source=str(corpus_slice(0, 80)))), tmp_path,
                            vocab_size=VOCAB + 64, train_chars=200_000, num_threads=2)
    assert Tokenizer.load(other).hash != tokenizer().hash
    assert Tokenizer.load(tmp_path).hash == Tokenizer.load(other).hash  # a directory works too
    assert Tokenizer.load(tokenizer_path()).hash == tokenizer().hash  # stable on reload


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="junk.model.*not a sentencepiece model"):
        Tokenizer.load(junk)


def test_training_on_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(iter(["", "   \n  "]), tmp_path, vocab_size=300)
