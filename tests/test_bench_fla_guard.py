"""bench/fla_guard.py on the CPU: fla is not installed here, so its guard is a fake module tree.

The bypass must flip fla's flag only where fla's own guard would refuse (Hopper, Triton
>= 3.4.0 and < 3.7.1), leave it alone otherwise or when told to respect the guard, and the
benches must mark fla's rows while it is bypassed. Where the fla-core wheel is in wheels/,
the guard and its sites are read out of it, so a new fla release that moves them fails here.
"""
from __future__ import annotations

import ast
import sys
import types
import zipfile
from pathlib import Path

import pytest

from bench import fla_guard

ROOT = Path(__file__).resolve().parents[1]
WHEEL = next(iter(sorted((ROOT / "wheels").glob("fla_core-0.6.0-*.whl"))), None)
GUARD = "g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1"
# fla-core 0.6.0's guard, as fla/ops/common/chunk_o.py has it (checked against the wheel below)
GUARDED_FN = f"""
def chunk_bwd_dqkwg(g):
    if {GUARD}:
        raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")
    return "ran"
"""


def fake_fla(monkeypatch, hopper=True, above_3_4_0=True, above_3_7_1=False, flags=True) -> dict:
    """sys.modules gets an ``fla`` whose chunk_o (and one more op module) imported the three
    flags by name, as 0.6.0's chunk_o does; fla.utils defines them."""
    values = dict(IS_NVIDIA_HOPPER=hopper, TRITON_ABOVE_3_4_0=above_3_4_0, TRITON_ABOVE_3_7_1=above_3_7_1)
    names = ("fla", "fla.utils", "fla.ops", "fla.ops.common", "fla.ops.common.chunk_o", "fla.ops.other",
             "fla.ops.hgrn")
    mods = {n: types.ModuleType(n) for n in names}
    mods["fla"].__version__ = "0.6.0"
    for n in ("fla.utils", "fla.ops.common.chunk_o", "fla.ops.other"):
        if flags or n == "fla.utils":
            vars(mods[n]).update(values)
    mods["fla.ops.hgrn"].IS_NVIDIA_HOPPER = hopper  # one flag only: not a guard site
    exec(GUARDED_FN, vars(mods["fla.ops.common.chunk_o"]))
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    monkeypatch.setattr(fla_guard, "_note", None)
    return mods


def test_bypass_flips_every_guard_site_where_the_guard_refuses(monkeypatch, capsys):
    mods = fake_fla(monkeypatch)
    chunk_o = mods["fla.ops.common.chunk_o"]
    with pytest.raises(RuntimeError, match="incorrect results"):
        chunk_o.chunk_bwd_dqkwg(g=1.0)
    assert fla_guard.guard_sites() == ["fla.ops.common.chunk_o", "fla.ops.other"]
    note = fla_guard.bypass_fla_triton_guard()
    assert chunk_o.chunk_bwd_dqkwg(g=1.0) == "ran"  # the same function, now past the guard
    assert chunk_o.TRITON_ABOVE_3_7_1 is True and mods["fla.ops.other"].TRITON_ABOVE_3_7_1 is True
    assert mods["fla.utils"].TRITON_ABOVE_3_7_1 is False  # the definition is left alone
    assert chunk_o.IS_NVIDIA_HOPPER is True and chunk_o.TRITON_ABOVE_3_4_0 is True
    assert "fla-core 0.6.0" in note and "fla #640" in note and "upstream bug" in note
    assert "TRITON_ABOVE_3_7_1 = True in fla.ops.common.chunk_o, fla.ops.other" in note
    assert fla_guard.RESPECT_OPTION in note
    assert capsys.readouterr().out == f"note: {note}\n"
    assert fla_guard.bypass_note() == note and fla_guard.label("fla x") == f"fla x {fla_guard.FLAG}"
    assert fla_guard.bypass_fla_triton_guard() == note  # a second call: already bypassed


@pytest.mark.parametrize("conditions", [dict(hopper=False), dict(above_3_4_0=False), dict(above_3_7_1=True),
                                        dict(flags=False)],
                         ids=["not-hopper", "triton-below-3.4", "triton-3.7.1-up", "no-guard-in-fla"])
def test_bypass_leaves_fla_alone_where_its_guard_would_not_refuse(monkeypatch, capsys, conditions):
    mods = fake_fla(monkeypatch, **conditions)
    before = {n: dict(vars(m)) for n, m in mods.items()}
    assert fla_guard.bypass_fla_triton_guard() is None
    assert {n: dict(vars(m)) for n, m in mods.items()} == before
    if "flags" not in conditions:  # (without the flags the modelled guard has no names to read)
        assert mods["fla.ops.common.chunk_o"].chunk_bwd_dqkwg(g=1.0) == "ran"
    assert fla_guard.bypass_note() is None and fla_guard.label("fla x") == "fla x"
    assert capsys.readouterr().out == ""


def test_respecting_the_guard_changes_nothing_and_says_so(monkeypatch, capsys):
    mods = fake_fla(monkeypatch)
    assert fla_guard.bypass_fla_triton_guard(respect=True) is None
    assert mods["fla.ops.common.chunk_o"].TRITON_ABOVE_3_7_1 is False
    with pytest.raises(RuntimeError, match="incorrect results"):
        mods["fla.ops.common.chunk_o"].chunk_bwd_dqkwg(g=1.0)
    out = capsys.readouterr().out
    assert out.startswith(f"fla Triton guard respected ({fla_guard.RESPECT_OPTION})") and "will fail" in out
    assert fla_guard.bypass_note() is None


