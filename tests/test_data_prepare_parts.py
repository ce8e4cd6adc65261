"""Prepare in parts (``--parts N --part I``, ``--part all``): every document once, in corpus
order, local files by byte ranges and hub datasets by files or rows; parts read whole as one
dataset; remote parts and a part without held-out sequences."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
from test_data_common import corpus_slice, data_config, read_texts, tokenizer_path

import data.prepare as prep
from data import DataError
from data.config import CorpusConfig, PrepareConfig
from data.loader import TokenLoader
from data.manifest import MANIFEST_NAME, read_manifest


def _mixed_corpus(tmp_path) -> tuple[str, list[str]]:
    """A corpus of every file kind: byte-addressable (jsonl, parquet, txt lines) and not (gzip)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = read_texts(corpus_slice(0, 40))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:15]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[15:20]))
    pq.write_table(pa.table({"text": texts[20:40]}), tmp_path / "c.parquet", row_group_size=3)
    files = [tmp_path / n for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    return ",".join(map(str, files)), texts
def test_corpus_parts_hold_every_document_once_in_corpus_order(tmp_path):
    from data.corpus import iter_documents

    source, texts = _mixed_corpus(tmp_path)
    cfg = CorpusConfig(source=source)
    assert list(iter_documents(cfg)) == texts
    for parts in (2, 3, 7):
        got = [list(iter_documents(cfg, part=i, parts=parts)) for i in range(parts)]
        assert sum(got, []) == texts, parts
        assert all(got), parts  # every part has documents
    with pytest.raises(DataError, match=r"part \d+ of 40 of corpus .* is empty .*use fewer --parts"):
        for i in range(40):
            list(iter_documents(cfg, part=i, parts=40))
    with pytest.raises(DataError, match="--max-documents cannot be combined with --parts"):
        list(iter_documents(CorpusConfig(source=source, max_documents=3), part=0, parts=2))
def test_hub_parts_are_the_dataset_files_shared_out(tmp_path, monkeypatch):
    import datasets

    from data.corpus import iter_documents

    texts = read_texts(corpus_slice(0, 40))[:12]
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"{i}.jsonl"))
        (tmp_path / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[3 * i:3 * i + 3]))
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: real(
        "json", data_files=files, split="train", streaming=streaming))
    for streaming in (True, False):
        cfg = CorpusConfig(source="hub:someone/corpus", streaming=streaming)
        got = [list(iter_documents(cfg, part=i, parts=2)) for i in range(2)]
        assert sorted(got[0] + got[1]) == sorted(texts) and got[0] and got[1]
    with pytest.raises(DataError, match="streams from 4 data file.*too few for --parts 5"):
        list(iter_documents(CorpusConfig(source="hub:someone/corpus"), part=0, parts=5))
def test_hub_parts_cut_by_files_and_by_rows_are_not_one_preparation(tmp_path, monkeypatch):
    """Streamed, a hub corpus is cut into parts by data file; downloaded (--no-streaming), by
    contiguous rows: other documents per part. A part rerun the other way must not join
    the others (documents would be lost and duplicated), so the cut is in its settings."""
    import datasets

    from data.loader import data_info

    texts, tok = read_texts(corpus_slice(0, 40))[:16], str(tokenizer_path())  # built before the patch
    files, first = [], 0
    for i, count in enumerate((1, 1, 1, 13)):  # unequal files: the two cuts differ
        files.append(str(tmp_path / f"{i}.jsonl"))
        chunk, first = texts[first:first + count], first + count
        (tmp_path / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: real(
        "json", data_files=files, split="train", streaming=streaming))
    out = tmp_path / "parts"

    def part(i, streaming, **kw):
        return prep.prepare_dataset(PrepareConfig(
            corpus=CorpusConfig(source="hub:someone/corpus", streaming=streaming), tokenizer=tok,
            out=str(out), seq_len=64, val_fraction=0.0, num_workers=1, parts=2, part=i, **kw), progress=False)

    streamed = part(0, True)
    assert "part_cut" not in streamed["settings"]  # the default cut: parts prepared before stay whole
    rows = part(1, False)
    assert rows["settings"]["part_cut"] == "contiguous rows (--no-streaming)"
    assert rows["part"]["group"] != streamed["part"]["group"]
    with pytest.raises(DataError, match="part-00001' belongs to another preparation"):
        data_info(data_config(tmp_path, out, seq_len=64))
    with pytest.raises(prep.OutputMismatch, match=r"other settings \(part_cut: 'contiguous rows .*' -> None\)"):
        part(1, True)
    assert part(1, True, overwrite=True)["part"]["group"] == streamed["part"]["group"]
    assert len(data_info(data_config(tmp_path / "again", out, seq_len=64))["sources"]) == 2
