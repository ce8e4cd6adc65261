"""Checkpoint evaluation on an exported tiny model (safetensors + config + tokenizer):
perplexity and bits per byte agree with a direct loss, the length curve, passkey, key-value
lookup and few-shot runs write their results, and a broken export errors clearly."""
from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from data.tokenizer import Tokenizer, train_tokenizer
from evals import incontext, lm
from evals.checkpoint import CheckpointError, load_checkpoint
from evals.cli import main
from pretrain import export
from pretrain.config_loader import dump_config, load_model_config
from pretrain.models import build_model
from launching import run_launched

WORDS = ("house river green stone light water table music garden window little yellow forest silver "
         "market winter summer bridge castle dragon island rocket planet orange purple mountain").split()


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def corpus(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    lines = [incontext.FILLER, "The pass key is 12345. What is the pass key?"]
    for _ in range(n):
        lines.append(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 12))) + f" {rnd.randint(0, 999)}.")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("export")
    tok_path = train_tokenizer([corpus(400, 0)], root / "tok", vocab_size=320, num_threads=1)
    tok = Tokenizer.load(tok_path)
    cfg = load_model_config("gated_deltanet-tiny", [f"vocab_size={tok.vocab_size}", "d_model=32", "n_layers=2",
                                                    "deltaproduct.head_dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg)
    out = root / "model"
    out.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(out / export.WEIGHTS))
    (out / export.CONFIG).write_text(dump_config(cfg))
    (out / export.RUN_CONFIG).write_text("data:\n  seq_len: 64\n")
    (out / export.TOKENIZER).write_bytes(tok_path.read_bytes())
    (out / export.META).write_text(json.dumps({"step": 7}))
    text = root / "heldout.txt"
    text.write_text(corpus(60, 1))
    return out, text, model


@pytest.fixture(scope="module")
def heldout_dataset(exported, tmp_path_factory) -> Path:
    """Prepared shards (seq_len 64, a 'val' split) of documents in the export's tokenizer."""
    from data.config import CorpusConfig, PrepareConfig
    from data.prepare import prepare_dataset

    out, _, _ = exported
    root = tmp_path_factory.mktemp("heldout")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": corpus(6, i)}) + "\n" for i in range(30)))
    prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=str(docs)), tokenizer=str(out / export.TOKENIZER),
                                  out=str(root / "ds"), seq_len=64, val_fraction=0.3, num_workers=1), progress=False)
    return root / "ds"


def test_loading_restores_the_weights_and_context(exported) -> None:
    out, _, model = exported
    ck = load_checkpoint(out)
    assert ck.train_context == 64 and ck.meta["step"] == 7
    ids = torch.randint(0, ck.tokenizer.vocab_size, (2, 12))
    torch.testing.assert_close(ck.model(ids), model.eval()(ids))


def test_exports_that_do_not_record_bos_take_it_from_the_runs_datasets(exported, heldout_dataset, tmp_path,
                                                                        capsys) -> None:
    """Exports made before export.json recorded add_bos: the run's local datasets say it (BOS
    if any had it, as training read them); with none readable the report says it is unknown."""
    import shutil

    from data.config import CorpusConfig, PrepareConfig
    from data.prepare import prepare_dataset

    out, _, _ = exported
    ck = load_checkpoint(out)  # no sources in its run config
    assert ck.add_bos is None and not ck.bos and "does not record whether" in ck.bos_note()
    assert "does not record whether the training documents began with BOS" in capsys.readouterr().err
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": corpus(3, i)}) + "\n" for i in range(12)))
    with_bos = tmp_path / "with_bos"
    prepare_dataset(PrepareConfig(corpus=CorpusConfig(source=str(docs)), tokenizer=str(out / export.TOKENIZER),
                                  out=str(with_bos), seq_len=64, val_fraction=0.3, num_workers=1, add_bos=True),
                    progress=False)
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    for sources, expected in (([heldout_dataset], False), ([heldout_dataset, with_bos], True),
                              ([tmp_path / "gone", heldout_dataset], False)):
        (copy / export.RUN_CONFIG).write_text(json.dumps({"data": {"seq_len": 64, "sources": [
            {"path": str(p)} for p in sources]}}))
        ck = load_checkpoint(copy)
        assert ck.add_bos is expected and ck.bos_note().endswith("as the training data's did"), sources
    (copy / export.META).write_text(json.dumps({"step": 7, "add_bos": False}))  # the record wins
    assert load_checkpoint(copy).add_bos is False
    assert "does not record" not in capsys.readouterr().err


