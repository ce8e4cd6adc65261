"""Griffin RG-LRU block: loop reference, step/prefill vs forward, packing, document-start resets,
init, bounded sqrt grad."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.model_config import ModelConfig, RGLRUConfig
from pretrain.models.griffin import RGLRUBlock, reset_mask, sqrt_bound_derivative

D_MODEL = 24


def make(lru_width: int | None = 32, num_heads: int = 4) -> RGLRUBlock:
    m = RGLRUBlock(ModelConfig(d_model=D_MODEL, rglru=RGLRUConfig(lru_width=lru_width, num_heads=num_heads)), 0)
    with torch.no_grad():  # non-zero biases so every parameter shows up in the reference
        for lin in (m.linear_x, m.linear_y, m.out_proj):
            lin.bias.normal_(std=0.1)
        m.conv.bias.normal_(std=0.1)
        m.a_gate.bias.normal_(std=0.5)
        m.input_gate.bias.normal_(std=0.5)
    return m


def loop_reference(m: RGLRUBlock, x: torch.Tensor) -> torch.Tensor:
    """The block written token by token from the Griffin equations, with dense gate matrices.

    Each row is one document: at t = 0 the input is not scaled by sqrt(1 - a²) (recurrentgemma).
    """
    Bsz, T, _ = x.shape
    y_branch = F.gelu(F.linear(x, m.linear_y.weight, m.linear_y.bias), approximate="tanh")
    u = F.linear(x, m.linear_x.weight, m.linear_x.bias)
    W = m.conv.weight.shape[1]
    u = F.conv1d(F.pad(u.transpose(1, 2), (W - 1, 0)), m.conv.weight[:, None], m.conv.bias,
                 groups=m.lru_width).transpose(1, 2)
    dense = {name: torch.block_diag(*getattr(m, name).weight) for name in ("input_gate", "a_gate")}
    h = torch.zeros(Bsz, m.lru_width)
    out = []
    for t in range(T):
        gx = torch.sigmoid(u[:, t] @ dense["input_gate"] + m.input_gate.bias.flatten())
        ga = torch.sigmoid(u[:, t] @ dense["a_gate"] + m.a_gate.bias.flatten())
        a = torch.sigmoid(-m.a_param) ** (8.0 * ga)  # exp(-8 ga softplus(Λ)) = σ(-Λ)^(8 ga)
        h = a * h + (torch.sqrt(1 - a**2) if t > 0 else 1.0) * gx * u[:, t]
        out.append(h)
    return F.linear(torch.stack(out, 1) * y_branch, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("lru_width,num_heads", [(32, 4), (None, 1)])
def test_forward_matches_loop_reference(lru_width, num_heads):
    torch.manual_seed(0)
    m = make(lru_width, num_heads)
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(m(x), loop_reference(m, x), atol=1e-5, rtol=1e-4)


def test_step_matches_forward():
    torch.manual_seed(1)
    m = make()
    x = torch.randn(3, 15, D_MODEL)
    with torch.no_grad():
        y = m(x)
        cache = m.init_cache(3, x.device, x.dtype)
        ys = torch.stack([m.step(x[:, t], cache) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(ys, y, atol=1e-5, rtol=1e-5)


def test_prefill_then_step_matches_forward():
    torch.manual_seed(2)
    m = make()
    x = torch.randn(2, 16, D_MODEL)
    with torch.no_grad():
        y = m(x)
        cache = m.init_cache(2, x.device, x.dtype)
        y_pre = m(x[:, :10], cache=cache)
        y_post = torch.stack([m.step(x[:, t], cache) for t in range(10, 16)], dim=1)
    assert cache["h"].dtype == torch.float32
    torch.testing.assert_close(y_pre, y[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_post, y[:, 10:], atol=1e-5, rtol=1e-5)


def test_prefill_continuing_a_started_cache_does_not_reset():
    torch.manual_seed(8)
    m = make()
    x = torch.randn(2, 14, D_MODEL)
    with torch.no_grad():
        y = m(x)
        cache = m.init_cache(2, x.device, x.dtype)
        assert not cache["started"].any()
        parts = [m(x[:, :1], cache=cache), m(x[:, 1:7], cache=cache), m.step(x[:, 7], cache)[:, None],
                 m(x[:, 8:], cache=cache)]
    assert cache["started"].all()
    torch.testing.assert_close(torch.cat(parts, dim=1), y, atol=1e-5, rtol=1e-5)


def conv_output(m: RGLRUBlock, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    return m.conv(m.linear_x(x), cu_seqlens=cu_seqlens)


def test_rg_lru_output_at_document_start_is_the_unscaled_gated_input():
    torch.manual_seed(9)
    m = make()
    cu = torch.tensor([0, 5, 6, 6, 13], dtype=torch.int32)  # includes an empty document
    x = torch.randn(1, 13, D_MODEL)
    with torch.no_grad():
        u = conv_output(m, x, cu)
        reset = reset_mask(1, 13, x.device, cu_seqlens=cu)
        h, _ = m.rg_lru(u, reset, cu_seqlens=cu)
        gated = u * torch.sigmoid(m.input_gate(u))
    assert reset[0, :, 0].nonzero().flatten().tolist() == [0, 5, 6]
    torch.testing.assert_close(h[0, [0, 5, 6]], gated[0, [0, 5, 6]], atol=1e-6, rtol=1e-6)
    # elsewhere the input is scaled by sqrt(1 - a²) < 1 and the state carries over
    with torch.no_grad():
        ga = torch.sigmoid(m.a_gate(u[0, 1]))
        a = torch.exp(-8.0 * ga * F.softplus(m.a_param))
        expected = a * h[0, 0] + torch.sqrt(1 - a**2) * gated[0, 1]
    torch.testing.assert_close(h[0, 1], expected, atol=1e-6, rtol=1e-5)
    assert (h[0, 1] - gated[0, 1]).abs().max() > 1e-3


def test_first_token_ignores_the_decay_on_every_path():
    """At a reset h = gate_x · x whatever a is: changing Λ moves later tokens, never a first one."""
    torch.manual_seed(10)
    m = make()
    x = torch.randn(2, 9, D_MODEL)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)

    def outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cache = m.init_cache(2, x.device, x.dtype)
            return {"forward": m(x), "packed": m(x[:1], cu_seqlens=cu),
                    "prefill": m(x, cache=cache), "step": m.step(x[:, 0], m.init_cache(2, x.device, x.dtype))}

    before = outputs()
    with torch.no_grad():
        m.a_param.add_(1.5)
    after = outputs()
    for name, first in (("forward", [0]), ("packed", [0, 4]), ("prefill", [0])):
        torch.testing.assert_close(after[name][:, first], before[name][:, first], atol=1e-6, rtol=0, msg=name)
        later = [t for t in range(9) if t not in first]
        assert (after[name][:, later] - before[name][:, later]).abs().min() > 0, name
    torch.testing.assert_close(after["step"], before["step"], atol=1e-6, rtol=0)
    torch.testing.assert_close(before["step"], before["forward"][:, 0], atol=1e-5, rtol=1e-5)


def test_packed_documents_equal_separate_runs():
    torch.manual_seed(3)
    m = make()
    cu = torch.tensor([0, 1, 9, 10, 21], dtype=torch.int32)  # two length-1 documents
    x = torch.randn(1, 21, D_MODEL)
    with torch.no_grad():
        y = m(x, cu_seqlens=cu)
        sep = torch.cat([m(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
        unpacked = m(x)
    torch.testing.assert_close(y, sep, atol=1e-5, rtol=1e-5)
    assert (y[:, 1:] - unpacked[:, 1:]).abs().max() > 1e-4


def test_a_init_is_uniform_in_a_squared_within_range_at_gate_one():
    torch.manual_seed(4)
    m = RGLRUBlock(ModelConfig(d_model=D_MODEL, rglru=RGLRUConfig(lru_width=4096, num_heads=8)), 0)
    a = torch.exp(-8.0 * F.softplus(m.a_param.detach().double()))
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
    a2 = a.square()
    lo, hi = 0.9**2, 0.999**2
    assert abs(a2.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo) * 4
    # uniform in a²: each quarter of [lo, hi] holds about a quarter of the values
    counts = torch.histc(a2.float(), bins=4, min=lo, max=hi)
    assert (counts / a2.numel() - 0.25).abs().max() < 0.04


def test_recurrentgemma_a_init_puts_the_range_on_the_base_decay():
    """rglru.a_init=recurrentgemma: exp(-softplus(Λ)) in [0.9, 0.999] (its released code), so
    the decay at gate 1 is that to the 8th power."""
    torch.manual_seed(4)
    cfg = RGLRUConfig(lru_width=4096, num_heads=8, a_init="recurrentgemma")
    m = RGLRUBlock(ModelConfig(d_model=D_MODEL, rglru=cfg), 0)
    base = torch.exp(-F.softplus(m.a_param.detach().double()))
    assert base.min() >= 0.9 - 1e-6 and base.max() <= 0.999 + 1e-6
    assert base.square().mean().item() == pytest.approx((0.9**2 + 0.999**2) / 2, abs=0.005)
    decay = base**8
    assert decay.min() < 0.5 and decay.max() > 0.98


def test_sqrt_gradient_is_bounded_and_exact_away_from_zero():
    x = torch.tensor([0.0, 1e-12, 0.25, 4.0], requires_grad=True)
    sqrt_bound_derivative(x).sum().backward()
    torch.testing.assert_close(x.grad[2:], 0.5 / torch.sqrt(x.detach()[2:]))
    assert torch.isfinite(x.grad).all() and x.grad.max() <= 1000.0 + 1e-3
    plain = torch.tensor([0.0], requires_grad=True)
    torch.sqrt(plain).sum().backward()
    assert not torch.isfinite(plain.grad).all()  # what the bound protects against


def test_gradients_finite_when_a_tends_to_one():
    torch.manual_seed(5)
    m = make()
    with torch.no_grad():
        m.a_param.fill_(-200.0)  # softplus underflows to 0: a == 1 exactly, 1 - a² == 0
    x = torch.randn(1, 9, D_MODEL, requires_grad=True)
    m(x).square().sum().backward()
    for name, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_backward_gives_finite_gradients_for_all_parameters():
    torch.manual_seed(6)
    m = make()
    x = torch.randn(1, 12, D_MODEL, requires_grad=True)
    m(x, cu_seqlens=torch.tensor([0, 5, 12])).square().sum().backward()
    for name, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradients_match_loop_reference():
    torch.manual_seed(7)
    m = make(lru_width=16, num_heads=2)
    x = torch.randn(2, 7, D_MODEL, requires_grad=True)
    w = torch.randn(2, 7, D_MODEL)
    grads = []
    for fn in (m, lambda inp: loop_reference(m, inp)):
        m.zero_grad()
        x.grad = None
        (fn(x) * w).sum().backward()
        grads.append({"x": x.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_lru_width_must_split_into_heads():
    with pytest.raises(ValueError, match="num_heads"):
        make(lru_width=30, num_heads=4)