def test_crlf_text_lines_are_the_same_documents_in_parts_as_whole(tmp_path):
    """Text read whole (``datasets``) gets universal newlines; read in parts it is cut from raw
    bytes: both must give the same documents, or parts tokenize differently."""
    from data.corpus import iter_documents

    lines = [f"line {i} of a windows file" for i in range(30)]
    raw = "\r\n".join(lines[:20]) + "\r\n" + "\r".join(lines[20:25]) + "\r\nlast\u2028one\n"
    (tmp_path / "crlf.txt").write_bytes(raw.encode())
    cfg = CorpusConfig(source=str(tmp_path / "crlf.txt"), text_sample_by="line")
    whole = list(iter_documents(cfg))
    assert whole == [line + "\n" for line in lines[:25]] + ["last\u2028one\n"]
    for parts in (1, 2, 3):
        got = [doc for i in range(parts) for doc in iter_documents(cfg, part=i, parts=parts)]
        assert got == whole, parts
def test_a_preparation_in_parts_trains_as_one_dataset(tmp_path, capsys, monkeypatch):
    """Three jobs (one finds its part in SLURM_ARRAY_TASK_ID) write <out>/part-0000I; the loader
    reads <out> as every part; a rerun part does nothing; a missing or foreign part, or parts
    into a dataset prepared whole, are refused with what to do."""
    from data.cli import main
    from data.loader import data_info

    source, texts = _mixed_corpus(tmp_path)
    out = tmp_path / "parts"
    common = ["prepare", "--input", source, "--tokenizer", str(tokenizer_path()), "--out", str(out),
              "--seq-len", "64", "--val-fraction", "0.2", "--workers", "1", "--no-progress", "--parts", "3"]
    for i in (0, 2):
        assert main(common + ["--part", str(i)]) == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert main(common) == 2 and "--parts 3 needs --part" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"part 1 of the 3 parts of .*\(--part 1 --parts 3, same options\)"):
        data_info(data_config(tmp_path, out, seq_len=64))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert main(common) == 0
    capsys.readouterr()
    manifests = [read_manifest(str(out / f"part-{i:05d}")) for i in range(3)]
    assert [m["part"]["index"] for m in manifests] == [0, 1, 2] and len({m["part"]["group"] for m in manifests}) == 1
    before = (out / "part-00001" / MANIFEST_NAME).stat().st_mtime_ns
    assert main(common) == 0 and (out / "part-00001" / MANIFEST_NAME).stat().st_mtime_ns == before  # done: no-op
    capsys.readouterr()
    whole = prep.prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=source), tokenizer=str(tokenizer_path()),
                                               out=str(tmp_path / "whole"), seq_len=64, val_fraction=0.2,
                                               num_workers=1), progress=False)

    def total(ms, key):
        return sum(m["splits"][s][key] for m in ms for s in m["splits"])

    assert total(manifests, "documents") == total([whole], "documents") == len(texts)
    assert total(manifests, "document_tokens") == total([whole], "document_tokens")
    cfg = data_config(tmp_path, out, seq_len=64, drop_last=False)
    with TokenLoader(cfg, batch_size=1) as loader:
        assert len(list(loader)) == sum(m["splits"]["train"]["sequences"] for m in manifests)
    info = data_info(data_config(tmp_path, out, tmp_path / "whole", weights=(3.0, 1.0), seq_len=64))
    assert [s["path"] for s in info["sources"]] == [str(out / f"part-{i:05d}") for i in range(3)] + [
        str(tmp_path / "whole")]
    assert sum(s["weight"] for s in info["sources"][:3]) == pytest.approx(3.0)
    with pytest.raises(DataError, match="same dataset twice .*prepared in parts and one of its parts"):
        TokenLoader(data_config(tmp_path / "twice", out, out / "part-00001", seq_len=64), 1)
    assert main(["inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["parts"] == 3 and shown["splits"]["train"]["documents"] == sum(
        m["splits"]["train"]["documents"] for m in manifests)
    # a part prepared with other options does not join the others
    other = common[:-2] + ["--parts", "3", "--part", "1", "--overwrite"]
    other[other.index("0.2")] = "0.3"
    assert main(other) == 0
    capsys.readouterr()
    with pytest.raises(DataError, match="part-00001' belongs to another preparation"):
        data_info(data_config(tmp_path, out, seq_len=64))
    assert main(common[:-2] + ["--out", str(tmp_path / "whole"), "--parts", "2", "--part", "0"]) == 2
    assert "holds a dataset prepared whole, not in parts" in capsys.readouterr().err
def test_remote_parts_stage_in_their_own_directories(tmp_path, monkeypatch):
    """Two parts of a remote output staged under one --staging-dir (two array tasks on a
    node): each stages in its own directory, so neither clears the other's shards."""
    from data.manifest import IncompleteDataset

    source, _ = _mixed_corpus(tmp_path)
    staged = {}

    def upload(staging, out):
        staged[out] = staging
        shutil.copytree(staging, tmp_path / "bucket" / out.split("/")[-1])

    monkeypatch.setattr(prep, "is_remote", lambda path: path.startswith("s3://"))
    monkeypatch.setattr(prep, "_upload_tree", upload)
    monkeypatch.setattr(prep, "read_manifest", lambda *a: (_ for _ in ()).throw(IncompleteDataset("no manifest yet")))
    for part in (0, 1):
        prep.prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=source), tokenizer=str(tokenizer_path()),
                                           out="s3://bucket/corpus", seq_len=64, val_fraction=0.2, num_workers=1,
                                           staging_dir=str(tmp_path / "stage"), parts=2, part=part), progress=False)
    assert sorted(staged) == ["s3://bucket/corpus/part-00000", "s3://bucket/corpus/part-00001"]
    assert len(set(staged.values())) == 2 and all(p.parent == tmp_path / "stage" for p in staged.values())
    assert all(json.loads((tmp_path / "bucket" / f"part-0000{i}" / MANIFEST_NAME).read_text())["part"]["index"] == i
               for i in (0, 1))