def test_perplexity_and_bits_per_byte_match_a_direct_loss(exported) -> None:
    out, text_file, model = exported
    ck = load_checkpoint(out)
    text = lm.read_text(text_file)
    stream, n_bytes = lm.encode_text(ck.tokenizer, text, bos=True)
    assert n_bytes == len(text.encode()) and ck.tokenizer.decode(stream[1:].tolist()) == text
    assert int(stream[0]) == ck.tokenizer.bos_id
    # training without BOS (the default): the first token is context only, its bytes unscored
    plain, plain_bytes = lm.encode_text(ck.tokenizer, text)
    assert plain.tolist() == stream[1:].tolist() and not ck.bos
    assert plain_bytes == n_bytes - len(ck.tokenizer.decode(plain[:1].tolist()).encode())
    whole = lm.perplexity(ck.model, stream, n_bytes, context=stream.numel(), progress=False)
    with torch.no_grad():
        direct = float(model.loss(stream[None, :-1], stream[None, 1:]))
    assert whole.tokens == stream.numel() - 1
    assert whole.nll_per_token == pytest.approx(direct, rel=1e-5)
    assert whole.bits_per_byte == pytest.approx(direct * whole.tokens / math.log(2) / n_bytes, rel=1e-5)
    windows = lm.perplexity(ck.model, stream, n_bytes, context=50, progress=False)
    assert windows.tokens == whole.tokens  # every token predicted exactly once, last window shorter
    V = ck.tokenizer.vocab_size
    assert 0.5 * V < windows.perplexity < 2 * V  # an untrained model is near uniform
    ext = lm.length_extrapolation(ck.model, stream, 64, factor=4, buckets=8)
    n = min(16, (stream.numel() - 1) // 256)
    assert ext.length == 256 and len(ext.bucket_loss) == 8 and ext.windows == n >= 1
    # bucket b is the mean loss of positions 32b..32b+31 over the n windows of 256 tokens
    with torch.no_grad():
        rows = torch.stack([stream[i * 256:i * 256 + 257] for i in range(n)])
        per_position = lm.token_losses(ck.model, rows).mean(0)
    assert ext.bucket_loss == pytest.approx([float(per_position[b * 32:(b + 1) * 32].mean()) for b in range(8)],
                                            abs=1e-4)


def test_passkey_prompts_place_the_needle_and_score_greedy_exactness(exported) -> None:
    out, _, _ = exported
    ck = load_checkpoint(out)
    tok = ck.tokenizer
    early, target = incontext.passkey_prompt(tok, 200, 0.0, "12345")
    late, _ = incontext.passkey_prompt(tok, 200, 1.0, "12345")
    find = lambda seq: tok.decode(seq).index("The pass key is 12345.")  # noqa: E731
    assert find(early) < find(late) and abs(len(early) - len(late)) <= 2
    longest = max(len(tok.encode(x.strip() + ".")) for x in incontext.FILLER.split(". ") if x.strip())
    for length in (200, 3000):  # filled to the length: less than one more sentence is left
        for depth in (0.0, 0.5, 1.0):
            made, _ = incontext.passkey_prompt(tok, length, depth, "12345")
            assert length - longest < len(made) <= length, (length, depth, len(made), longest)
    with pytest.raises(ValueError, match="cannot hold the needle and the question"):
        incontext.passkey_prompt(tok, 20, 0.5, "12345")
    assert tok.decode(target).strip() == "12345"
    # prompt and answer are the text's own tokenization: what a model that predicts the text
    # perfectly would produce (the answer encoded alone would start with an extra word piece)
    assert early + target == tok.encode(tok.decode(early + target))
    with_bos, _ = incontext.passkey_prompt(tok, 200, 0.0, "12345", bos=True)
    assert with_bos[0] == tok.bos_id and len(with_bos) <= 200

    class Echo(torch.nn.Module):
        """Predicts each next token of a fixed sequence: greedy-exact on it, wrong elsewhere."""

        def __init__(self, seq):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seq = seq

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, tok.vocab_size)
            for t in range(ids.shape[1]):
                logits[:, t, self.seq[t + 1] if t + 1 < len(self.seq) else 0] = 1.0
            return logits

    assert incontext.score_target(Echo(early + target), early, target)[1]
    assert not incontext.score_target(Echo(early + tok.encode(" 54321")), early, target)[1]


