"""Prepare: text -> shards -> loader reproduces every document; manifest; atomic reruns."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
from test_data_common import SEQ_LEN, corpus_slice, data_config, prepared, read_texts, tokenizer, tokenizer_path

import data.prepare as prep
from data import DataError
from data.config import CorpusConfig, PrepareConfig
from data.loader import TokenLoader
from data.corpus import input_change
from data.manifest import MANIFEST_NAME, read_manifest, write_json_atomic
from data.packing import IGNORE_INDEX, row_cu_seqlens
from data.tokenizer import EOS_ID


def _expected_docs(count: int, fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    texts = read_texts(corpus_slice(0, count))
    tok = tokenizer()
    is_val = prep.validation_mask(np.arange(len(texts)), fraction, seed=0)
    docs = [tok.encode(t) + [EOS_ID] for t in texts]
    return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]


def _read_all(cfg, split):
    with TokenLoader(cfg, batch_size=4, split=split, shuffle=False) as loader:
        return list(loader)


@pytest.mark.parametrize("split", ["train", "val"])
def test_round_trip_reproduces_every_document(tmp_path, split):
    ds = prepared()
    train_docs, val_docs = _expected_docs(40, 0.1)
    expected = train_docs if split == "train" else val_docs
    manifest = read_manifest(str(ds))
    batches = _read_all(data_config(tmp_path, ds, drop_last=False), split)
    rebuilt, current, n_seq = [], [], 0
    for b in batches:
        ids, labels = b["input_ids"], b["labels"]
        flat_cu = b["cu_seqlens"].tolist()
        assert flat_cu[0] == 0 and flat_cu[-1] == ids.numel()
        for row in range(ids.shape[0]):
            n_seq += 1
            cu = row_cu_seqlens(b["cu_seqlens"], ids.shape[0], SEQ_LEN)[row].tolist()
            assert cu[0] == 0 and cu[-1] == SEQ_LEN
            toks = ids[row].tolist()
            for a, e in zip(cu, cu[1:]):
                seg = toks[a:e]
                # labels: next token inside the segment, ignored at its last position
                assert labels[row, a:e - 1].tolist() == seg[1:]
                assert labels[row, e - 1].item() == IGNORE_INDEX
                current += seg
                if seg[-1] == EOS_ID:
                    rebuilt.append(current)
                    current = []
                else:  # a segment not ending a document must end the sequence
                    assert e == SEQ_LEN
    info = manifest["splits"][split]
    assert n_seq == info["sequences"] > 0
    assert rebuilt == expected[: len(rebuilt)]
    # what is left is the start of the next document; the rest of the stream was dropped
    tail = sum(len(d) for d in expected[len(rebuilt):]) - len(current)
    if current:
        assert current == expected[len(rebuilt)][: len(current)]
    assert tail == info["dropped_tokens"] < SEQ_LEN
    assert info["documents"] == len(expected)
    assert info["document_tokens"] == sum(map(len, expected))
    # text round trip through the tokenizer
    texts = [t for t, v in zip(read_texts(corpus_slice(0, 40)), prep.validation_mask(np.arange(40), 0.1, 0))
             if v == (split == "val")]
    assert [tokenizer().decode(d[:-1]) for d in rebuilt] == texts[: len(rebuilt)]


def test_manifest_records_what_the_loader_checks():
    m = read_manifest(str(prepared()))
    tok = tokenizer()
    assert m["tokenizer"]["hash"] == tok.hash and m["tokenizer"]["vocab_size"] == tok.vocab_size
    assert m["tokenizer"]["eos_id"] == EOS_ID and m["dtype"] == "uint16" and m["seq_len"] == SEQ_LEN
    assert m["columns"]["tokens"] == f"ndarray:uint16:{SEQ_LEN}"
    assert set(m["splits"]) == {"train", "val"}
    assert (prepared() / "tokenizer.model").read_bytes() == tokenizer_path().read_bytes()
    assert m["dataset_id"].startswith("sha256:")


def _cfg(out, **kw):
    return PrepareConfig(corpus=CorpusConfig(source=str(corpus_slice(0, 40))), tokenizer=str(tokenizer_path()),
                         out=str(out), seq_len=SEQ_LEN, val_fraction=0.1, docs_per_task=8, **kw)


def test_output_does_not_depend_on_worker_count(tmp_path):
    a = read_manifest(str(prepared(workers=2)))
    m = prep.prepare_dataset(_cfg(tmp_path / "one", num_workers=1), progress=False)
    assert m["dataset_id"] == a["dataset_id"]


def test_crash_leaves_nothing_complete_and_rerun_restarts(tmp_path, monkeypatch):
    out = tmp_path / "ds"

    class Crash(prep.Packer):
        def add(self, flat, lengths):
            if self.documents > 10:
                raise RuntimeError("simulated crash")
            yield from super().add(flat, lengths)

    monkeypatch.setattr(prep, "Packer", Crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prep.prepare_dataset(_cfg(out, num_workers=1), progress=False)
    assert not out.exists()  # never a directory that looks complete
    assert (tmp_path / "ds.partial" / "train").is_dir()
    with pytest.raises(DataError, match="interrupted prepare"):
        read_manifest(str(tmp_path / "ds.partial"))
    monkeypatch.undo()
    m = prep.prepare_dataset(_cfg(out, num_workers=1), progress=False)
    assert not (tmp_path / "ds.partial").exists()
    assert m["dataset_id"] == read_manifest(str(prepared()))["dataset_id"]
    # a rerun with the same settings is a no-op; other settings need --overwrite
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert prep.prepare_dataset(_cfg(out, num_workers=1), progress=False)["dataset_id"] == m["dataset_id"]
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other settings.*--overwrite"):
        prep.prepare_dataset(_cfg(out, num_workers=1, add_bos=True), progress=False)
    m2 = prep.prepare_dataset(_cfg(out, num_workers=1, add_bos=True, overwrite=True), progress=False)
    assert m2["add_bos"] and m2["dataset_id"] != m["dataset_id"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ds"]


def test_compressed_shards_read_back_identically(tmp_path):
    out = tmp_path / "zstd"
    prep.prepare_dataset(_cfg(out, num_workers=2, compression="zstd"), progress=False)
    assert list((out / "train").glob("*.mds.zstd"))
    plain = _read_all(data_config(tmp_path / "a", prepared()), "val")
    packed = _read_all(data_config(tmp_path / "b", out, verify="hash"), "val")
    assert len(plain) == len(packed) > 0
    for x, y in zip(plain, packed):
        assert np.array_equal(x["input_ids"], y["input_ids"])


def test_upload_tree_writes_manifest_last(tmp_path, monkeypatch):
    from streaming.base.storage.upload import LocalUploader

    src = prepared()
    order = []
    original = LocalUploader.upload_file
    monkeypatch.setattr(LocalUploader, "upload_file", lambda self, f: (order.append(f), original(self, f)))
    dst = tmp_path / "copy"
    dst.mkdir()
    prep._upload_tree(src, str(dst))
    # the manifest there is withdrawn first, and the real one uploaded last
    assert order[0] == order[-1] == MANIFEST_NAME and len(order) == len([p for p in src.rglob("*") if p.is_file()]) + 1
    assert json.loads((dst / MANIFEST_NAME).read_text())["dataset_id"] == read_manifest(str(src))["dataset_id"]
    assert sorted(p.name for p in (dst / "train").iterdir()) == sorted(p.name for p in (src / "train").iterdir())


def test_remote_rewrite_is_never_read_as_the_old_dataset(tmp_path, monkeypatch):
    """--overwrite of a remote dataset (a local directory standing in for the bucket): the old
    manifest is withdrawn before any new shard goes up, so a rewrite killed half-way reads as
    "being written", never as the old dataset over new shards; a reader that took the old
    manifest just before meets the new index.json, which the loader refuses."""
    from streaming.base.storage.upload import LocalUploader

    import data.loader as loader_mod
    from data.manifest import IncompleteDataset

    old, new, bucket = prepared(), prepared(40, 30), tmp_path / "bucket"
    prep._upload_tree(old, str(bucket))
    monkeypatch.setattr(loader_mod, "is_remote", lambda path: True)  # read as a remote: downloaded, then checked
    cfg = data_config(tmp_path / "ok", bucket, shuffle=False)
    with TokenLoader(cfg, 4) as ld:
        assert ld._cached and next(iter(ld))["input_ids"].shape == (4, SEQ_LEN)
    original, calls = LocalUploader.upload_file, []

    def killed_after_one_shard(self, name):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, name)

    monkeypatch.setattr(LocalUploader, "upload_file", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        prep._upload_tree(new, str(bucket))
    monkeypatch.setattr(LocalUploader, "upload_file", original)
    with pytest.raises(IncompleteDataset, match="is being \\(re\\)written .*wait for it to finish, or rerun it"):
        TokenLoader(data_config(tmp_path / "mid", bucket), 4)
    shutil.copyfile(old / MANIFEST_NAME, bucket / MANIFEST_NAME)  # the manifest a reader took before
    shutil.copyfile(new / "train" / "index.json", bucket / "train" / "index.json")
    with pytest.raises(DataError, match="train/index.json' does not match the manifest read with it: the dataset "
                                        "is being \\(re\\)written right now, or was damaged"):
        TokenLoader(data_config(tmp_path / "torn", bucket), 4)


def test_remote_manifest_that_cannot_be_read_is_not_taken_for_no_dataset(tmp_path, monkeypatch):
    """Only a missing manifest means "nothing there yet (or an interrupted upload): write it";
    expired credentials or a timeout stop prepare with the URL and the error, even with
    --overwrite, rather than upload over a dataset that may be complete."""
    from streaming.base.storage import CloudDownloader

    class ClientError(Exception):  # botocore's shape: the store's code in .response
        def __init__(self, code):
            super().__init__(f"An error occurred ({code})")
            self.response = {"Error": {"Code": code}}

    class StoreError(Exception):  # the other stores' shapes: a status under some name
        def __init__(self, **fields):
            super().__init__(f"store error {fields}")
            self.__dict__.update(fields)

    class FalsyResponse:  # a requests.Response of a 4xx is falsy; Azure's has no .get
        def __bool__(self):
            return False

    from http import HTTPStatus

    google_404 = StoreError(code=HTTPStatus.NOT_FOUND, response=FalsyResponse())  # google-api-core NotFound
    oci_404, azure_404 = StoreError(status=404), StoreError(status_code=404, response=object())
    answer = {}

    def download(cls, remote, local, timeout=60.0):
        raise answer["error"]

    uploads = []
    monkeypatch.setattr(CloudDownloader, "direct_download", classmethod(download))
    monkeypatch.setattr(prep, "_upload_tree", lambda staging, out: uploads.append(out))
    for overwrite in (False, True):
        for error in (ClientError("ExpiredToken"), TimeoutError("read timed out"), StoreError(code=403),
                      StoreError(status_code=403, response=object())):
            answer["error"] = error
            with pytest.raises(DataError, match=r"cannot read s3://bucket/ds/manifest\.json \((ClientError|TimeoutE"
                                                r"rror|StoreError): .*(ExpiredToken|timed out|403).*check the credentials"):
                prep.prepare_dataset(_cfg("s3://bucket/ds", num_workers=1, overwrite=overwrite), progress=False)
    assert uploads == []
    missing = (ClientError("404"), ClientError("NoSuchKey"), FileNotFoundError("gone"), google_404, oci_404, azure_404)
    for error in missing:
        answer["error"] = error
        prep.prepare_dataset(_cfg("s3://bucket/ds", num_workers=1), progress=False)
    assert uploads == ["s3://bucket/ds"] * len(missing)


def test_corpus_formats_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.corpus import count_documents, iter_documents, resolve_corpus

    texts = read_texts(corpus_slice(0, 40))[:6]
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    cases = [CorpusConfig(source=str(tmp_path / "a.parquet"), text_field="body"),
             CorpusConfig(source=str(tmp_path / "txt")),
             CorpusConfig(source=str(tmp_path / "txt" / "*.txt")),
             CorpusConfig(source=str(tmp_path / "b.jsonl"), text_field="body")]
    for cfg in cases:
        assert list(iter_documents(cfg)) == texts, cfg.source
        assert count_documents(cfg, resolve_corpus(cfg)) == len(texts)
    both = CorpusConfig(source=f"{tmp_path / 'b.jsonl'},{tmp_path / 'a.parquet'}", text_field="body",
                        max_documents=9)
    assert list(iter_documents(both)) == texts + texts[:3]


def test_overlapping_inputs_read_each_file_once_and_directories_skip_hidden_files(tmp_path, caplog):
    """A file named twice (a directory and a glob into it, a link, the same path again) is read
    once, at its first mention, with a warning; else its documents would be duplicated and land
    in both splits. A directory's hidden files (.ipynb_checkpoints copies) are not corpus,
    unless named explicitly."""
    from data.corpus import iter_documents, resolve_corpus

    texts = read_texts(corpus_slice(0, 40))[:4]
    d = tmp_path / "corpus"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    for name, doc in (("a.jsonl", texts[:2]), ("b.jsonl", texts[2:]), (".ipynb_checkpoints/a-checkpoint.jsonl",
                                                                     texts[:2]), (".hidden.jsonl", texts[:1])):
        (d / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in doc))
    (tmp_path / "link.jsonl").symlink_to(d / "a.jsonl")
    cfg = CorpusConfig(source=f"{d},{d}/*.jsonl,{tmp_path / 'link.jsonl'},{d}/b.jsonl")
    with caplog.at_level(logging.WARNING, logger="data.corpus"):
        files = [p for p, _ in resolve_corpus(cfg).files]
    assert files == [d / "a.jsonl", d / "b.jsonl"]
    assert "names 4 file(s) more than once" in caplog.text
    assert list(iter_documents(cfg)) == texts
    named = CorpusConfig(source=f"{d}/.ipynb_checkpoints/a-checkpoint.jsonl,{d}/b.jsonl")
    assert list(iter_documents(named)) == texts[:2] + texts[2:]
    (d / "a.jsonl").unlink()
    (d / "b.jsonl").unlink()
    with pytest.raises(DataError, match="holds no jsonl.*hidden ones are skipped"):
        resolve_corpus(CorpusConfig(source=str(d)))


def test_cli_tokenizer_prepare_inspect(tmp_path, capsys):
    from data.cli import main

    src = str(corpus_slice(0, 40))
    assert main(["tokenizer", "--input", src, "--out", str(tmp_path / "tok"), "--vocab-size", "400",
                 "--train-chars", "100000", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    tok = json.loads(captured.out)
    assert tok["vocab_size"] == 400 and tok["eos_id"] == EOS_ID
    assert tok["sample"]["method"] == "spread" and tok["sample"]["chars"] >= 100_000
    assert f"tokenizer sample: {tok['sample']['detail']}" in captured.err
    assert main(["prepare", "--input", src, "--tokenizer", tok["path"], "--out", str(tmp_path / "ds"),
                 "--seq-len", "64", "--val-fraction", "0.2", "--workers", "1", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seq_len"] == 64 and out["splits"]["val"]["sequences"] > 0
    assert main(["inspect", str(tmp_path / "ds"), "--verify", "hash"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["dataset_id"] == out["dataset_id"] and "ok:" in captured.err


def test_cli_prepare_warns_once_and_says_when_a_rerun_does_nothing(tmp_path, capsys, caplog):
    """A file named twice is warned about once per command (whole or --part all), as by
    `tokenizer`; a rerun with the same settings says that it kept the dataset, a real
    preparation does not."""
    from data.cli import main

    d = tmp_path / "corpus"
    d.mkdir()
    shutil.copyfile(corpus_slice(0, 40), d / "a.jsonl")
    common = ["prepare", "--input", f"{d},{d}/*.jsonl", "--tokenizer", str(tokenizer_path()), "--seq-len", "64",
              "--workers", "1", "--no-progress"]
    args = common + ["--out", str(tmp_path / "ds"), "--val-fraction", "0.2"]
    kept = "is already prepared with these settings"

    def run(argv: list[str]) -> tuple[str, str, int]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.corpus"):
            assert main(argv) == 0
        out, err = capsys.readouterr()
        return out, err, sum("names 1 file(s) more than once" in r.getMessage() for r in caplog.records)

    out, err, warned = run(args)
    assert warned == 1 and kept not in err
    first = json.loads(out)["dataset_id"]
    out, err, warned = run(args)
    assert warned == 1 and json.loads(out)["dataset_id"] == first
    assert f"linrnn-prepare: {tmp_path / 'ds'} {kept} (manifest {tmp_path / 'ds' / MANIFEST_NAME}): " \
           "nothing to do; --overwrite rewrites it" in err
    parts = common + ["--out", str(tmp_path / "parts"), "--val-fraction", "0", "--parts", "2", "--part", "all"]
    _, err, warned = run(parts)
    assert warned == 1 and kept not in err
    _, err, warned = run(parts)
    assert warned == 1 and err.count(kept) == 2 and "part-00001" in err


def test_demo_data_builds_once_and_follows_settings(tmp_path):
    from data.demo import build_demo_data

    paths = build_demo_data(tmp_path, vocab_size=400, seq_len=64, max_documents=30, progress=False)
    m = read_manifest(str(paths["data"]))
    assert m["seq_len"] == 64 and m["tokenizer"]["vocab_size"] == 400 and m["splits"]["val"]["sequences"] > 0
    stamp = paths["tokenizer"].stat().st_mtime_ns
    assert build_demo_data(tmp_path, vocab_size=400, seq_len=64, max_documents=30, progress=False) == paths
    assert paths["tokenizer"].stat().st_mtime_ns == stamp and read_manifest(str(paths["data"])) == m
    build_demo_data(tmp_path, vocab_size=400, seq_len=32, max_documents=30, progress=False)
    assert read_manifest(str(paths["data"]))["seq_len"] == 32


# ----------------------------------------------------------------------------- rerun by input identity


def _own_corpus(tmp_path):
    """A private copy of the test corpus in ``tmp_path/corpus`` (the tests edit it)."""
    (tmp_path / "corpus").mkdir()
    src = tmp_path / "corpus" / "docs.jsonl"
    shutil.copyfile(corpus_slice(0, 40), src)
    return src


def _cfg_of(source, out, **kw):
    base = dict(seq_len=SEQ_LEN, val_fraction=0.1, docs_per_task=8, num_workers=1)
    return PrepareConfig(corpus=CorpusConfig(source=str(source)), tokenizer=str(tokenizer_path()), out=str(out),
                         **{**base, **kw})


def _bump_mtime(path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_rerun_detects_changed_input_files(tmp_path, monkeypatch):
    src = _own_corpus(tmp_path)
    out = tmp_path / "ds"
    m = prep.prepare_dataset(_cfg_of(src, out), progress=False)
    st = src.stat()
    assert m["inputs"] == {"kind": "local", "files": [{"path": str(src.resolve()), "size": st.st_size,
                                                       "mtime_ns": st.st_mtime_ns}]}
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)  # the same file, spelled another way: reused
    assert prep.prepare_dataset(_cfg_of("corpus", out), progress=False) == m
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp
    # edited in place, same size: the modification time tells
    data = src.read_bytes()
    src.write_bytes(data.replace(b"the", b"THE", 1))
    _bump_mtime(src)
    with pytest.raises(prep.OutputMismatch, match=r"other input files: corpus file '.*docs\.jsonl' changed "
                                                  r"\(modified .* same size\); pass --overwrite.*another --out"):
        prep.prepare_dataset(_cfg_of(src, out), progress=False)
    with open(src, "ab") as f:  # appended to: the size tells
        f.write(b'{"text": "one more document"}\n')
    with pytest.raises(DataError, match=rf"docs\.jsonl' changed \(size {len(data)} -> \d+ bytes\)"):
        prep.prepare_dataset(_cfg_of(src, out), progress=False)
    m2 = prep.prepare_dataset(_cfg_of(src, out, overwrite=True), progress=False)
    assert m2["inputs"]["files"][0]["size"] == src.stat().st_size and m2["dataset_id"] != m["dataset_id"]
    assert prep.prepare_dataset(_cfg_of(src.parent, out), progress=False) == m2  # the directory: same file
    shutil.copyfile(corpus_slice(0, 40), src.parent / "more.jsonl")
    with pytest.raises(DataError, match=r"more\.jsonl' is new"):
        prep.prepare_dataset(_cfg_of(src.parent, out), progress=False)
    # settings are still compared first, and the message names them
    with pytest.raises(prep.OutputMismatch, match=r"other settings \(seq_len: 128 -> 64\)"):
        prep.prepare_dataset(_cfg_of(src, out, seq_len=64), progress=False)


def test_input_change_messages():
    local = {"kind": "local", "files": [{"path": "/c/a.jsonl", "size": 3, "mtime_ns": 1},
                                        {"path": "/c/b.jsonl", "size": 4, "mtime_ns": 1}]}
    assert input_change(local, json.loads(json.dumps(local))) is None  # as read back from a manifest
    gone = {"kind": "local", "files": local["files"][:1]}
    assert input_change(local, gone) == "corpus file '/c/b.jsonl' is no longer in the corpus"
    assert input_change(gone, local) == "corpus file '/c/b.jsonl' is new"
    both = {"kind": "local", "files": [{**f, "size": 9} for f in local["files"]]}
    assert input_change(local, both).endswith("changed (size 3 -> 9 bytes) (and 1 more changed files)")
    assert "another order" in input_change(local, {"kind": "local", "files": local["files"][::-1]})
    hub = {"kind": "hub", "name": "org/c4", "config": "en", "split": "train"}
    assert input_change(hub, hub) is None
    assert input_change(local, hub) == ("the corpus was 2 local files and is now hub:org/c4 (config 'en', "
                                        "split 'train')")


def test_manifest_without_input_record_is_reused_with_a_warning(tmp_path, caplog):
    out = tmp_path / "ds"
    shutil.copytree(prepared(), out)
    m = json.loads((out / MANIFEST_NAME).read_text())
    del m["inputs"]  # as written before input files were recorded
    write_json_atomic(out / MANIFEST_NAME, m)
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        assert prep.prepare_dataset(_cfg(out), progress=False) == m
    assert "did not record its input files" in caplog.text and "--overwrite" in caplog.text
    with pytest.raises(prep.OutputMismatch, match="other settings.*add_bos"):
        prep.prepare_dataset(_cfg(out, add_bos=True), progress=False)


def test_corpus_changed_while_prepare_reads_it_is_not_published(tmp_path, monkeypatch):
    src = _own_corpus(tmp_path)
    out = tmp_path / "ds"
    write = prep._write_splits

    def write_then_touch(*args, **kw):
        result = write(*args, **kw)
        _bump_mtime(src)
        return result

    monkeypatch.setattr(prep, "_write_splits", write_then_touch)
    with pytest.raises(DataError, match=r"corpus changed while prepare read it \(corpus file '.*docs\.jsonl' "
                                        r"changed.*rerun once its files are final"):
        prep.prepare_dataset(_cfg_of(src, out), progress=False)
    assert not out.exists()


def test_shard_size_is_a_setting_and_older_datasets_keep_their_default(tmp_path):
    """A rerun with another --shard-size is refused like any other setting; a dataset prepared
    before shard_size was recorded was made with the 64mb default, and is reused at it (also as
    a part: the group id is the same with or without the key)."""
    out = tmp_path / "ds"
    shutil.copytree(prepared(), out)
    m = read_manifest(str(out))
    assert m["settings"]["shard_size"] == 64 << 20
    with pytest.raises(prep.OutputMismatch, match=r"other settings \(shard_size: 67108864 -> 32768\)"):
        prep.prepare_dataset(_cfg(out, shard_size="32kb"), progress=False)
    del m["settings"]["shard_size"]  # as written before shard_size was recorded
    write_json_atomic(out / MANIFEST_NAME, m)
    assert prep.prepare_dataset(_cfg(out, shard_size="64MB"), progress=False) == m
    with pytest.raises(prep.OutputMismatch, match=r"other settings \(shard_size: 67108864 -> 32768\)"):
        prep.prepare_dataset(_cfg(out, shard_size="32kb"), progress=False)
    assert prep._part_record(m["settings"], m["inputs"], 0, 2) == prep._part_record(
        {**m["settings"], "shard_size": 64 << 20}, m["inputs"], 0, 2)
    with pytest.raises(DataError, match="--shard-size 'big' is not a shard size: give bytes or a size such as 64mb"):
        prep.prepare_dataset(_cfg(tmp_path / "bad", shard_size="big"), progress=False)
    assert not (tmp_path / "bad").exists()