def test_all_parts_in_one_job_go_on_where_a_killed_job_stopped(tmp_path, monkeypatch, capsys):
    """--part all: the parts one after another, each kept once complete; a job killed in
    part 1 leaves part 0 whole, and the rerun skips it and writes parts 1 and 2."""
    from data.cli import main

    source, _ = _mixed_corpus(tmp_path)
    out = tmp_path / "parts"
    args = ["prepare", "--input", source, "--tokenizer", str(tokenizer_path()), "--out", str(out), "--seq-len",
            "64", "--val-fraction", "0.2", "--workers", "1", "--no-progress", "--parts", "3", "--part", "all"]
    real, calls = prep._write_splits, []

    def killed_in_part_1(cfg, *rest):
        calls.append(cfg.part)
        if cfg.part == 1:
            raise KeyboardInterrupt
        return real(cfg, *rest)

    monkeypatch.setattr(prep, "_write_splits", killed_in_part_1)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert (out / "part-00000" / MANIFEST_NAME).is_file() and not (out / "part-00001").exists()
    before = (out / "part-00000" / MANIFEST_NAME).stat().st_mtime_ns
    monkeypatch.setattr(prep, "_write_splits", real)
    capsys.readouterr()
    assert main(args) == 0
    assert (out / "part-00000" / MANIFEST_NAME).stat().st_mtime_ns == before
    assert [read_manifest(str(out / f"part-0000{i}"))["part"]["index"] for i in range(3)] == [0, 1, 2]
    assert capsys.readouterr().err.count("linrnn-prepare: part ") == 3
    # two jobs with --part all share the parts: a part another job holds is skipped, not waited for
    import fcntl

    shutil.rmtree(out / "part-00001")
    with open(out / ".part-00001.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args) == 0
    err = capsys.readouterr().err
    assert "part 1 is being written by another job: on to the next" in err and "parts [1] were being" in err
    assert not (out / "part-00001").exists()
    assert main(args[:-4] + ["--part", "2"]) == 2 and "--part 2 is outside 0..0" in capsys.readouterr().err
    assert main(args[:-1] + ["x"]) == 2 and "--part 'x': give a part number" in capsys.readouterr().err
def test_a_part_without_held_out_sequences_is_written_without_a_validation_split(tmp_path, caplog, capsys):
    """Few held-out documents spread over many parts: the parts that hold none (or too few
    tokens) have no validation split, with a warning; validation reads the others'."""
    from data.loader import data_info

    source, _ = _mixed_corpus(tmp_path)
    out = tmp_path / "parts"
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        for part in range(7):
            prep.prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=source), tokenizer=str(tokenizer_path()),
                                               out=str(out), seq_len=64, val_fraction=0.05, num_workers=1,
                                               parts=7, part=part), progress=False)
    with_val = [i for i in range(7) if "val" in read_manifest(str(out / f"part-0000{i}"))["splits"]]
    assert 1 <= len(with_val) < 7, with_val
    assert sum("has no validation split" in r.getMessage() for r in caplog.records) == 7 - len(with_val)
    cfg = data_config(tmp_path, out, seq_len=64)
    assert len(data_info(cfg)["sources"]) == 7
    with TokenLoader(cfg, 1, split="val", skip_sources_without_split=True) as loader:
        assert [s.path for s in loader.sources] == [str(out / f"part-0000{i}") for i in with_val]
    from data.cli import main

    assert main(["inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["splits"]["val"]["sequences"] == sum(
        read_manifest(str(out / f"part-0000{i}"))["splits"]["val"]["sequences"] for i in with_val)
