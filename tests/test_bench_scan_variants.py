"""bench_scan_conv_ssd's ``--variants`` on the CPU (Triton kernels interpreted, the timer
replaced by one call): the option is parsed and refuses what it cannot time, and each
variant row runs forward and backward, checked against the default launch, in a table of
its own written after the op's table. Catches a broken variant before a GPU session."""
from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("triton")

from bench import bench_scan_conv_ssd as bsc  # noqa: E402
from kernel_checks import interpreted_module  # noqa: E402

MODULES = ("kernels.triton.linear_recurrence", "kernels.triton.ssd")


def test_variants_are_parsed_and_bad_ones_refused(capsys):
    assert bsc.parse_args([]).variants == []
    a = bsc.parse_args(["--ops", "linear_recurrence,ssd", "--variants", "bt64, chunk16,bt64"])
    assert a.variants == ["bt64", "chunk16"]  # stripped, repeats dropped
    with pytest.raises(SystemExit) as exc:
        bsc.parse_args(["--variants", "bt64,bt512"])
    assert exc.value.code == 2
    assert f"unknown variant(s) ['bt512']: choose from {', '.join(bsc.VARIANTS)}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a variant of an op not benched would time nothing
        bsc.parse_args(["--ops", "linear_recurrence", "--variants", "bt256,chunk16"])
    assert exc.value.code == 2
    assert "--variants chunk16: for ssd, which --ops linear_recurrence leaves out" in capsys.readouterr().err


@pytest.fixture
def cpu_bench(monkeypatch):
    monkeypatch.setattr(bsc, "DEVICE", "cpu")
    monkeypatch.setattr(bsc, "bench", lambda fn: (fn(), 1.0)[1])
    torch.manual_seed(0)
    with interpreted_module(*MODULES):
        yield


def test_variant_rows_run_and_are_checked_against_the_default(cpu_bench, monkeypatch, capsys):
    monkeypatch.setitem(bsc.VARIANTS, "bt3", ("linear_recurrence", dict(block_t=3), "not a power of two"))
    a = argparse.Namespace(tokens=40, seqlen=40, dim=8, heads=1, headdim=16, dstate=16, groups=1, neg=False,
                           dtype="float32", variants=["bt3", "bt128", "chunk16", "half_dots"])
    rows, notes = bsc.bench_variants("linear_recurrence", a, torch.float32)
    assert [r["impl"] for r in rows] == ["triton default (bt64 bd16)", "triton bt128"]
    assert "max rel err vs default" not in rows[0]
    assert all(r["max rel err vs default"] < 1e-5 for r in rows[1:])
    assert all(r["GB/s fwd"] > 0 and r["% copy bw (fwd)"] > 0 for r in rows)
    assert "bt128: 128-row time tiles" in notes[0] and "limit 0.001 in float32" in notes[0]
    out = capsys.readouterr().out
    assert "triton bt3: failed" in out  # reported, the other variants still timed
    assert "triton bt128 (128-row time tiles): max|diff| / max|default| h " in out

    rows, notes = bsc.bench_variants("ssd", a, torch.float32)  # T = 40: 3 chunks of 16, one partial
    assert [r["impl"] for r in rows] == ["triton default (chunk64s64)", "triton chunk16", "triton half_dots"]
    assert all(r["max rel err vs default"] < 1e-4 and r["TFLOP/s fwd+bwd"] > 0 for r in rows[1:])
    assert rows[2]["max rel err vs default"] == 0  # fp32 inputs keep fp32 dot operands
    lines = []
    bsc.report("ssd variants", rows, lines, notes)
    assert lines[0].startswith("| ssd variants | fwd ms | fwdbwd ms | TFLOP/s fwd | TFLOP/s fwd+bwd | "
                               "max rel err vs default | triton speed-up fwd |")
    assert lines[2].split(" | ")[5] == "-" and "e-" in lines[3].split(" | ")[5]
    assert lines[-2] == notes[0] and "OVER THE LIMIT" not in notes[0]
    assert "failed" not in capsys.readouterr().out


def test_main_writes_the_variant_table_after_the_ops_table(cpu_bench, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(bsc.fla_guard, "bypass_fla_triton_guard", lambda respect: None)
    results = tmp_path / "r.md"
    bsc.main(["--ops", "linear_recurrence", "--tokens", "16", "--seqlen", "16", "--dim", "8", "--dtype", "float32",
              "--no-torch", "--variants", "bt128", "--results", str(results)])
    tables = [line.split(" | ")[0] for line in results.read_text().splitlines() if line.startswith("| ")]
    assert tables == ["| linear_recurrence", "| triton", "| linear_recurrence variants",
                      "| triton default (bt64 bd16)", "| triton bt128"]
