"""GatedDeltaProduct mixer: recurrent step == parallel forward, packed == separate, grads."""
from __future__ import annotations

import pytest
import torch

from kernels.reference.gated_delta_product import naive_gated_delta_product
from pretrain.model_config import DeltaProductConfig, ModelConfig
from pretrain.models.gated_deltaproduct import GatedDeltaProduct, l2_normalize

pytestmark = pytest.mark.usefixtures("single_thread")


def make_mixer(n_h: int = 2, neg: bool = True, forget: bool = True, conv: int = 4,
               out_gate: bool = True, d_model: int = 24, seed: int = 0) -> GatedDeltaProduct:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=d_model, deltaproduct=DeltaProductConfig(
        num_heads=2, head_dim=8, expand_v=1.5, num_householder=n_h, use_forget_gate=forget,
        allow_neg_eigval=neg, conv_size=conv, use_output_gate=out_gate))
    mixer = GatedDeltaProduct(cfg, layer_idx=0)
    if forget:  # milder decay than the U(0, 16) init so early tokens still matter at the end
        with torch.no_grad():
            mixer.A_log.uniform_(-2.0, 0.0)
    return mixer


CASES = [(n_h, neg) for n_h in (1, 3) for neg in (False, True)]


@pytest.mark.parametrize("n_h,neg", CASES)
def test_step_equals_forward(n_h: int, neg: bool) -> None:
    mixer = make_mixer(n_h=n_h, neg=neg)
    x = torch.randn(2, 11, 24)
    y = mixer(x)
    cache = mixer.init_cache(2, x.device, x.dtype)
    steps = torch.stack([mixer.step(x[:, t], cache) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, y, rtol=1e-4, atol=1e-5)
    # The cached state after stepping equals the op's final state from a fresh prefill.
    cache2 = mixer.init_cache(2, x.device, x.dtype)
    torch.testing.assert_close(mixer(x, cache=cache2), y, rtol=1e-5, atol=1e-6)
    for key in cache:
        torch.testing.assert_close(cache2[key], cache[key], rtol=1e-4, atol=1e-5)


def test_a_bf16_mixer_steps_as_it_runs_in_parallel() -> None:
    """beta (in (0, 2)) reaches the recurrence in fp32 in both paths: a bf16 model decodes what
    its own forward computes (rounding beta to bf16 in one path only moved the outputs by ~3%
    of their spread)."""
    mixer = make_mixer(n_h=3, neg=True).bfloat16()
    x = torch.randn(2, 40, 24).bfloat16()
    y = mixer(x).float()
    cache = mixer.init_cache(2, x.device, x.dtype)
    head = mixer(x[:, :4], cache=cache)
    tail = torch.stack([mixer.step(x[:, t], cache) for t in range(4, 40)], dim=1)
    steps = torch.cat([head, tail], dim=1).float()
    assert (steps - y).abs().max() <= 1e-2 * y.std()


@pytest.mark.parametrize("forget,conv,out_gate", [(False, 0, False), (True, 2, False), (False, 3, True)])
def test_prefill_then_step_equals_forward_variants(forget: bool, conv: int, out_gate: bool) -> None:
    mixer = make_mixer(n_h=2, forget=forget, conv=conv, out_gate=out_gate)
    x = torch.randn(3, 9, 24)
    y = mixer(x)
    cache = mixer.init_cache(3, x.device, x.dtype)
    head = mixer(x[:, :5], cache=cache)
    tail = torch.stack([mixer.step(x[:, t], cache) for t in range(5, 9)], dim=1)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_h,neg", [(1, True), (3, False)])
def test_packed_documents_equal_separate(n_h: int, neg: bool) -> None:
    mixer = make_mixer(n_h=n_h, neg=neg)
    lengths = [3, 1, 7, 5]
    x = torch.randn(1, sum(lengths), 24)
    cu = torch.tensor([0, 3, 4, 11, 16], dtype=torch.int32)
    packed = mixer(x, cu_seqlens=cu)
    separate = torch.cat([mixer(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-6)
    # and the documents really interact when not separated (the test can tell them apart)
    assert not torch.allclose(mixer(x), packed, atol=1e-4)


def test_forward_matches_naive_recurrence_of_its_features() -> None:
    """The layer feeds the op what the paper prescribes: unit-norm q/k, beta = 2 sigmoid, g <= 0."""
    mixer = make_mixer(n_h=2, neg=True, conv=0)
    x = torch.randn(2, 6, 24)
    B, T = x.shape[:2]
    q = l2_normalize(torch.nn.functional.silu(mixer.q_proj(x)).view(B, T, 2, 8))
    k = l2_normalize(torch.nn.functional.silu(mixer.k_proj(x)).view(B, T, 2, 2, 8))
    v = torch.nn.functional.silu(mixer.v_proj(x)).view(B, T, 2, 2, 12)
    beta = 2 * torch.sigmoid(mixer.b_proj(x)).view(B, T, 2, 2)
    g = -mixer.A_log.exp() * torch.nn.functional.softplus(mixer.a_proj(x) + mixer.dt_bias)
    assert beta.max() < 2 and beta.min() > 0 and g.max() <= 0
    o, _ = naive_gated_delta_product(q, k, v, beta, g, scale=8**-0.5)
    expected = mixer.out_proj(mixer.o_norm(o, mixer.g_proj(x).view(B, T, 2, 12)).flatten(-2))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    mixer = make_mixer(n_h=2)
    x = torch.randn(2, 10, 24, requires_grad=True)
    mixer(x).pow(2).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_init_and_argument_checks() -> None:
    mixer = make_mixer(n_h=2, seed=3)
    mixer.reset_mixer_parameters()
    A = mixer.A_log.exp()
    assert ((A > 0) & (A <= 16)).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all()
    cache = mixer.init_cache(1, torch.device("cpu"), torch.float32)
    assert cache["state"].shape == (1, 2, 8, 12) and cache["state"].dtype == torch.float32
    with pytest.raises(ValueError, match="cache"):
        mixer(torch.randn(1, 4, 24), cu_seqlens=torch.tensor([0, 4]), cache=cache)
