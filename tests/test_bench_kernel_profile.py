"""bench/kernel_profile.py and the benches' ``--profile`` on the CPU.

The CUDA profile itself needs a GPU; what it is turned into (per-kernel time per fwd+bwd,
share, host gap) is pure and checked here on synthetic records, plus the real
``key_averages()`` of a CPU run for the attribute names, and the way the benches behave
without CUDA (the same one-line exit as without ``--profile``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType

from bench import kernel_profile as kp

REPO = Path(__file__).resolve().parents[1]


def test_records_are_grouped_by_name_per_fwd_bwd():
    records = [("gdp_bwd_kernel", 3000.0, 4), ("gdp_prep_kernel", 500.0, 4), ("gdp_bwd_kernel", 1000.0, 4),
               ("void at::native::fill_kernel", 500.0, 2)]
    p = kp.profile_table(records, iters=2, wall_ms=3.0)
    assert [r.name for r in p.rows] == ["gdp_bwd_kernel", "gdp_prep_kernel", "void at::native::fill_kernel"]
    assert p.rows[0] == kp.KernelRow("gdp_bwd_kernel", 4.0, 2.0, 0.8)  # 4000 µs, 8 calls over 2 iterations
    assert [r.calls for r in p.rows] == [4.0, 2.0, 1.0]
    assert p.kernel_ms == pytest.approx(2.5) and sum(r.share for r in p.rows) == pytest.approx(1.0)
    assert p.host_gap_ms == pytest.approx(0.5)
    assert kp.profile_table(records, 1).host_gap_ms is None
    with pytest.raises(ValueError, match="iters must be >= 1"):
        kp.profile_table(records, 0)


def avg(key: str, us: float, count: int, device_type=DeviceType.CUDA, **kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(key=key, device_time_total=us, count=count, device_type=device_type, **kw)


def test_only_device_entries_of_key_averages_count():
    """A CPU op's device time is its kernels': counting it too would count them twice."""
    events = [avg("aten::mm", 900.0, 1, DeviceType.CPU), avg("sm90_xmma_gemm", 900.0, 1),
              avg("ssd_chunk_state_kernel", 300.0, 3), avg("Memset (Device)", 10.0, 1),
              avg("Activity Buffer Request", 50.0, 1),  # CUPTI's overhead, not ours
              types.SimpleNamespace(key="old_torch_kernel", cuda_time_total=90.0, count=1,
                                    device_type=DeviceType.CUDA)]
    assert kp.device_records(events) == [("sm90_xmma_gemm", 900.0, 1), ("ssd_chunk_state_kernel", 300.0, 3),
                                         ("Memset (Device)", 10.0, 1), ("old_torch_kernel", 90.0, 1)]
    p = kp.profile_table(events, 1)
    assert p.kernel_ms == pytest.approx(1.3) and "aten::mm" not in [r.name for r in p.rows]


def test_a_real_cpu_profile_has_the_attributes_and_no_device_kernels():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x @ x).sum().backward()
    events = prof.key_averages()
    assert any(e.key == "aten::mm" for e in events)
    p = kp.profile_table(events, 1, wall_ms=1.0)
    assert p.rows == [] and p.kernel_ms == 0.0 and p.host_gap_ms == 1.0


def test_markdown_table():
    long = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::BFloat16>|x>" * 2
    p = kp.profile_table([("gdp_prep_kernel", 3000.0, 5), (long, 1000.0, 10)], iters=5, wall_ms=1.0)
    lines = kp.format_profile(p, "ours at B=4")
    assert lines[0] == "\n### ours at B=4: device time per fwd+bwd by kernel (5 warm iterations)\n"
    assert lines[1:4] == ["| kernel | calls per fwd+bwd | ms per fwd+bwd | share |", "|---|---:|---:|---:|",
                          "| gdp_prep_kernel | 1 | 0.600 | 75.0% |"]
    name = lines[4].split(" | ")[0][2:]
    assert len(name) == kp.NAME_WIDTH and name.endswith("...") and "|" not in name
    assert lines[4].endswith(" | 2 | 0.200 | 25.0% |")
    assert lines[-1] == ("kernels 0.800 ms per fwd+bwd; wall 1.000 ms without the profiler; "
                         "host-side gap (wall - kernels) 0.200 ms (20.0% of wall).")
    empty = kp.format_profile(kp.profile_table([], 5), "t")
    assert "no device kernels recorded" in empty[3] and empty[-1] == "kernels 0.000 ms per fwd+bwd."


def test_without_cuda_the_profile_is_skipped_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    assert kp.profile_step(lambda: calls.append(1)) is None and calls == []
    assert kp.profile_lines(lambda: calls.append(1), "t") == [] and calls == []
    assert capsys.readouterr().out.count("profile skipped: torch.profiler's CUDA activity needs a CUDA GPU") == 2


def test_a_failing_profile_is_reported_not_fatal(monkeypatch, capsys):
    def broken(step, iters):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(kp, "profile_step", broken)
    assert kp.profile_lines(print, "t") == []
    assert "profile failed (RuntimeError: CUPTI_ERROR_NOT_INITIALIZED)" in capsys.readouterr().out


@pytest.mark.parametrize("module,args", [("bench_gated_delta_product", ["--target"]),
                                         ("bench_scan_conv_ssd", ["--ops", "ssd"])])
def test_profile_option_and_its_exit_without_cuda(monkeypatch, module, args):
    """Without CUDA the benches exit with their one-line message, --profile or not."""
    import importlib

    bench = importlib.import_module(f"bench.{module}")
    assert bench.parse_args(args).profile is False and bench.parse_args([*args, "--profile"]).profile is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main([*args, "--profile"])


def test_ssd_bench_keeps_only_the_triton_rows_step_for_the_profile(monkeypatch):
    from bench import bench_scan_conv_ssd as bsc

    monkeypatch.setattr(bsc, "bench", lambda fn: (fn(), 1.0)[1])
    x = torch.randn(4, requires_grad=True)
    monkeypatch.setattr(bsc, "PROFILE", True)
    mine, other = bsc.timed("triton", lambda: x * 2, [x]), bsc.timed("torch", lambda: x * 2, [x])
    assert callable(mine["_step"]) and "_step" not in other
    monkeypatch.setattr(bsc, "PROFILE", False)
    assert "_step" not in bsc.timed("triton", lambda: x * 2, [x])


def test_gpu_session_profiles_the_gdp_and_ssd_stages(tmp_path):
    """The dry run of tests/test_bench_scripts.py: --profile is in the gdp and ssd defaults only."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "WHEELS_DIR": str(tmp_path / "none"),
           "GPU_SESSION_STAGES": "gdp,ssd,scan,gdp_more"}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    bench_calls = [line for line in calls.read_text().splitlines() if line.startswith("-m bench.")]
    assert ["--profile" in line.split() for line in bench_calls] == [True, False, True, False], bench_calls
    assert "--ops ssd" in bench_calls[2]


