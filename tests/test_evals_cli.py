"""The ``linrnn-eval`` command: help, clear errors for bad input, and a tiny end-to-end
run (also split over two ranks) that writes JSON, Markdown and plots; a time limit that
stops training early, results saved after every run, and a rank that dies."""
from __future__ import annotations

import json

import pytest
import torch

from evals import bench, cli
from evals.cli import main
from pretrain.config_loader import dump_config, load_model_config


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


TINY = ["-o", "n_layers=1", "-o", "d_model=16", "-o", "deltaproduct.head_dim=8", "-o", "deltaproduct.num_heads=2",
        "--steps", "10", "--batch-size", "8", "--eval-every", "5", "--eval-size", "16", "--val-size", "16",
        "--train-lengths", "2:6", "--test-lengths", "6,12", "--no-progress", "--device", "cpu"]


def test_help_lists_suites(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "linrnn-eval" in out and "state_tracking" in out and "--neg-eigval" in out


@pytest.mark.parametrize("model,suite,message", [
    ("gated_deltanet-tiny", "parityy", "unknown suite 'parityy' (did you mean 'parity'?)"),
    ("/no/such/checkpoint", "parity", "does not exist"),
    ("gated_deltanet-tinyy", "parity", "unknown preset"),
    ("hawk-tiny", "parity", "no eigenvalue setting"),
])
def test_bad_input_fails_with_a_clear_message(tmp_path, capsys, model, suite, message) -> None:
    extra = ["--neg-eigval", "both"] if model == "hawk-tiny" else []
    rc = main([model, "--suite", suite, "--out", str(tmp_path / "out"), *TINY, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_checkpoint_directory_without_config_is_rejected(tmp_path, capsys) -> None:
    (tmp_path / "ckpt").mkdir()
    rc = main([str(tmp_path / "ckpt"), "--suite", "parity", "--out", str(tmp_path / "o"), *TINY])
    assert rc == 2 and "no config.yaml" in capsys.readouterr().err


def test_end_to_end_run_writes_json_markdown_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["gated_deltanet-tiny", "--suite", "parity,s3", "--out", str(out), "--neg-eigval", "both",
               "--seeds", "0,1", *TINY])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == "architecture_benchmark"
    assert len(data["runs"]) == 2 * 2 * 2  # tasks x eigenvalue ranges x seeds
    assert {(r["task"], r["variant"]) for r in data["summary"]} == {
        (t, f"gated_deltanet-tiny {v}") for t in ("parity", "s3") for v in ("[-1,1]", "[0,1]")}
    for row in data["summary"]:
        assert row["seeds"] == [0, 1] and [c["length"] for c in row["by_condition"]] == [6, 12]
        assert len(row["curve"]) == (12 if row["task"] == "s3" else 0)  # parity scores the final answer only
    md = (out / "results.md").read_text()
    assert "## parity" in md and "## s3" in md and "| 6 | 12 |" in md
    assert "Accuracy of the final answer (%) by length" in md and "Cumulative sequence accuracy (%) by length" in md
    assert (out / "parity.png").stat().st_size > 1000 and (out / "s3.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_exported_checkpoint_config_is_benchmarked_and_runs_shard_over_ranks(tmp_path, monkeypatch, capsys) -> None:
    ckpt = tmp_path / "export"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")  # an export's weights: not used by an architecture suite
    (ckpt / "config.yaml").write_text(dump_config(load_model_config("mamba2-tiny", ["n_layers=1", "d_model=16",
                                                                                   "mamba2.head_dim=8",
                                                                                   "mamba2.d_state=8"])))
    out = tmp_path / "out"
    args = [str(ckpt), "--suite", "parity", "--out", str(out), "--seeds", "0,1,2", *TINY[8:]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert "trains new models with the architecture of" in capsys.readouterr().err
    assert (out / "records.rank1-of-2.json").is_file() and not (out / "results.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in data["runs"]) == [0, 1, 2]
    assert data["summary"][0]["variant"] == "export" and data["header"]["ranks"] == 2


def test_time_limit_stops_training_early_and_the_run_is_scored_and_marked(tmp_path) -> None:
    out = tmp_path / "out"
    # an unreachable target: on one fast thread the tiny model learns parity in under 2 s
    rc = main(["gated_deltanet-tiny", "--suite", "parity", "--out", str(out), *TINY,
               "--steps", "100000", "--time-limit", "2", "--target-acc", "1.01"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    (run,) = data["runs"]
    assert data["complete"] and data["header"]["time limit (s)"] == 2.0
    assert run["train"]["stopped_by_time_limit"] and 1 <= run["train"]["steps"] < 100000, run["train"]
    assert run["train"]["history"][-1]["step"] == run["train"]["steps"]
    assert [p["length"] for p in run["eval"]["points"]] == [6, 12]
    assert data["summary"][0]["stopped_by_time_limit"] == 1 and data["header"]["runs stopped by time limit"] == 1
    assert "(1 stopped by time limit)" in (out / "results.md").read_text()
    assert (out / "parity.png").is_file()


def test_bad_time_limit_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["gated_deltanet-tiny", "--suite", "parity", "--out", "unused", "--time-limit", "0"])
    assert e.value.code == 2
    assert "--time-limit: must be a positive number of seconds, e.g. 540, got '0'" in capsys.readouterr().err


def _crash_on_run(monkeypatch, n: int) -> None:
    """Make the n-th training run of this test die (like a kill in the middle of a call)."""
    calls = []

    def run_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    real = bench.run_one
    monkeypatch.setattr(bench, "run_one", run_one)


def test_results_are_saved_after_every_run_and_survive_a_crash(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    _crash_on_run(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        main(["gated_deltanet-tiny", "--suite", "parity", "--out", str(out), "--seeds", "0,1", *TINY])
    data = json.loads((out / "results.json").read_text())
    assert not data["complete"] and [r["seed"] for r in data["runs"]] == [0]
    assert data["header"]["runs finished"] == "1 of 2 (in progress)"
    assert "| gated_deltanet-tiny |" in (out / "results.md").read_text() and (out / "parity.png").is_file()
    assert not list(out.glob("*.tmp"))


def test_rank_zero_reports_what_a_dead_rank_finished_once_the_time_limit_is_over(tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    out = tmp_path / "out"
    args = ["gated_deltanet-tiny", "--suite", "parity", "--out", str(out), "--seeds", "0,1,2,3", *TINY,
            "--time-limit", "3"]
    monkeypatch.setattr(cli, "GATHER_GRACE_S", 0.0)
    monkeypatch.setattr(cli, "GATHER_POLL_S", 0.05)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with monkeypatch.context() as m:
        _crash_on_run(m, 2)  # rank 1 dies after its first run (seed 1)
        with pytest.raises(RuntimeError, match="killed"):
            main(args)
    assert [r["seed"] for r in json.loads((out / "records.rank1-of-2.json").read_text())["records"]] == [1]
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 1
    data = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in data["runs"]) == [0, 1, 2]
    assert not data["complete"] and data["header"]["ranks that did not finish"] == [1]
    assert "ranks [1] did not finish" in capsys.readouterr().err


def test_rank_files_of_an_earlier_launch_never_match(monkeypatch) -> None:
    from evals.cli import LAUNCH_ID_VARS, _fingerprint, build_parser

    for var in LAUNCH_ID_VARS:
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(["gated_deltanet-tiny", "--suite", "parity", "--out", "o"])
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    first = _fingerprint(args)
    assert _fingerprint(args) == first  # every rank of one launch agrees
    monkeypatch.setenv("SLURM_JOB_ID", "1002")  # the same command, launched again
    assert _fingerprint(args) != first
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    other = build_parser().parse_args(["gated_deltanet-tiny", "--suite", "parity", "--out", "o", "--seeds", "1"])
    assert _fingerprint(other) != first


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_device_is_refused_clearly(tmp_path, capsys) -> None:
    assert main(["gated_deltanet-tiny", "--suite", "parity", "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is visible here" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["5:2", "0:3"])
def test_an_empty_or_zero_length_range_is_refused_by_the_parser(value, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["gated_deltanet-tiny", "--suite", "parity", "--out", "unused", "--train-lengths", value])
    assert e.value.code == 2 and f"{value!r} is not a length range LO:HI" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["64", "64x", "x4", "64x0", "64*4"])
def test_a_malformed_mqar_grid_is_refused_with_its_form(value, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["gated_deltanet-tiny", "--suite", "mqar", "--out", "unused", "--mqar-test", f"128x8,{value}"])
    assert e.value.code == 2
    assert f"{value!r} is not SEQ_LENxPAIRS (positive whole numbers), e.g. 64x4,128x8" in capsys.readouterr().err