def test_prompt_and_answer_are_tokenized_whole_and_start_as_training_did(exported) -> None:
    from evals.prompts import PromptCoder

    tok = load_checkpoint(exported[0]).tokenizer
    plain, bos = PromptCoder(tok, False), PromptCoder(tok, True)
    for context, answer in [("The sky is", " blue."), ("house river ", "green"), ("The pass key is", " 12345"),
                            ("A b", "c d")]:
        prompt, target = plain.split(context, answer)
        assert prompt + target == tok.encode(context + answer) and target  # the whole text's own tokens
        assert tok.decode(target).strip() == answer.strip() or tok.decode(prompt + target) == context + answer
        assert bos.split(context, answer) == ([tok.bos_id, *prompt], target)
    # something to predict from: the EOS that ends each previous document in training, or BOS
    assert plain.anchor == tok.eos_id >= 0 and bos.anchor == tok.bos_id
    assert plain.split("", "water") == ([tok.eos_id], tok.encode("water"))
    assert bos.split("", "water") == ([tok.bos_id], tok.encode("water"))
    assert plain.document("") == [tok.eos_id] and plain.document("sky") == tok.encode("sky")
    import types

    no_bos = types.SimpleNamespace(bos_id=-1, eos_id=2, encode=lambda text: [])  # a tokenizer without BOS
    assert PromptCoder(no_bos, False).document("") == [2] and PromptCoder(no_bos, False).split("", "x")[0] == [2]
    assert bos.document("sky") == [tok.bos_id, *tok.encode("sky")]
    # a separately tokenized answer would not be the text's tokens (the flaw this avoids)
    assert tok.encode("The pass key is") + tok.encode(" 12345") != tok.encode("The pass key is 12345")


def test_checkpoint_suite_via_cli_writes_everything(exported, tmp_path) -> None:
    out, text_file, _ = exported
    res_dir = tmp_path / "res"
    rc = main([str(out), "--suite", "checkpoint", "--text", str(text_file), "--out", str(res_dir), "--no-progress",
               "--extrapolation-factor", "2", "--passkey-lengths", "192,256", "--depths", "0,1", "--trials", "2",
               "--kv-pairs", "2,4", "--fewshot-lengths", "2,4", "--shots", "2", "--device", "cpu"])
    assert rc == 0
    data = json.loads((res_dir / "results.json").read_text())
    r = data["results"]
    assert data["train_context"] == 64 and r["lm"]["bits_per_byte"] > 0
    assert r["passkey"]["lengths"] == [192, 256] and len(r["passkey"]["accuracy"]) == 2
    assert r["kv_lookup"]["pairs"] == [2, 4] and all(0 <= a <= 1 for a in r["kv_lookup"]["accuracy"])
    assert r["fewshot_parity"]["chance"] == 0.5 and r["fewshot_modular_arithmetic"]["lengths"] == [2, 4]
    md = (res_dir / "results.md").read_text()
    assert "bits/byte" in md and "Passkey" in md and "Few-shot parity" in md
    for png in ("length_extrapolation.png", "passkey.png", "kv_lookup.png", "fewshot.png"):
        assert (res_dir / png).stat().st_size > 1000