def test_without_fla_the_bypass_does_nothing(monkeypatch, capsys):
    monkeypatch.setattr(fla_guard, "_note", None)
    monkeypatch.setitem(sys.modules, fla_guard.GUARD_MODULE, None)  # its import raises
    assert fla_guard.bypass_fla_triton_guard() is None
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(WHEEL is None, reason="the fla-core 0.6.0 wheel is not in wheels/")
def test_the_wheels_guard_is_the_one_modelled_and_chunk_o_is_its_only_site():
    """Every fla module that imports the three flags by name (outside fla/utils), and every
    use of TRITON_ABOVE_3_7_1: only chunk_o, only in the guard that raises."""
    sites, uses = [], []
    with zipfile.ZipFile(WHEEL) as z:
        for member in z.namelist():
            if not member.endswith(".py") or member.startswith("fla/utils/"):
                continue
            src = z.read(member).decode()
            tree = ast.parse(src)
            imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        for a in n.names}
            if set(fla_guard.GUARD_FLAGS) <= imported:
                sites.append(member)
            uses += [(member, line.strip()) for line in src.splitlines()
                     if fla_guard.FLIPPED in line and not line.strip().startswith(fla_guard.FLIPPED)]
    assert sites == ["fla/ops/common/chunk_o.py"]
    assert fla_guard.GUARD_MODULE.replace(".", "/") + ".py" == sites[0]
    assert uses == [("fla/ops/common/chunk_o.py", f"if {GUARD}:")], uses


# ------------------------------------------------------------------ the benches' marks


def test_every_bench_takes_the_switch():
    from bench import bench_gated_delta_product as bg, bench_scan_conv_ssd as bsc, bench_train as bt

    for parse in (bg.parse_args, bsc.parse_args, bt.parse_args):
        assert parse([]).fla_respect_triton_guard is False  # bypassed by default
        assert parse([fla_guard.RESPECT_OPTION]).fla_respect_triton_guard is True


def test_gdp_results_flag_fla_rows_and_say_why(tmp_path):
    from bench import bench_gated_delta_product as bg

    row = dict(B=1, T=10, H=2, D=8, n_h=1, fwd=1.0, fwdbwd=3.0, tflops_fwdbwd=1.0, mem=5.0, first_s=2.5,
               err={"o": 0.5})
    rows = [dict(row, impl="ours"), dict(row, impl="fla_gdp", ratio_fwdbwd=0.8), dict(row, impl="fla_gdn")]
    bg.write_results(str(tmp_path / "r.md"), rows, "H200", "bfloat16", fla_note="NOTE: wrong gradients")
    text = (tmp_path / "r.md").read_text()
    assert "\nNOTE: wrong gradients\n" in text
    impls = [line.split("|")[6].strip() for line in text.splitlines() if line.startswith("| 1 ")]
    assert impls == ["ours", f"fla_gdp {fla_guard.FLAG}", f"fla_gdn {fla_guard.FLAG}"]
    assert text.count("5.0e-01!") == 3  # fla's RMSE is still reported (and flagged over its limit)
    bg.write_results(str(tmp_path / "plain.md"), rows, "H200", "bfloat16")
    assert fla_guard.FLAG not in (tmp_path / "plain.md").read_text()


def test_ssd_table_flags_the_fla_row_and_adds_the_note(monkeypatch):
    from bench import bench_scan_conv_ssd as bsc

    monkeypatch.setattr(fla_guard, "_note", "NOTE: wrong gradients")
    rows = [dict(impl="triton", fwd=1.0, fwdbwd=2.0, _step=print),
            dict(impl=fla_guard.label("fla chunk_simple_gla"), fwd=2.0, fwdbwd=4.0)]
    lines: list[str] = []
    bsc.report("ssd", rows, lines)
    assert lines[0] == "| ssd | fwd ms | fwdbwd ms | triton speed-up fwd | triton speed-up fwd+bwd |"  # no _step
    assert lines[3].startswith(f"| fla chunk_simple_gla {fla_guard.FLAG} | 2.000 | 4.000 |")
    assert lines[5].startswith("NOTE: wrong gradients") and "timings only" in lines[5]
    lines = []
    bsc.report("ssd", rows[:1], lines)
    assert not any("NOTE" in line for line in lines)


def test_train_table_flags_fla_rows_and_adds_the_note(monkeypatch, tmp_path):
    from bench import bench_train as bt

    monkeypatch.setattr(fla_guard, "_note", "NOTE: wrong gradients")
    row = dict(device="H200", mfu=0.1, peak_mem_gb=10.0, plan_mem_gb=9.5)
    rows = [dict(row, preset="p", gdp_kernel="ours", tokens_per_s=300.0),
            dict(row, preset="p", gdp_kernel="fla", tokens_per_s=200.0, fla_guard_bypassed=True)]
    assert bt.format_table(rows).splitlines()[2].split()[:4] == ["p", "fla", "(guard", "bypassed)"]
    args = bt.parse_args(["--steps", "3"])
    bt.write_results(str(tmp_path / "r.md"), rows, args)
    text = (tmp_path / "r.md").read_text()
    assert f"| p | fla {fla_guard.FLAG} | 200.0 |" in text and "NOTE: wrong gradients" in text
    bt.write_results(str(tmp_path / "plain.md"), rows[:1], args)
    assert "NOTE" not in (tmp_path / "plain.md").read_text()
