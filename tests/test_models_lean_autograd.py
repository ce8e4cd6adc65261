"""The memory-lean autograd functions against the plain PyTorch compositions they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.griffin import RGLRU_C, rg_lru_inputs, sqrt_bound_derivative
from pretrain.models.lean_autograd import gated_activation, l2_normalize, rms_norm


def plain_rms_norm(x, w, eps, gate=None, group=None, gate_first=False):
    xf = x.float()
    if gate is not None and gate_first:
        xf = xf * F.silu(gate.float())
    xg = xf.unflatten(-1, (-1, group or x.shape[-1]))
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * w.float()
    if gate is not None and not gate_first:
        y = y * F.silu(gate.float())
    return y.to(x.dtype)


def plain_l2_normalize(x, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def plain_rg_lru_inputs(x, gxl, gal, a_param, reset):
    gate_x, gate_a = torch.sigmoid(gxl.float()), torch.sigmoid(gal.float())
    log_a = -RGLRU_C * gate_a * F.softplus(a_param.float())
    multiplier = sqrt_bound_derivative(-torch.expm1(2.0 * log_a)).masked_fill(reset, 1.0)
    return x.float() * gate_x * multiplier, torch.exp(log_a).masked_fill(reset, 0.0)


def _grads(fn, inputs, seed=0):
    """Outputs and input gradients of ``fn`` under a fixed random upstream gradient."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in inputs if t.requires_grad]


def _assert_same(lean, plain, inputs, rtol, atol):
    lo, lg = _grads(lean, inputs)
    po, pg = _grads(plain, inputs)
    for a, b in zip(lo + lg, po + pg):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


NORM_CASES = [  # (shape, gate, group, gate_first)
    ((2, 5, 12), False, None, False),
    ((2, 5, 3, 8), True, None, False),   # GatedDeltaProduct's per-head gated o-norm
    ((2, 5, 12), True, 4, True),         # Mamba2: norm(x * silu(z)) over 3 groups
    ((2, 5, 12), True, None, True),
]


@pytest.mark.parametrize("shape,gated,group,gate_first", NORM_CASES)
def test_rms_norm_matches_plain_and_gradcheck(shape, gated, group, gate_first):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3
    gate = torch.randn(shape, dtype=torch.float64) if gated else None
    w = torch.rand(shape[-1], dtype=torch.float64) + 0.5

    def lean(x, w, *g):
        return rms_norm(x, w, 1e-6, gate=g[0] if g else None, group=group, gate_first=gate_first)

    def plain(x, w, *g):
        return plain_rms_norm(x, w, 1e-6, g[0] if g else None, group, gate_first)

    inputs = [x, w] + ([gate] if gated else [])
    torch.autograd.gradcheck(lean, [t.clone().requires_grad_() for t in inputs])
    _assert_same(lean, plain, [t.float() for t in inputs], rtol=1e-5, atol=1e-5)
    _assert_same(lean, plain, [t.bfloat16() for t in inputs[:1]] + [inputs[1].float()]
                 + [t.bfloat16() for t in inputs[2:]], rtol=2e-2, atol=2e-2)


def test_l2_normalize_matches_plain_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 8, dtype=torch.float64)
    torch.autograd.gradcheck(l2_normalize, [x.clone().requires_grad_()])
    _assert_same(l2_normalize, plain_l2_normalize, [x.float()], rtol=1e-5, atol=1e-6)
    _assert_same(l2_normalize, plain_l2_normalize, [x.bfloat16()], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["silu", "gelu"])
def test_gated_activation_is_bit_identical_to_plain(kind):
    torch.manual_seed(0)
    g, up = torch.randn(4, 7, 16), torch.randn(4, 7, 16)
    act = F.silu if kind == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    torch.autograd.gradcheck(lambda a, b: gated_activation(a, b, kind),
                             [g.double().requires_grad_(), up.double().requires_grad_()])
    for dtype in (torch.float32, torch.bfloat16):
        _assert_same(lambda a, b: gated_activation(a, b, kind), lambda a, b: act(a) * b,
                     [g.to(dtype), up.to(dtype)], rtol=0, atol=0)
    with pytest.raises(ValueError, match="silu"):
        gated_activation(g, up, "relu")


def test_rg_lru_inputs_match_plain_including_resets_and_the_capped_sqrt():
    torch.manual_seed(0)
    B, T, W = 2, 6, 8
    x = torch.randn(B, T, W, dtype=torch.float64)
    gxl, gal = torch.randn(B, T, W, dtype=torch.float64), torch.randn(B, T, W, dtype=torch.float64) * 3
    a_param = torch.randn(W, dtype=torch.float64)
    reset = torch.zeros(B, T, 1, dtype=torch.bool)
    reset[:, 0] = True
    reset[1, 3] = True

    def lean(x, gxl, gal, a_param):
        return rg_lru_inputs(x, gxl, gal, a_param, reset)

    def plain(x, gxl, gal, a_param):
        return plain_rg_lru_inputs(x, gxl, gal, a_param, reset)

    inputs = [x, gxl, gal, a_param]
    torch.autograd.gradcheck(lean, [t.clone().requires_grad_() for t in inputs])
    _assert_same(lean, plain, [t.float() for t in inputs], rtol=1e-5, atol=1e-5)
    _assert_same(lean, plain, [t.bfloat16() for t in inputs[:3]] + [a_param.float()], rtol=2e-2, atol=2e-2)
    # a -> 1 (tiny gate_a): the sqrt's derivative is capped, as in the plain composition.
    gal_tiny = torch.full((B, T, W), -30.0)
    _assert_same(lean, plain, [x.float(), gxl.float(), gal_tiny, a_param.float()], rtol=1e-5, atol=1e-3)