def test_heldout_shards_are_scored_with_documents_kept_apart(exported, heldout_dataset, tmp_path,
                                                             capsys) -> None:
    out, _, _ = exported
    ds = heldout_dataset
    ck = load_checkpoint(out)
    cfg = lm.heldout_data_config(str(ds), ck.run_config)
    assert cfg.seq_len == 64 and cfg.val_split == "val"
    res = lm.heldout_perplexity(ck.model, ck.tokenizer, cfg, max_batches=3, batch_size=4, progress=False)
    assert 0 < res.tokens <= 3 * 4 * 64 and res.bytes > res.tokens  # several bytes per token
    assert 0.5 * ck.tokenizer.vocab_size < res.perplexity < 2 * ck.tokenizer.vocab_size
    assert res.bits_per_byte == pytest.approx(res.nll_per_token * res.tokens / math.log(2) / res.bytes)
    rc = main([str(out), "--suite", "lm", "--heldout", str(ds), "--heldout-batches", "2", "--out",
               str(tmp_path / "res"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    assert data["results"]["heldout"]["split"] == "val" and "lm" not in data["results"]
    with pytest.raises(ValueError, match="data.sources"):
        lm.heldout_data_config("run", ck.run_config)
    # an export whose run config names its data: suite lm without --text/--heldout scores that
    # data's validation split (what slurm/eval.sbatch's default suite does)
    with_run = tmp_path / "with_run"
    shutil.copytree(out, with_run)
    (with_run / export.RUN_CONFIG).write_text(f"data:\n  seq_len: 64\n  sources: [{{path: {ds}}}]\n")
    rc = main([str(with_run), "--suite", "lm", "--heldout-batches", "2", "--out", str(tmp_path / "res_run"),
               "--no-progress", "--device", "cpu"])
    assert rc == 0 and "scores the run's own validation split (--heldout run)" in capsys.readouterr().err
    data = json.loads((tmp_path / "res_run" / "results.json").read_text())
    assert data["results"]["heldout"]["data"] == "run" and data["results"]["heldout"]["split"] == "val"


@pytest.mark.parametrize("remove,message", [(export.TOKENIZER, "has no tokenizer"), (export.WEIGHTS, "has no model.safetensors")])
def test_broken_exports_error_clearly(exported, tmp_path, capsys, remove, message) -> None:
    out, text_file, _ = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        if f.name != remove:
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(broken)
    rc = main([str(broken), "--suite", "passkey", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and message in capsys.readouterr().err


def test_an_unfinished_export_loads_with_a_warning(exported, tmp_path, capsys) -> None:
    out, _, _ = exported
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for f in out.iterdir():
        if f.name != export.META:  # the marker linrnn-export writes last
            (unfinished / f.name).write_bytes(f.read_bytes())
    assert load_checkpoint(unfinished).meta == {}
    assert "has no export.json: an export that did not finish?" in capsys.readouterr().err


def test_checkpoint_suites_refuse_presets_missing_paths_and_missing_text(exported, tmp_path, capsys) -> None:
    out, text, _ = exported
    assert main(["mamba2-tiny", "--suite", "passkey", "--out", str(tmp_path / "a")]) == 2
    assert "not the preset" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "--suite", "lm", "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(out), "--suite", "lm", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "needs --text FILE and/or --heldout" in capsys.readouterr().err
    assert main([str(out), "--suite", "lm,parity", "--out", str(tmp_path / "d")]) == 2
    assert "separate calls" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([str(out), "--suite", "passkey", "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    # passkey lengths shorter than the prompt without filler: refused before anything runs
    floor = incontext.passkey_floor(load_checkpoint(out).tokenizer)
    assert main([str(out), "--suite", "lm,passkey", "--text", str(text), "--passkey-lengths", f"{floor - 1},512",
                 "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert f"--passkey-lengths {floor - 1} is too short" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_default_passkey_lengths_hold_the_prompt_without_filler(exported) -> None:
    """A short training context with a small vocabulary: the default lengths start at the
    shortest prompt, and every prompt made at them fits."""
    from evals.checkpoint_eval import passkey_lengths

    ck = load_checkpoint(exported[0])
    floor = incontext.passkey_floor(ck.tokenizer)
    assert floor > 64  # the fixture's 320-piece vocabulary: the bare prompt is long
    assert passkey_lengths(ck, 64, 8) == [floor, 128, 256, 512] if floor < 128 else [floor, 256, 512]
    assert passkey_lengths(ck, 4096, 2) == [2048, 4096, 8192]
    for length in passkey_lengths(ck, 64, 1):
        assert len(incontext.passkey_prompt(ck.tokenizer, length, 0.5, "12345")[0]) <= length


def _numbers(value, path: str = "") -> dict[str, float]:
    """Every number of a results tree by its path (wall times left out)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if key != "wall_time_s"
                for k, v in _numbers(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}/{i}").items()}
    return {path: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def test_checkpoint_suites_split_over_two_ranks_report_what_one_rank_reports(exported, heldout_dataset,
                                                                              tmp_path) -> None:
    """``python -m launch --nproc 2``: each rank scores its share of every part's items (held-out
    batches, text windows, prompts), rank 0 gathers and writes the files once."""
    out, text_file, _ = exported
    args = [str(out), "--suite", "checkpoint", "--text", str(text_file), "--heldout", str(heldout_dataset),
            "--heldout-batches", "3", "--extrapolation-factor", "2", "--passkey-lengths", "192,256", "--depths",
            "0,1", "--trials", "3", "--kv-pairs", "2,4", "--fewshot-lengths", "2,4", "--shots", "2",
            "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = run_launched(tmp_path, 2, "evals.cli", *args, "--out", str(tmp_path / "two"), "--threads", "1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports
    one, both = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert both["complete"] and (one["ranks"], both["ranks"]) == (1, 2)
    assert (both["device"], both["dtype"], both["torch"]) == ("cpu", "float32", torch.__version__)
    assert sorted(both["results"]) == sorted(one["results"])
    expected = _numbers(one["results"])
    assert len(expected) > 40 and _numbers(both["results"]) == pytest.approx(expected, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_ranks_started_without_a_rendezvous_are_refused(exported, tmp_path, capsys, monkeypatch) -> None:
    out, _, _ = exported
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main([str(out), "--suite", "passkey", "--out", str(tmp_path / "r1"), "--device", "cpu"]) == 2
    assert "MASTER_ADDR/MASTER_PORT are not set: start the ranks with python -m launch" in capsys.readouterr().err


def test_checkpoint_parts_are_saved_as_they_finish_and_skipped_after_the_time_limit(exported, tmp_path,
                                                                                     monkeypatch) -> None:
    """results.json is rewritten after every part (a killed call keeps them); with
    --time-limit, parts not started in time are listed, not run. The clock jumps past the
    limit while kv_lookup runs, so fewshot is skipped."""
    import types

    from evals import checkpoint_eval

    out, text_file, _ = exported
    res_dir = tmp_path / "res"
    clock = {"now": 0.0}
    seen: dict[str, dict] = {}
    fake_time = types.SimpleNamespace(time=lambda: 0.0, monotonic=lambda: clock["now"])
    monkeypatch.setattr(checkpoint_eval, "time", fake_time)
    monkeypatch.setattr("evals.cli.time", fake_time)
    monkeypatch.setattr("evals.time_limit.time", fake_time)
    real_kv = checkpoint_eval.PARTS["kv_lookup"]

    def kv_then_time_is_up(*args):
        seen["before_kv"] = json.loads((res_dir / "results.json").read_text())
        clock["now"] = 1000.0
        return real_kv(*args)

    monkeypatch.setitem(checkpoint_eval.PARTS, "kv_lookup", kv_then_time_is_up)
    rc = main([str(out), "--suite", "checkpoint", "--text", str(text_file), "--out", str(res_dir), "--no-progress",
               "--extrapolation-factor", "2", "--passkey-lengths", "192", "--depths", "0", "--trials", "1",
               "--kv-pairs", "2", "--device", "cpu", "--time-limit", "600"])
    assert rc == 0
    before = seen["before_kv"]  # what a kill during kv_lookup would have left
    assert before["complete"] is False and sorted(before["results"]) == ["length_extrapolation", "lm", "passkey"]
    data = json.loads((res_dir / "results.json").read_text())
    assert data["complete"] is True and data["not_started"] == ["fewshot"]
    assert "kv_lookup" in data["results"] and not any(k.startswith("fewshot") for k in data["results"])
    md = (res_dir / "results.md").read_text()
    assert "Not started (time limit): fewshot." in md and "key-value lookup" in md
    assert not (res_dir / "fewshot.png").exists() and not list(res_dir.glob("*.tmp"))


def test_a_part_running_into_the_time_limit_keeps_what_it_scored(exported, tmp_path, monkeypatch) -> None:
    """The clock passes the limit during passkey's first cell: passkey keeps that cell (the
    shortest length, first depth), the other cells are '—'/null, and the later parts are not
    started; the perplexity loop, cut after its first batch, scores a prefix whose bytes are
    those of the decoded prefix."""
    import types

    from evals import checkpoint_eval

    out, text_file, _ = exported
    clock = {"now": 0.0}
    fake_time = types.SimpleNamespace(time=lambda: 0.0, monotonic=lambda: clock["now"])
    monkeypatch.setattr(checkpoint_eval, "time", fake_time)
    monkeypatch.setattr("evals.cli.time", fake_time)
    monkeypatch.setattr("evals.time_limit.time", fake_time)
    real_score = incontext.score_target

    def score_then_time_is_up(*args):
        clock["now"] = 1000.0
        return real_score(*args)

    monkeypatch.setattr(incontext, "score_target", score_then_time_is_up)
    res_dir = tmp_path / "res"
    rc = main([str(out), "--suite", "passkey,kv_lookup", "--out", str(res_dir), "--no-progress",
               "--passkey-lengths", "256,192", "--depths", "0,1", "--trials", "2", "--kv-pairs", "2",
               "--device", "cpu", "--time-limit", "600"])
    assert rc == 0
    data = json.loads((res_dir / "results.json").read_text())
    assert data["stopped_by_time_limit"] == ["passkey"] and data["not_started"] == ["kv_lookup"]
    pk = data["results"]["passkey"]
    assert pk["stopped_by_time_limit"] and pk["lengths"] == [256, 192]
    assert pk["accuracy"][0][1] is not None and [pk["accuracy"][0][0], *pk["accuracy"][1]] == [None] * 3
    md = (res_dir / "results.md").read_text()
    assert "Stopped by the time limit" in md and "—" in md and (res_dir / "passkey.png").stat().st_size > 1000

    ck = load_checkpoint(out)
    stream, n_bytes = lm.encode_text(ck.tokenizer, lm.read_text(text_file))
    clock["now"] = 1000.0  # already past: only the first batch (two windows of 20) is scored
    part = lm.perplexity(ck.model, stream, n_bytes, context=20, batch_size=2, progress=False, deadline=600.0,
                         prefix_bytes=lambda n: len(ck.tokenizer.decode(stream[1:1 + n].tolist()).encode()))
    assert part.stopped_by_time_limit and part.tokens == 40 < stream.numel() - 1
    assert part.bytes == len(ck.tokenizer.decode(stream[1:41].tolist()).encode()) < n_bytes
    whole = lm.perplexity(ck.model, stream[:41], part.bytes, context=20, progress=False)
    assert part.nll_per_token == pytest.approx(whole.nll_per_token, rel=1e-6) and not whole.stopped_by_time_limit
    kv = incontext.kv_lookup(ck.model, ck.tokenizer, [2, 3], trials=1, progress=False, deadline=600.0)
    few = incontext.fewshot(ck.model, ck.tokenizer, "parity", [2, 3], shots=2, trials=1, progress=False,
                            deadline=600.0)
    assert kv["accuracy"][1] is None and few["accuracy"][1] is None
    assert kv["accuracy"][0] is not None and kv["stopped_by_time_limit"] and few["stopped_by_time_limit"]


class _Oracle(torch.nn.Module):
    """A stand-in LM that reads the prompt's text and predicts the natural tokens of
    ``answer(prompt)`` after it (``wrong``: of another answer): the in-context evals must
    score it 1.0 (0.0), which fixes how they build prompts and turn hits into accuracies."""

    def __init__(self, tok, cut: str, answer, wrong: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.cut, self.answer, self.wrong = tok, cut, answer, wrong

    def forward(self, ids):
        from evals.prompts import PromptCoder

        text = self.tok.decode(ids[0].tolist())
        prompt = text[: text.rfind(self.cut) + len(self.cut)]
        head, tail = PromptCoder(self.tok, False).split(prompt, self.answer(prompt, self.wrong))
        seq = head + tail
        logits = torch.zeros(1, ids.shape[1], self.tok.vocab_size)
        for t in range(ids.shape[1]):
            if t + 1 < len(seq):
                logits[0, t, seq[t + 1]] = 10.0
        return logits


def _passkey_answer(prompt: str, wrong: bool) -> str:
    key = re.search(r"The pass key is (\d+)\.", prompt).group(1)
    return " " + (key[::-1] if wrong else key)


def _kv_answer(prompt: str, wrong: bool) -> str:
    lines = prompt.split("\n")
    pairs = dict(line.split(": ") for line in lines[1:-1])
    value = pairs[lines[-1][:-1]]
    return " " + (next(v for v in pairs.values() if v != value) if wrong else value)


def _parity_answer(prompt: str, wrong: bool) -> str:
    bits = [int(b) for b in prompt.split("\n")[-1].split("->")[0].split()]
    return f" {(sum(bits) + wrong) % 2}"


@pytest.mark.parametrize("wrong", [False, True])
def test_in_context_evals_score_a_perfect_reader_1_and_a_wrong_one_0(exported, wrong) -> None:
    tok = load_checkpoint(exported[0]).tokenizer
    want = 0.0 if wrong else 1.0
    pk = incontext.passkey(_Oracle(tok, "What is the pass key? The pass key is", _passkey_answer, wrong), tok,
                           [200, 300], [0.0, 1.0], trials=2, progress=False)
    assert pk.accuracy == [[want, want], [want, want]]
    kv = incontext.kv_lookup(_Oracle(tok, ":", _kv_answer, wrong), tok, [2, 4], trials=3, progress=False)
    assert kv["accuracy"] == [want, want]
    few = incontext.fewshot(_Oracle(tok, "->", _parity_answer, wrong), tok, "parity", [3, 5], shots=2, trials=3,
                            progress=False)
    assert few["accuracy"] == [want, want]
