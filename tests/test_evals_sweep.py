"""linrnn-eval-sweep: every evaluated checkpoint of a run in one table and one figure."""
from __future__ import annotations

import json

import pytest

from evals.sweep import headline, main


def _results(step: int, ppl: float, passkey: list[list[float | None]], complete: bool = True,
             stopped: tuple[str, ...] = ()) -> dict:
    return {"kind": "checkpoint_eval", "meta": {"step": step, "tokens_seen": step * 1000}, "complete": complete,
            "stopped_by_time_limit": list(stopped),
            "results": {
                "heldout": {"data": "run", "perplexity": ppl, "bits_per_byte": ppl / 100},
                "passkey": {"lengths": [64, 128], "depths": [0.0, 1.0], "accuracy": passkey},
                "kv_lookup": {"pairs": [4, 8], "accuracy": [0.5, 0.25]},
                "fewshot_parity": {"task": "parity", "lengths": [4, 8], "accuracy": [0.75, 0.5]},
                "length_extrapolation": {"train_context": 128, "bucket_starts": [0, 64, 128, 192],
                                         "bucket_loss": [4.0, 3.0, 3.5, 4.5]}}}


def test_headline_numbers_of_one_evaluation():
    h = headline(_results(10, 200.0, [[1.0, 0.0], [None, 0.5]])["results"])
    assert h == {"held-out perplexity": 200.0, "held-out bits/byte": 2.0, "loss within context": 3.5,
                 "loss past context": 4.0, "passkey accuracy": 0.5, "passkey accuracy at 128": 0.25,
                 "kv lookup accuracy": 0.375, "few-shot parity accuracy": 0.625}


def test_a_sweep_table_lists_every_checkpoint_and_its_gaps(tmp_path, capsys):
    run = tmp_path / "run"
    for step, ppl, complete, stopped in ((100, 300.0, True, ()), (200, 150.0, False, ()),
                                         (250, 140.0, True, ("passkey",))):
        d = run / "exports" / f"step_{step:08d}" / "eval" / "checkpoint"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(_results(step, ppl, [[1.0, 1.0], [1.0, 0.0]], complete, stopped)))
    (run / "exports" / "step_00000300").mkdir()  # exported, its evaluation never ran
    (run / "exports" / "step_00000300.old").mkdir()  # not a step directory: ignored
    assert main([str(run)]) == 0
    captured = capsys.readouterr()
    assert ("3 checkpoint(s) without a complete evaluation: step_00000200, step_00000250, step_00000300"
            in captured.err)
    md = (run / "exports" / "sweep-checkpoint.md").read_text().splitlines()
    assert md[2].startswith("| checkpoint | tokens seen | status | held-out perplexity |")
    assert md[4].startswith("| step_00000100 | 100,000 | complete | 300 |")
    assert md[5].startswith("| step_00000200 | 200,000 | interrupted | 150 |")  # killed: scored again
    assert md[6].startswith("| step_00000250 | 250,000 | partial (time limit) | 140 |")
    assert md[7].startswith("| step_00000300 | — | not evaluated | — |")
    summary = json.loads((run / "exports" / "sweep-checkpoint.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [100, 200, 250, 300]
    assert (run / "exports" / "sweep-checkpoint.png").stat().st_size > 0


def test_a_missing_run_dir_or_unknown_suite_is_refused_and_nothing_written(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "run directory " + repr(str(tmp_path / "nothing")) + " does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "exports" / "step_00000010").mkdir(parents=True)
    for suite in ("lmm", "lm,lmm", "lm_eval:"):  # a typo would list every checkpoint as "not evaluated"
        assert main([str(run), "--suite", suite]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("unknown suite 'lmm' (did you mean 'lm'?)" in err or "name the tasks" in err)
        assert main([str(run), "--suite", suite, "--evaluate"]) == 2  # refused before any export
        capsys.readouterr()
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["step_00000010"]
    assert main([str(run), "--suite", "lm+passkey"]) == 0  # as eval.sbatch names the result folder
    capsys.readouterr()


def test_a_run_without_exports_points_to_evaluate(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "nor complete checkpoints (step_*): pass a run's checkpoint.dir" in capsys.readouterr().err
    step = tmp_path / "step_00000010"
    step.mkdir()
    (step / "COMPLETE").write_text("")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no exports/step_* directories" in err and "--evaluate (exports and scores" in err


@pytest.mark.parametrize("suite", ["lm,passkey"])
def test_several_suites_are_read_where_eval_sbatch_writes_them(tmp_path, suite):
    d = tmp_path / "exports" / "step_00000005" / "eval" / "lm+passkey"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(_results(5, 99.0, [[1.0, 1.0], [1.0, 1.0]])))
    assert main([str(tmp_path), "--suite", suite]) == 0
    assert (tmp_path / "exports" / "sweep-lm+passkey.md").read_text().count("| step_00000005 | 5,000 | complete") == 1


def test_lm_eval_results_are_summarised_by_one_metric_per_task(tmp_path):
    """Suite lm_eval:TASKS (evals.lm_eval_adapter.score): acc_norm before acc, perplexities for
    tasks without accuracy; standard errors are left out."""
    suite = "lm_eval:hellaswag,lambada_openai,wikitext"
    for step, acc in ((10, 0.25), (20, 0.31)):
        d = tmp_path / "exports" / f"step_{step:08d}" / "eval" / suite.replace(",", "+")
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "kind": "lm_eval", "meta": {"step": step, "tokens_seen": step * 1000}, "complete": True,
            "results": {"hellaswag": {"acc,none": acc, "acc_norm,none": acc + 0.02, "acc_norm_stderr,none": 0.01},
                        "lambada_openai": {"perplexity,none": 40.0 - step, "acc,none": acc * 2},
                        "wikitext": {"word_perplexity,none": 90.0, "bits_per_byte,none": 1.2}}}))
    assert main([str(tmp_path), "--suite", suite]) == 0
    summary = json.loads((tmp_path / "exports" / "sweep-lm_eval:hellaswag+lambada_openai+wikitext.json").read_text())
    assert summary["metrics"] == ["hellaswag acc_norm", "lambada_openai acc", "wikitext word_perplexity"]
    assert [c["scores"]["hellaswag acc_norm"] for c in summary["checkpoints"]] == pytest.approx([0.27, 0.33])
