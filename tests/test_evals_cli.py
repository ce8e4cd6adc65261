"""The ``linrnn-eval`` command: help, clear errors for bad input, and a tiny end-to-end
run (also split over two ranks) that writes JSON, Markdown and plots."""
from __future__ import annotations

import json

import pytest
import torch

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
        assert len(row["curve"]) == 12
    md = (out / "results.md").read_text()
    assert "## parity" in md and "## s3" in md and "| 6 | 12 |" in md
    assert (out / "parity.png").stat().st_size > 1000 and (out / "s3.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_exported_checkpoint_config_is_benchmarked_and_runs_shard_over_ranks(tmp_path, monkeypatch) -> None:
    ckpt = tmp_path / "export"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(dump_config(load_model_config("mamba2-tiny", ["n_layers=1", "d_model=16",
                                                                                   "mamba2.head_dim=8",
                                                                                   "mamba2.d_state=8"])))
    out = tmp_path / "out"
    args = [str(ckpt), "--suite", "parity", "--out", str(out), "--seeds", "0,1,2", *TINY[8:]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert (out / "records.rank1-of-2.json").is_file() and not (out / "results.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in data["runs"]) == [0, 1, 2]
    assert data["summary"][0]["variant"] == "export" and data["header"]["ranks"] == 2
