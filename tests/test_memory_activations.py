"""The memory plan's per-block activation bytes against what autograd really keeps.

Every block of every family runs forward once on the Triton kernels' autograd functions
(under ``TRITON_INTERPRET=1``), in bf16 and fp32, and ``measured_activation_bytes`` counts
the tensors saved for backward; ``Block.activation_bytes_per_token`` must be within 5 %.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import interpreted_module  # noqa: E402
from model_families import FAMILIES, small_config  # noqa: E402
from pretrain.memory import measured_activation_bytes  # noqa: E402
from pretrain.models.block import Block  # noqa: E402
from pretrain.model_config import ModelConfig  # noqa: E402

TRITON_MODULES = ("kernels.triton.linear_recurrence", "kernels.triton.causal_conv1d", "kernels.triton.ssd",
                  "kernels.triton.gated_delta_product_common", "kernels.triton.gated_delta_product_fwd",
                  "kernels.triton.gated_delta_product_bwd", "kernels.triton.gated_delta_product")
LETTERS = {"D": "gated_deltaproduct", "M": "mamba2", "R": "rglru", "A": "local_attention"}


@pytest.fixture(scope="module")
def triton_backend():
    with interpreted_module(*TRITON_MODULES), pytest.MonkeyPatch.context() as mp:
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
    for T in (40, 130):
        x = torch.randn(2, T, cfg.d_model, dtype=dtype, requires_grad=True)
        measured = measured_activation_bytes(block, x) / x.shape[0] / T
        estimate = block.activation_bytes_per_token(dtype.itemsize, T)
        print(f"{family} {letter} {dtype} T={T}: measured {measured:.0f} B/token, estimate {estimate:.0f}")
        assert estimate == pytest.approx(measured, rel=0.05)
