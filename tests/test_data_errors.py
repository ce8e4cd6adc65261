"""Every bad input stops with one DataError naming the file and the fix; the CLI exits 2."""
from __future__ import annotations

import fcntl
import shutil

import pytest
from test_data_common import SEQ_LEN, VOCAB, corpus_slice, data_config, prepared, read_texts, tokenizer_path

from data import DataError
from data.cli import main
from data.config import CorpusConfig, PrepareConfig
from data.corpus import iter_documents, resolve_corpus
from data.loader import TokenLoader, data_info
from data.prepare import prepare_dataset


def _prep(tmp_path, source, **kw):
    cfg = PrepareConfig(corpus=CorpusConfig(source=str(source), **kw), tokenizer=str(tokenizer_path()),
                        out=str(tmp_path / "out"), seq_len=SEQ_LEN, val_fraction=0.0, num_workers=1)
    return prepare_dataset(cfg, progress=False)


# ----------------------------------------------------------------------------- corpus / prepare


def test_missing_corpus_paths(tmp_path):
    with pytest.raises(DataError, match=r"'/no/such/file.jsonl' does not exist"):
        resolve_corpus(CorpusConfig(source="/no/such/file.jsonl"))
    with pytest.raises(DataError, match="no files match"):
        resolve_corpus(CorpusConfig(source=str(tmp_path / "*.parquet")))
    (tmp_path / "notes.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="holds no jsonl"):
        resolve_corpus(CorpusConfig(source=str(tmp_path)))


def test_unreadable_corpus_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*as json"):
        list(iter_documents(CorpusConfig(source=str(bad))))


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        _prep(tmp_path, empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataError, match="fewer than one sequence"):
        _prep(tmp_path, blank)
    assert not (tmp_path / "out").exists()


def test_missing_text_field(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"body": "hello", "id": 1}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl.*no field 'text'.*body, id.*--text-field"):
        _prep(tmp_path, f)


def test_output_that_is_not_a_dataset_is_not_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset, so it is not replaced"):
        _prep(tmp_path, corpus_slice(0, 40))
    cfg = PrepareConfig(corpus=CorpusConfig(source=str(corpus_slice(0, 40))), tokenizer=str(tokenizer_path()),
                        out=str(tmp_path / "out"), seq_len=SEQ_LEN, overwrite=True)
    with pytest.raises(DataError, match=r"not even with --overwrite"):  # it used to delete the directory
        prepare_dataset(cfg, progress=False)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_concurrent_prepare_to_the_same_output(tmp_path):
    with open(tmp_path / ".out.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another prepare is writing"):
            _prep(tmp_path, corpus_slice(0, 40))


@pytest.mark.parametrize("missing,add_bos", [("eos", False), ("bos", True)])
def test_tokenizer_without_the_special_ids_prepare_needs(tmp_path, capsys, missing, add_bos):
    """A tokenizer without EOS (or without BOS with --add-bos) stops prepare at once with one
    message naming the file, not with a traceback from a pool worker."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(read_texts(corpus_slice(0, 40))), model_writer=model, vocab_size=120, pad_id=0,
        unk_id=1, bos_id=2 if missing == "eos" else -1, eos_id=3 if missing == "bos" else -1, minloglevel=3)
    path = tmp_path / "special.model"
    path.write_bytes(model.getvalue())
    args = ["prepare", "--input", str(corpus_slice(0, 40)), "--tokenizer", str(path), "--out",
            str(tmp_path / "out"), "--workers", "1", "--no-progress"] + (["--add-bos"] if add_bos else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"special.model' has no {missing.upper()} id" in err
    assert ("drop --add-bos" in err) == add_bos and "train the tokenizer with" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- shards / loader


def _copy(tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(prepared(), dst)
    return dst


def test_missing_dataset_or_manifest(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist.*linrnn-prepare"):
        data_info(data_config(tmp_path, tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)  # a relative path names the directory it was read from
    with pytest.raises(DataError, match=f"'runs/data' does not exist \\({tmp_path}/runs/data: relative paths"):
        data_info(data_config(tmp_path, "runs/data"))
    ds = _copy(tmp_path)
    (ds / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json.*interrupted prepare"):
        TokenLoader(data_config(tmp_path, ds), 2)
    with pytest.raises(DataError, match="data.sources is empty"):
        data_info(data_config(tmp_path))


def test_corrupt_manifest(tmp_path):
    ds = _copy(tmp_path)
    (ds / "manifest.json").write_text("{ truncated")
    with pytest.raises(DataError, match="manifest.json.*corrupt"):
        data_info(data_config(tmp_path, ds))


def test_shards_from_another_tokenizer(tmp_path):
    from data.tokenizer import train_tokenizer

    other = train_tokenizer(iter_documents(CorpusConfig(source=str(corpus_slice(0, 80)))), tmp_path / "tok",
                            vocab_size=VOCAB - 64, train_chars=200_000, num_threads=2)
    with pytest.raises(DataError, match="manifest.json was written with tokenizer.*re-prepare"):
        TokenLoader(data_config(tmp_path, prepared(), tokenizer=str(other)), 2)
    # the tokenizer stored beside the shards is accepted
    assert data_info(data_config(tmp_path, prepared(), tokenizer=str(prepared() / "tokenizer.model")))


def test_shards_with_another_seq_len(tmp_path):
    with pytest.raises(DataError, match=f"seq_len={SEQ_LEN} but the run uses data.seq_len=64"):
        TokenLoader(data_config(tmp_path, prepared(), seq_len=64), 2)


def test_mixture_of_datasets_with_different_tokenizers(tmp_path):
    ds = _copy(tmp_path)
    import json

    m = json.loads((ds / "manifest.json").read_text())
    m["tokenizer"]["hash"] = "sha256:" + "0" * 64
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"ds/manifest.json was written with tokenizer sha256:0000"):
        data_info(data_config(tmp_path, prepared(), ds))


def test_truncated_shard(tmp_path):
    ds = _copy(tmp_path)
    shard = next((ds / "train").glob("shard.*.mds"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{shard.name}.*truncated or corrupt"):
        TokenLoader(data_config(tmp_path, ds), 2)


def test_missing_shard(tmp_path):
    ds = _copy(tmp_path)
    shard = next((ds / "train").glob("shard.*.mds"))
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name}.*missing"):
        TokenLoader(data_config(tmp_path, ds), 2)


def test_corrupt_shard_same_size_is_caught_by_hash(tmp_path):
    ds = _copy(tmp_path)
    shard = next((ds / "train").glob("shard.*.mds"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard.name}.*xxh64"):
        TokenLoader(data_config(tmp_path, ds, verify="hash"), 2)


def test_missing_split(tmp_path):
    no_val = tmp_path / "noval"
    prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=str(corpus_slice(0, 40))),
                                  tokenizer=str(tokenizer_path()), out=str(no_val), seq_len=SEQ_LEN,
                                  val_fraction=0.0, num_workers=1), progress=False)
    with pytest.raises(DataError, match="no split 'val'.*--val-fraction"):
        TokenLoader(data_config(tmp_path, no_val), 2, split="val")


# ----------------------------------------------------------------------------- CLI


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    rc = main(["prepare", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tokenizer_path()),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "missing.jsonl" in err and "\n" not in err
    rc = main(["inspect", str(tmp_path / "nothing")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["prepare", "--seq-len", "0"], "--seq-len must be >= 2, got 0"),  # was an AssertionError
    (["prepare", "--val-fraction", "1.5"], "--val-fraction must be < 1.0, got 1.5"),
    (["prepare", "--workers", "-1"], "--workers must be >= 0, got -1"),
    (["tokenizer", "--vocab-size", "5"], "--vocab-size must be >= 16, got 5"),
])
def test_cli_checks_option_ranges_before_reading_anything(tmp_path, capsys, args, message):
    extra = ["--tokenizer", str(tokenizer_path())] if args[0] == "prepare" else []
    rc = main([*args, "--input", str(corpus_slice(0, 10)), "--out", str(tmp_path / "o"), *extra])
    assert rc == 2 and capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["demo-corpus", "tokenizer", "prepare", "inspect", "demo"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: linrnn-prepare" in capsys.readouterr().out
