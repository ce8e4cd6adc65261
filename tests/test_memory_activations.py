"""The memory plan's per-block activation bytes against what autograd really keeps.

Every block of every family runs forward once on the Triton kernels' autograd functions
(under ``TRITON_INTERPRET=1``), in bf16 and fp32, and ``measured_activation_bytes`` counts
the tensors saved for backward; ``Block.activation_bytes_per_token`` must be within 5 %.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("yaml")  # presets and configs; a bare GPU machine may lack it

from kernel_checks import interpreted_module  # noqa: E402
from kernels.triton.aot import KERNEL_MODULES  # noqa: E402  (every kernel module, in reload order)
from model_families import FAMILIES, small_config  # noqa: E402
from pretrain.memory import measured_activation_bytes  # noqa: E402
from pretrain.models.block import Block  # noqa: E402
from pretrain.model_config import ModelConfig  # noqa: E402

LETTERS = {"D": "gated_deltaproduct", "M": "mamba2", "R": "rglru", "A": "local_attention"}


@pytest.fixture(scope="module")
def triton_backend():
    with interpreted_module(*KERNEL_MODULES), pytest.MonkeyPatch.context() as mp:
        mp.setenv("LINRNN_KERNEL_BACKEND", "triton")
        yield


def _config(family: str) -> ModelConfig:
    # wider than the unit-test configs so per-token scalars do not dominate; window < T
    return small_config(family, d_model=64, window=24)


CASES = [(f, letter) for f in FAMILIES for letter in dict.fromkeys(small_config(f).pattern)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family,letter", CASES)
def test_block_activation_estimate_is_within_ten_percent(triton_backend, family, letter, dtype):
    cfg = _config(family)
    torch.manual_seed(0)
    block = Block(cfg, 0, LETTERS[letter]).to(dtype)
    T = 70  # past the attention window, not a multiple of it (a padded block); two SSD states
    x = torch.randn(2, T, cfg.d_model, dtype=dtype, requires_grad=True)
    measured = measured_activation_bytes(block, x) / x.shape[0] / T
    estimate = block.activation_bytes_per_token(dtype.itemsize, T)
    print(f"{family} {letter} {dtype} T={T}: measured {measured:.0f} B/token, estimate {estimate:.0f}")
    assert estimate == pytest.approx(measured, rel=0.05)


def test_sparser_ssd_states_save_memory_and_change_nothing_else(triton_backend):
    """mamba2.ssd_state_every=128 keeps half the chunk states (the estimate follows) and gives
    the same output and gradients: the backward recomputes the states in between."""
    import dataclasses

    T = 136  # two 64-token chunks and a partial one: state slots T // every + 1
    results = {}
    for every in (64, 128):
        cfg = small_config("mamba2")
        cfg = dataclasses.replace(cfg, mamba2=dataclasses.replace(cfg.mamba2, ssd_state_every=every))
        torch.manual_seed(0)
        block = Block(cfg, 0, "mamba2")
        x = torch.randn(1, T, cfg.d_model, requires_grad=True)
        measured = measured_activation_bytes(block, x) / T
        assert block.activation_bytes_per_token(4, T) == pytest.approx(measured, rel=0.05)
        block(x).pow(2).sum().backward()
        m = block.mixer
        grads = [x.grad, *(p.grad for p in block.parameters())]
        results[every] = (measured, 4 * m.num_heads * m.head_dim * m.d_state, grads)
    (m64, state_bytes, g64), (m128, _, g128) = results[64], results[128]
    assert m64 - m128 == pytest.approx((T // 64 - T // 128) * state_bytes / T)
    for a, b in zip(g64, g128):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["gated_deltaproduct-1.3b", "mamba2-1.3b", "griffin-1.3b"])
def test_plan_matches_a_gpu_forward_of_the_1_3b_blocks(preset, monkeypatch):
    """bf16, T = 4096, compiled kernels and the GPU's attention backend: the saved tensors are
    within 10 % of the estimate, and so is the allocator's growth across the forward."""
    from pretrain.config_loader import load_model_config

    monkeypatch.setenv("LINRNN_KERNEL_BACKEND", "triton")
    cfg = load_model_config(preset)
    T, elem = 4096, 2
    for letter in dict.fromkeys(cfg.pattern):
        torch.manual_seed(0)
        block = Block(cfg, 0, LETTERS[letter]).to("cuda", torch.bfloat16)
        x = torch.randn(1, T, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        estimate = block.activation_bytes_per_token(elem, T)
        saved = measured_activation_bytes(block, x) / T
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = block(x)
        torch.cuda.synchronize()
        # the output is new but not saved; the input is saved (by the first norm) but not new
        grown = (torch.cuda.memory_allocated() - before - y.numel() * elem + x.numel() * elem) / T
        del y
        assert estimate == pytest.approx(saved, rel=0.10), (preset, letter, saved, estimate)
        assert estimate == pytest.approx(grown, rel=0.10), (preset, letter, grown, estimate)
