"""Tokenizer: fixed special ids, exact round trip on real text, hash, batched encoding; the
training sample is drawn from all over the corpus, deterministically per seed."""
from __future__ import annotations

import gzip
import itertools
import json
import pickle
import random

import numpy as np
import pytest
from test_data_common import VOCAB, corpus_slice, read_texts, tokenizer, tokenizer_path

from data import DataError
from data.config import CorpusConfig, TokenizerTrainConfig
from data.corpus import iter_documents, sample_documents
from data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    encode_documents_flat,
    train_tokenizer,
    train_tokenizer_on_corpus,
)


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
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="exists and is not a directory"):
        train_tokenizer(iter(["some text"]), tmp_path / "file", vocab_size=300)


# ----------------------------------------------------------------------------- training sample

_GREEK = set("αβγδεζηθικλμνξοπρστυφχψωάέήίόύώς")


def _sorted_corpus(path) -> list[str]:
    """400 documents sorted by language: English words, then Greek ones (about 230k characters)."""
    rng = random.Random(0)
    english = ["stone", "river", "candle", "morning", "garden", "silver", "harbor", "window", "thunder", "meadow"]
    greek = ["θάλασσα", "βουνό", "φεγγάρι", "ποτάμι", "λουλούδι", "σύννεφο", "αστέρι", "δέντρο", "πέτρα", "ουρανός"]
    docs = [" ".join(rng.choice(words) for _ in range(80)) for words in (english, greek) for _ in range(200)]
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return docs


def _greek_pieces(path) -> list[str]:
    sp = Tokenizer.load(path).sp
    return [p for p in map(sp.id_to_piece, range(sp.get_piece_size())) if _GREEK & set(p)]


def test_training_sample_reaches_the_end_of_a_sorted_corpus(tmp_path):
    src = tmp_path / "sorted.jsonl"
    docs = _sorted_corpus(src)
    train = TokenizerTrainConfig(vocab_size=320, train_chars=40_000, num_threads=1)
    lines = []
    path, sample = train_tokenizer_on_corpus(CorpusConfig(source=str(src)), tmp_path / "spread", train,
                                             log=lines.append)
    assert sample["method"] == "spread" and sample["seed"] == 0
    assert 0 < sample["blocks_read"] < sample["blocks"] and 40_000 <= sample["chars"] < 45_000
    assert lines == [f"tokenizer sample: {sample['detail']}"] and "seed 0" in lines[0]
    assert len(_greek_pieces(path)) >= 5  # pieces only the second half of the corpus has
    # the first 40k characters alone, which the sample used to be, hold no Greek at all
    prefix = train_tokenizer(docs, tmp_path / "prefix", vocab_size=320, train_chars=40_000, num_threads=1)
    assert _greek_pieces(prefix) == []


def test_training_sample_is_deterministic_per_seed(tmp_path):
    src = tmp_path / "sorted.jsonl"
    docs = _sorted_corpus(src)
    cfg = CorpusConfig(source=str(src))

    def draw(seed: int) -> list[int]:
        return [docs.index(d) for d in itertools.islice(sample_documents(cfg, 40_000, seed).documents, 60)]

    first = draw(0)
    assert draw(0) == first and draw(1) != first
    assert len(set(first)) == 60 and max(first) >= 200  # whole documents, each once, from both halves
    train = TokenizerTrainConfig(vocab_size=320, train_chars=40_000, num_threads=1, sample_seed=3)
    a, info_a = train_tokenizer_on_corpus(cfg, tmp_path / "a", train)
    b, info_b = train_tokenizer_on_corpus(cfg, tmp_path / "b", train)
    assert Tokenizer.load(a).hash == Tokenizer.load(b).hash and info_a == info_b and info_a["seed"] == 3


def test_sample_of_a_small_corpus_is_all_of_it_in_every_addressable_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = read_texts(corpus_slice(0, 40))
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet", row_group_size=7)
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts[:10]):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    for name, part in (("b1.jsonl", texts[:25]), ("b2.jsonl", texts[25:])):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    cases = [CorpusConfig(source=str(tmp_path / "a.parquet"), text_field="body"),
             CorpusConfig(source=str(tmp_path / "txt")),
             CorpusConfig(source=str(tmp_path / "txt"), text_sample_by="line"),
             CorpusConfig(source=f"{tmp_path / 'b1.jsonl'},{tmp_path / 'b2.jsonl'}")]
    for cfg in cases:
        sample = sample_documents(cfg, 10**9)
        got = list(sample.documents)
        assert sample.info["method"] == "spread", cfg
        assert sorted(got) == sorted(iter_documents(cfg)), cfg
        assert sample.info["blocks_read"] == sample.info["blocks"]
    # a part of a parquet file: whole rows, none twice, not just the first ones
    part = list(itertools.islice(sample_documents(cases[0], 1000, seed=5).documents, 12))
    assert len(set(part)) == 12 and set(part) <= set(texts) and part != texts[:12]


def test_sample_falls_back_to_the_start_where_files_allow_only_that(tmp_path):
    texts = read_texts(corpus_slice(0, 40))[:5]
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sample = sample_documents(CorpusConfig(source=str(gz)), 1000)
    assert sample.info["method"] == "prefix" and "docs.jsonl.gz' is compressed" in sample.detail
    assert list(sample.documents) == texts
    hub = sample_documents(CorpusConfig(source="hub:someone/corpus"), 1000)  # lazy: never opened
    assert hub.info == {"method": "prefix", "reason": "hub:someone/corpus is read as a stream"}
    limited = sample_documents(CorpusConfig(source=str(corpus_slice(0, 40)), max_documents=3), 1000)
    assert limited.info["method"] == "prefix" and "max_documents=3" in limited.detail
    with pytest.raises(DataError, match="sample seed must be >= 0.*--sample-seed"):
        sample_documents(CorpusConfig(source=str(gz)), 1000, seed=-1)


def test_sample_names_a_bad_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*as json.*--format"):
        list(sample_documents(CorpusConfig(source=str(bad)), 1000).documents)
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet' has no field 'text' \(its fields: body\).*--text-field"):
        list(sample_documents(CorpusConfig(source=str(tmp_path / "p.parquet")), 1000).documents)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        list(sample_documents(CorpusConfig(source=str(empty)), 1000).documents)
