"""bench/warm_kernels.py on the CPU: what it lists, that its pool survives a failing config,
and that the 1.3B presets and the small GPU-test models ask for no kernel key it misses."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from bench import warm_kernels as wk  # noqa: E402

OPS = ("gated_delta_product", "ssd", "linear_recurrence", "causal_conv1d", "rms_norm", "gated_activation",
       "l2_normalize", "rg_lru_gates")


def test_list_names_the_session_configs_without_a_gpu(capsys):
    assert wk.main(["--list"]) == 0
    out = capsys.readouterr().out
    for n_h in (1, 2, 3):  # the GDP tolerance tests
        assert f"gated_delta_product H=2 K=128 n_h={n_h} dtype=bf16 +h0 +final" in out
    assert "gated_delta_product H=16 K=128 n_h=2 dtype=bf16  <- gdp --target" in out
    assert "gated_delta_product H=16 K=128 n_h=2 dtype=bf16 beta_g=fp32  <- train gated_deltaproduct-1.3b" in out
    assert "ssd H=64 P=64 G=1 N=128" in out and "ssd H=32 P=64 G=1 N=128" in out
    assert all(f"\n{i:3d} {op}" in "\n" + out for i, op in [(1, "gated_delta_product")])
    assert {op for op in OPS if f" {op} " in out} == set(OPS)
    assert f"{len(wk.CONFIGS)} of {len(wk.CONFIGS)} configurations" in out


def test_only_filters_on_name_and_uses(capsys):
    assert wk.main(["--list", "--only", "linear_recurrence"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"4 of {len(wk.CONFIGS)} configurations"
    assert all(" linear_recurrence " in line for line in lines[:-1])
    picked = wk.select(wk.CONFIGS, ["GDP_MORE", "scan bench"])  # case-insensitive, any of several
    assert sum("variant=" in c.name for c in picked) == 14  # gdp_more: its variants and plain ours
    assert [c.name for c in picked if "variant=" not in c.name] == [
        "gated_delta_product H=16 K=128 n_h=2 dtype=bf16", "gated_delta_product H=16 K=128 n_h=1 dtype=bf16",
        "linear_recurrence D=2560 n_seq=8 dtype=bf16"]
    assert wk.main(["--only", "no such kernel"]) == 2


def test_every_config_compiles_something_the_others_do_not():
    keys = [wk.config_signature(c) for c in wk.CONFIGS]
    assert len(set(keys)) == len(keys)


def test_every_tiny_call_passes_the_ops_checks_forward_and_backward(single_thread):
    """The calls the GPU runs, on the torch path: shapes the ops accept, outputs with gradients."""
    for cfg in wk.CONFIGS:
        wk.call_once(cfg, "cpu", backend="torch")


def test_spec_mirrors_tritons_int_specialisation():
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    for v in (1, 2, 16, 48, 2560, 4352, 17, 2**31, 2**31 + 16):
        kind, hint = native_specialize_impl(BaseBackend, v, False, True, True)
        want = "=1" if kind == "constexpr" else kind + ("/16" if hint == "D" else "")
        assert wk.spec(v) == want, v


def _fake_compile(cfg: wk.Config) -> float:
    """A CPU stand-in for run_config (module level, so the pool's workers can import it)."""
    if cfg.p.get("boom"):
        raise RuntimeError("ptxas failed\nsecond line")
    time.sleep(0.05)
    return 0.05


def test_pool_reports_a_failure_and_finishes_the_others():
    configs = [wk.C("rms_norm", "test", boom=True, N=1)] + [wk.C("rms_norm", "test", N=n) for n in (2, 3, 4)]
    lines: list[str] = []
    results = wk.run_pool(configs, _fake_compile, workers=2, context="fork", log=lines.append)
    assert len(results) == len(lines) == 4
    by_name = {c.name: (secs, err) for c, secs, err in results}
    assert by_name["rms_norm +boom N=1"] == (None, "RuntimeError: ptxas failed")
    assert all(by_name[f"rms_norm N={n}"] == (0.05, None) for n in (2, 3, 4))
    assert sum("FAILED  rms_norm +boom N=1: RuntimeError: ptxas failed" in s for s in lines) == 1
    assert lines[-1].startswith("[  4/4 ")
    assert wk.exit_status(results) == 0
    assert wk.exit_status([r for r in results if r[2]]) == 1 and wk.exit_status([]) == 0


def test_without_cuda_only_list_runs(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert wk.main(["--only", "ssd"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_run_where_every_config_fails_exits_1(monkeypatch, capsys):
    """The real path (spawned workers, run_config) on a machine without a GPU: each config
    fails in its worker, is reported, and the run still ends with its summary line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the parent's check only
    assert wk.main(["--only", "l2_normalize N=16", "--only", "l2_normalize N=256", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED  l2_normalize N=") == 2 and "[  2/2 " in out
    assert "0 of 2 configurations compiled, 2 failed, wall" in out


@pytest.fixture
def recorded(monkeypatch):
    """Signatures of every kernels.<op> call made while it is active (the calls still run)."""
    seen: set[tuple] = set()

    def spy(op, real):
        def call(*args, **kwargs):
            seen.add(wk.signature(op, args, kwargs))
            return real(*args, **kwargs)
        return call

    for op in OPS:
        monkeypatch.setattr(kernels, op, spy(op, getattr(kernels, op)))
    return seen


def _forward(cfg, dtype, batch: int, seq: int, lengths: list[list[int]]) -> None:
    """One packed forward of an LM of ``cfg`` in ``dtype`` (uninitialised weights: only the calls count)."""
    from pretrain.models import build_model
    from pretrain.models.packing import cu_seqlens_from_lengths

    lm = build_model(cfg, device="meta").to(dtype).to_empty(device="cpu")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.no_grad():
        lm.loss(ids, ids, cu_seqlens=cu_seqlens_from_lengths(lengths, seq))


def test_the_models_of_the_train_stage_and_gpu_tests_ask_only_for_warm_keys(recorded, single_thread):
    """bench_train's and test_memory_activations' 1.3B presets (bf16, one block of each kind),
    test_kernels_offsets_memo's small fp32 models and test_evals_bench's parity model."""
    from model_families import small_config
    from pretrain.config_loader import load_model_config

    for preset in ("gated_deltaproduct-1.3b", "mamba2-1.3b", "griffin-1.3b"):
        cfg = load_model_config(preset)
        # 256 tokens: rg_lru_gates' rows per program grow with the token count up to 256
        _forward(dataclasses.replace(cfg, n_layers=len(cfg.pattern), vocab_size=64), torch.bfloat16, 1, 256,
                 [[100, 156]])
    for family in ("gated_deltaproduct", "mamba2", "griffin"):
        _forward(small_config(family, n_layers=2, d_model=64, window=16), torch.float32, 4, 256,
                 [[100, 156], [256], [1, 255], [128, 128]])
    tiny = load_model_config("gated_deltanet-tiny")
    parity = dataclasses.replace(tiny, n_layers=1, d_model=32, vocab_size=8, mlp_type="none",
                                 deltaproduct=dataclasses.replace(
                                     tiny.deltaproduct, num_heads=2, head_dim=16, num_householder=1,
                                     use_forget_gate=False, conv_size=0, use_output_gate=False))
    _forward(parity, torch.float32, 32, 16, [[16]] * 32)
    warm = {wk.config_signature(c) for c in wk.CONFIGS}
    assert {key[0] for key in recorded} == set(OPS)
    missing = sorted(map(str, recorded - warm))
    assert not missing, "calls with no warm config:\n" + "\n".join(missing)