def test_profile_module_imports_without_a_gpu_stack():
    """The benches import it at the top: it must not pull in triton or the profiler itself."""
    code = "import sys; import bench.kernel_profile, bench.fla_guard; print('triton' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@pytest.fixture
def fake_cuda_and_profiler(monkeypatch):
    """main() past its CUDA check on the CPU; the profile is a synthetic one of the step it gets."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    profiled = []

    def fake_profile_step(step, iters=kp.ITERS):
        step()
        profiled.append(step)
        return kp.profile_table([("fake_bwd_kernel", 300.0 * iters, iters)], iters, 0.5)

    monkeypatch.setattr(kp, "profile_step", fake_profile_step)
    return profiled


def test_gdp_main_writes_each_points_profile_after_its_rows(seeded_single_thread, monkeypatch, tmp_path,
                                                            fake_cuda_and_profiler):
    import kernels
    from bench import bench_gated_delta_product as bg, fla_guard

    make_inputs, randn, rand = bg.make_inputs, torch.randn, torch.rand

    def cpu_inputs(*args):
        with monkeypatch.context() as m:  # make_inputs asks for device="cuda"
            m.setattr(torch, "randn", lambda *s, device=None, **kw: randn(*s, **kw))
            m.setattr(torch, "rand", lambda *s, device=None, **kw: rand(*s, **kw))
            return make_inputs(*args)

    def torch_path(x, n_h, use_torch, use_fla, variants=()):
        def f():
            return kernels.gated_delta_product(x["q"], x["k"], x["v"], x["beta"], x["g"], backend="torch")[0]
        return {"ours": f, "fla_gdp": f}

    monkeypatch.setattr(bg, "make_inputs", cpu_inputs)
    monkeypatch.setattr(bg, "impls", torch_path)
    monkeypatch.setattr(bg, "bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bg, "peak_mib", lambda fn: 1.0)
    monkeypatch.setattr(fla_guard, "bypass_fla_triton_guard", lambda respect: None if respect else "NOTE bypassed")
    results = tmp_path / "r.md"
    bg.main(["--tokens", "32", "--seqlen", "16", "--heads", "2", "--headdim", "8", "--nh", "2,1",
             "--dtype", "float32", "--profile", "--results", str(results)])
    assert len(fake_cuda_and_profiler) == 2  # ours, once per point
    text = results.read_text()
    lines = text.splitlines()
    table, prof = "## gated_delta_product on FakeGPU (float32)", "### ours at B=2 T=16 H=2 K=V=8 n_h={} float32: " \
        "device time per fwd+bwd by kernel (5 warm iterations)"
    headings = [line for line in lines if line.startswith("#")]
    # ours and its profile reach the file before the comparators are measured (a stage cap
    # during fla's compile keeps them); the comparators' rows follow under a new header
    assert headings == [table, prof.format(2), table, table, prof.format(1), table]
    rows = [line.split(" | ")[5] for line in lines if line.startswith("| 2 | 16 |")]
    assert rows == ["ours", "fla_gdp (guard bypassed)"] * 2
    assert lines.index(prof.format(2)) < next(i for i, line in enumerate(lines) if "| fla_gdp" in line)
    assert "| fake_bwd_kernel | 1 | 0.300 | 100.0% |" in text and "host-side gap (wall - kernels) 0.200 ms" in text
    assert text.count("NOTE bypassed") == 4 and text.count("| fla_gdp (guard bypassed) |") == 2


def test_ssd_bench_main_writes_the_triton_rows_profile_after_the_table(monkeypatch, tmp_path, fake_cuda_and_profiler):
    pytest.importorskip("triton")
    from bench import bench_scan_conv_ssd as bsc
    from kernel_checks import interpreted_module

    monkeypatch.setattr(bsc, "DEVICE", "cpu")
    monkeypatch.setattr(bsc, "bench", lambda fn: (fn(), 1.0)[1])
    results = tmp_path / "r.md"
    with interpreted_module("kernels.triton.jit_math", "kernels.triton.l2_normalize"):
        bsc.main(["--ops", "l2_normalize", "--tokens", "32", "--seqlen", "16", "--l2-heads", "2", "--l2-dim", "8",
                  "--dtype", "float32", "--profile", "--results", str(results)])
    assert len(fake_cuda_and_profiler) == 1
    lines = results.read_text().splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("| l2_normalize |"))
    profile = next(i for i, line in enumerate(lines) if line.startswith("### l2_normalize triton"))
    assert table < profile and lines[profile + 4] == "| fake_bwd_kernel | 1 | 0.300 | 100.0% |"
