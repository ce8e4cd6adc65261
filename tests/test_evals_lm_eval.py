"""The lm-evaluation-harness adapter on local task files (offline): scores agree with the
model's own forward pass, generation matches greedy decoding, and lm_eval runs the three
request types end to end. Skipped when lm_eval is not installed (optional dependency)."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from evals.lm_eval_adapter import LinRNNLM  # noqa: E402
from launching import run_launched  # noqa: E402
from test_evals_checkpoint import exported  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def req(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_a_direct_forward_pass(exported) -> None:
    out, _, model = exported
    lm = LinRNNLM(pretrained=str(out), device="cpu", batch_size=3)
    pairs = [("The sky is", " blue."), ("house river", " green stone 12"), ("", "water"), ("A b ", "c")]
    got = lm.loglikelihood([req("loglikelihood", p) for p in pairs])
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c, t = lm.coder.split(ctx, cont)
        ids = torch.tensor([c + t])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]), -1)[0, len(c) - 1:]
        assert lp == pytest.approx(float(logp.gather(1, ids[0, len(c):, None]).sum()), rel=1e-4, abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == ids[0, len(c):]).all())
        assert lm.tok.decode(c + t) == ctx + cont and len(t) >= 1  # nothing lost at the seam (BOS decodes to "")


def test_a_continuation_longer_than_the_window_scores_its_tail(exported) -> None:
    out, _, model = exported
    lm = LinRNNLM(pretrained=str(out), device="cpu", max_length=4)
    ctx, cont = "The sky", " is blue and the grass is green"
    c, t = lm.coder.split(ctx, cont)
    assert len(t) > 5
    ((lp, _),) = lm.loglikelihood([req("loglikelihood", (ctx, cont))])
    ids = torch.tensor([(c + t)[-5:]])  # the window: the continuation's last 4 tokens, predicted from 4
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]), -1)[0]
    assert lp == pytest.approx(float(logp.gather(1, ids[0, 1:, None]).sum()), rel=1e-4, abs=1e-4)


def test_rolling_loglikelihood_counts_every_token_once(exported) -> None:
    out, text_file, model = exported
    text = text_file.read_text()[:400]
    short = LinRNNLM(pretrained=str(out), device="cpu", max_length=4096)
    windows = LinRNNLM(pretrained=str(out), device="cpu", max_length=32)
    assert short.coder.anchor == short.tok.eos_id  # the export's training had no BOS
    ids = torch.tensor([[short.coder.anchor, *short.tok.encode(text)]])
    with torch.no_grad():
        direct = -float(model.loss(ids[:, :-1], ids[:, 1:])) * (ids.shape[1] - 1)
    (whole,) = short.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    (chunked,) = windows.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    assert whole == pytest.approx(direct, rel=1e-4)
    # windows of 32: every token scored once, each with the context its window gives it
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    by_hand, scored = 0.0, 0
    for ctx, cont in (make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=windows.tok.encode(text), prefix_token=windows.coder.anchor, max_seq_len=32, context_len=1)):
        scored += len(cont)
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[:, :-1]), -1)[0, len(ctx) - 1:]
        by_hand += float(logp.gather(1, seq[0, len(ctx):, None]).sum())
        assert len(cont) >= 1
    assert chunked == pytest.approx(by_hand, rel=1e-4) and math.isfinite(chunked)
    assert scored == len(windows.tok.encode(text))


def test_generation_uses_the_step_path_and_stops_at_until(exported) -> None:
    out, _, model = exported
    lm = LinRNNLM(pretrained=str(out), device="cpu")
    ctx = "The grass is green. The sky"
    ids = torch.tensor([lm.coder.document(ctx)])
    greedy = model.generate(ids, max_new_tokens=12, temperature=0.0)[0, ids.shape[1]:].tolist()
    text = lm.tok.decode(greedy[: greedy.index(lm.tok.eos_id)] if lm.tok.eos_id in greedy else greedy)
    (full,) = lm.generate_until([req("generate_until", (ctx, {"until": [], "max_gen_toks": 12}))])
    assert text.startswith(full) and (full == text or lm.tok.eos_id in greedy)
    if len(full) > 2:
        stop = full[1:3]
        (cut,) = lm.generate_until([req("generate_until", (ctx, {"until": [stop], "max_gen_toks": 12}))])
        assert stop not in cut and full.startswith(cut)


LOCAL_TASKS = ["linrnn_local_choice", "linrnn_local_rolling", "linrnn_local_gen"]


def write_local_tasks(tmp_path) -> None:
    """Three offline tasks, one per request type, over eight documents of a local JSONL file."""
    data = tmp_path / "data.jsonl"
    rows = [{"question": f"Is {w} a word?", "choices": [" yes", " no"], "answer": i % 2, "text": f"{w} river stone."}
            for i, w in enumerate(["house", "music", "garden", "window", "stone", "light", "water", "table"])]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "choice.yaml").write_text(
        "task: linrnn_local_choice\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: answer\ndoc_to_choice: '{{choices}}'\n"
        "metric_list:\n  - metric: acc\n")
    (tmp_path / "rolling.yaml").write_text(
        "task: linrnn_local_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tmp_path / "gen.yaml").write_text(
        "task: linrnn_local_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{choices[answer]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")


def test_lm_eval_runs_local_tasks_offline_on_one_rank_and_on_two(exported, tmp_path) -> None:
    """In process, then as the checkpoint suite on two ranks (``python -m launch --nproc 2``):
    each rank scores half the documents and rank 0 writes the same scores once."""
    out, _, _ = exported
    write_local_tasks(tmp_path)
    lm = LinRNNLM(pretrained=str(out), device="cpu", batch_size=4)
    res = simple_evaluate(model=lm, tasks=LOCAL_TASKS, task_manager=TaskManager(
        include_path=str(tmp_path), include_defaults=False), bootstrap_iters=0, log_samples=False)
    r = res["results"]
    assert 0.0 <= r["linrnn_local_choice"]["acc,none"] <= 1.0
    assert r["linrnn_local_rolling"]["bits_per_byte,none"] > 0
    assert 0.0 <= r["linrnn_local_gen"]["exact_match,none"] <= 1.0

    # the checkpoint suite lm_eval:TASKS (what slurm/eval.sbatch and the sweep run), on two ranks
    suite = "lm_eval:" + ",".join(LOCAL_TASKS)
    two = run_launched(tmp_path, 2, "evals.cli", str(out), "--suite", suite, "--out", str(tmp_path / "two"),
                       "--device", "cpu", "--lm-eval-batch-size", "4", "--lm-eval-include", str(tmp_path),
                       "--lm-eval-bootstrap", "0")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 reports
    data = json.loads((tmp_path / "two" / "results.json").read_text())
    assert data["kind"] == "lm_eval" and data["complete"] and data["ranks"] == 2 and data["tasks"] == LOCAL_TASKS
    for task, metric in (("linrnn_local_choice", "acc,none"), ("linrnn_local_rolling", "bits_per_byte,none"),
                         ("linrnn_local_rolling", "word_perplexity,none"), ("linrnn_local_gen", "exact_match,none")):
        assert data["results"][task][metric] == pytest.approx(r[task][metric], rel=1e-5), (task, metric)
    assert "| linrnn_local_choice | acc |" in (tmp_path / "two" / "results.md").read_text()


def test_the_lm_eval_suite_refuses_unknown_tasks_and_presets(exported, tmp_path, capsys) -> None:
    from evals.cli import main as eval_main

    out, _, _ = exported
    assert eval_main([str(out), "--suite", "lm_eval:no_such_task", "--out", str(tmp_path / "a"),
                      "--lm-eval-include", str(tmp_path)]) == 2
    assert "lm_eval has no task 'no_such_task'" in capsys.readouterr().err
    assert eval_main(["mamba2-tiny", "--suite", "lm_eval:lambada_openai", "--out", str(tmp_path / "b")]) == 2
    assert "not the preset 'mamba2-tiny'" in capsys.readouterr().err
    assert eval_main([str(out), "--suite", "lm_eval:", "--out", str(tmp_path / "c")]) == 2
    assert "name the tasks" in capsys.readouterr().err


def test_the_suite_reads_the_cache_only_when_the_hub_is_unreachable(exported, tmp_path, monkeypatch, capsys) -> None:
    """Without offline mode, an unreachable Hub (here a closed local port as HF_ENDPOINT) turns
    it on before lm_eval loads anything, instead of five retries per dataset."""
    import os
    import socket

    from evals.cli import main as eval_main
    from evals.hub_probe import OFFLINE_VARS

    for var in (*OFFLINE_VARS, "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    out, _, _ = exported
    assert eval_main([str(out), "--suite", "lm_eval:no_such_task", "--out", str(tmp_path / "a"),
                      "--lm-eval-include", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "[evals] the Hugging Face Hub (127.0.0.1:" in err and "lm_eval has no task 'no_such_task'" in err
    assert [os.environ.get(v) for v in OFFLINE_VARS] == ["1", "1"]


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    from evals.lm_eval_adapter import main

    monkeypatch.setattr("sys.argv", ["linrnn-lm-eval", "run", "--model", "linrnn", "--model_args",
                                     f"pretrained={tmp_path / 'nope'}", "--tasks", "lambada_openai"])
    assert main() == 2
    assert capsys.readouterr().err.strip().endswith(f"checkpoint {str(tmp_path / 'nope')!r} does not exist")


def test_a_dataset_the_hub_cannot_give_is_one_line_naming_the_task_and_the_fix(
        exported, tmp_path, monkeypatch, capsys) -> None:
    """No network (or HF_DATASETS_OFFLINE=1 without the dataset cached): datasets raises a
    ConnectionError deep inside lm_eval; both CLIs say which task and how to fix it, exit 2.
    The loader lm_eval calls is patched: local files load, Hub datasets fail, no network used."""
    import datasets
    from huggingface_hub.errors import OfflineModeIsEnabled

    from evals.cli import main as eval_main
    from evals import lm_eval_adapter

    out, _, _ = exported
    write_local_tasks(tmp_path)
    real = datasets.load_dataset
    failure: list[Exception] = [ConnectionError("Couldn't reach 'EleutherAI/lambada_openai' on the Hub "
                                                "(LocalEntryNotFoundError)")]

    def load_dataset(path: str, *args, **kwargs):
        if path == "json":  # the local tasks
            return real(path, *args, **kwargs)
        raise failure[0]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    suite = "lm_eval:linrnn_local_choice,lambada_openai"  # the local task loads, lambada's dataset fails
    argv = [str(out), "--suite", suite, "--out", str(tmp_path / "a"), "--device", "cpu", "--lm-eval-limit", "5",
            "--lm-eval-include", str(tmp_path)]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the fixture's export also warns about its BOS)
    assert err.startswith("linrnn-eval: error: lm_eval task 'lambada_openai': its dataset comes from the Hugging "
                          "Face Hub")
    assert "Couldn't reach 'EleutherAI/lambada_openai'" in err and "HF_DATASETS_OFFLINE=1" in err
    assert "TaskManager().load(['lambada_openai'])" in err and "login node" in err
    assert not (tmp_path / "a").exists()

    failure[0] = OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
    monkeypatch.setattr("sys.argv", ["linrnn-lm-eval", "run", "--model", "linrnn", "--model_args",
                                     f"pretrained={out}", "--device", "cpu", "--tasks", "lambada_openai"])
    assert lm_eval_adapter.main() == 2  # caught: no traceback of its own
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("linrnn-lm-eval: error: lm_eval task 'lambada_openai': its dataset comes from")

    failure[0] = RuntimeError("a bug, not the network")  # anything else keeps its traceback
    with pytest.raises(RuntimeError, match="a bug"):
        eval_main(argv)
    assert not any(map(lm_eval_adapter.hub_unreachable, [BrokenPipeError(), FileNotFoundError("x")]))
