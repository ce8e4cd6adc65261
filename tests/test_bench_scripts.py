"""The GPU session scripts refuse bad input before touching a (scarce) GPU lease."""
from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"gpu_session.sh": "GPU_SESSION_STAGES", "gpu_evals.sh": "EVALS_STAGES"}


def _run(script: str, *args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_header_from_any_directory(script, tmp_path):
    res = _run(script, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Exit status" in res.stdout and "set -u" not in res.stdout
    assert not any(line.startswith("#") for line in res.stdout.splitlines())


@pytest.mark.parametrize("script,var", SCRIPTS.items())
def test_bad_arguments_and_stages_exit_2_naming_the_fix(script, var, tmp_path):
    res = _run(script, "everything", OUT=str(tmp_path))
    assert res.returncode == 2 and var in res.stderr and "takes no arguments" in res.stderr
    res = _run(script, OUT=str(tmp_path), **{var: "env,bogus"})
    assert res.returncode == 2
    assert f"unknown stage 'bogus' in {var}; choose from: env," in res.stderr
    assert not (tmp_path / "summary.txt").exists()  # refused before any stage ran


def test_elementwise_kernel_benchmarks_run_their_three_paths(monkeypatch, capsys):
    """bench_scan_conv_ssd's fused-op rows on the CPU (kernels interpreted, the timer replaced
    by one call): each op's triton, torch and eager paths run forward and backward, and the
    GB/s columns are filled. Catches a broken benchmark before a GPU session spends on it."""
    import argparse

    import torch

    pytest.importorskip("triton")
    from bench import bench_scan_conv_ssd as bsc
    from kernel_checks import interpreted_module

    modules = [f"kernels.triton.{m}" for m in ("jit_math", "rms_norm", "gated_activation", "l2_normalize",
                                               "rg_lru_gates")]
    monkeypatch.setattr(bsc, "DEVICE", "cpu")
    monkeypatch.setattr(bsc, "bench", lambda fn: (fn(), 1.0)[1])
    args = argparse.Namespace(tokens=32, seqlen=16, dim=24, norm_group=8, hidden=40, l2_heads=3, l2_dim=8,
                              no_torch=False)
    with interpreted_module(*modules):
        for op in (bsc.bench_rms_norm, bsc.bench_gated_activation, bsc.bench_l2_normalize, bsc.bench_rg_lru_gates):
            rows = op(args, torch.float32)
            assert [r["impl"] for r in rows] == ["triton", "torch", "eager composition"], op.__name__
            assert all(r["GB/s fwd"] > 0 and r["GB/s fwd+bwd"] > 0 for r in rows)
    assert "failed" not in capsys.readouterr().out


def test_the_gpu_session_runs_the_headline_figures_first(tmp_path):
    """A dry run with a stand-in interpreter: the kernels are warmed first, then the stages
    run in the order that decides the most if a lease ends early (GDP vs fla, GDP's launch
    variants, training, SSD, the scan and convolution; then the GPU tests, the
    GatedDeltaProduct module first), each under its cap, and the summary lists them."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "WHEELS_DIR": str(tmp_path / "none")}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    modules = [line.split()[1] for line in calls.read_text().splitlines() if line.startswith("-m ")]
    assert modules == ["bench.warm_kernels", "bench.bench_gated_delta_product", "bench.bench_gated_delta_product",
                       "bench.bench_train"] + ["bench.bench_scan_conv_ssd"] * 3 + ["pytest"], modules
    # every stage's default arguments parse: a misspelt variant would fail on the GPU, at the lease's cost
    for line in calls.read_text().splitlines():
        words = line.split()
        if len(words) > 1 and words[0] == "-m" and words[1].startswith("bench."):
            importlib.import_module(words[1]).parse_args(words[2:])
    pytest_call = next(line for line in calls.read_text().splitlines() if line.startswith("-m pytest"))
    listed = [w for w in pytest_call.split() if w.startswith("tests/")]
    assert listed[0] == "tests/test_triton_gated_delta_product.py" and len(listed) == len(set(listed))
    stages = [line.split()[0] for line in (out / "summary.txt").read_text().splitlines()[:10]]
    assert stages == ["wheels", "env", "warm", "gdp", "gdp_more", "train", "ssd", "scan", "conv", "pytest"]
