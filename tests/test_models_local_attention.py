"""Local attention: blockwise forward vs brute-force masked attention, packing, step and prefill."""
import math

import pytest
import torch

from pretrain.model_config import AttentionConfig, ModelConfig
from pretrain.models.local_attention import LocalAttention

D_MODEL = 32


def make(window: int, num_heads: int = 4, num_kv_heads: int = 1, head_dim: int | None = None) -> LocalAttention:
    cfg = ModelConfig(d_model=D_MODEL, attention=AttentionConfig(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, window=window, rope_theta=500.0))
    m = LocalAttention(cfg, 0)
    with torch.no_grad():  # sharper attention than the default init, so masks matter
        m.q_proj.weight.mul_(3.0)
        m.k_proj.weight.mul_(3.0)
    return m


def rope_complex(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation of the pairs (i, i + hd/2); x [T, heads, hd], pos [T]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rot = torch.polar(torch.ones(len(pos), half, dtype=torch.float64), pos[:, None].double() * freqs)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1).float()


def brute_force(m: LocalAttention, x: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Full T×T attention with an explicit mask; x [T, d], doc and pos [T] (one row)."""
    T = x.shape[0]
    H, KV, hd = m.num_heads, m.num_kv_heads, m.head_dim
    q = rope_complex((x @ m.q_proj.weight.T).view(T, H, hd), pos, m.rope_theta)
    k = rope_complex((x @ m.k_proj.weight.T).view(T, KV, hd), pos, m.rope_theta)
    v = (x @ m.v_proj.weight.T).view(T, KV, hd)
    t = torch.arange(T)
    allowed = (doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - m.window)
    out = torch.empty(T, H, hd)
    for h in range(H):
        g = h // (H // KV)
        scores = (q[:, h] @ k[:, g].T) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, g]
    return out.reshape(T, H * hd) @ m.out_proj.weight.T


HEADS = [(4, 1), (4, 2), (4, 4)]  # MQA, GQA, MHA


@pytest.mark.parametrize("heads,kv", HEADS)
@pytest.mark.parametrize("T,window", [(23, 5), (20, 5), (9, 1), (17, 40), (30, 29)])
def test_forward_matches_brute_force(heads, kv, T, window):
    torch.manual_seed(0)
    m = make(window, heads, kv)
    x = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        y = m(x)
        for b in range(2):
            ref = brute_force(m, x[b], torch.zeros(T, dtype=torch.long), torch.arange(T))
            torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [4, 64])
def test_packed_documents(window):
    torch.manual_seed(1)
    m = make(window, 4, 2)
    cu = torch.tensor([0, 7, 8, 19, 30], dtype=torch.int32)  # includes a length-1 document
    x = torch.randn(1, 30, D_MODEL)
    lengths = (cu[1:] - cu[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(4), lengths)
    pos = torch.arange(30) - cu[:-1].long()[doc]
    with torch.no_grad():
        y = m(x, cu_seqlens=cu)
        sep = torch.cat([m(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
        ref = brute_force(m, x[0], doc, pos)
    torch.testing.assert_close(y, sep, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[0], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window,kv", [(5, 1), (5, 2), (1, 1), (64, 2)])
def test_step_matches_forward(window, kv):
    torch.manual_seed(2)
    m = make(window, 4, kv)
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        y = m(x)
        cache = m.init_cache(2, x.device, x.dtype)
        ys = torch.stack([m.step(x[:, t], cache) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(ys, y, atol=1e-5, rtol=1e-5)
    assert cache["pos"].tolist() == [13, 13]


@pytest.mark.parametrize("window,split", [(4, 9), (16, 9), (6, 3)])
def test_prefill_then_step_matches_forward(window, split):
    torch.manual_seed(3)
    m = make(window, 4, 2)
    T = 15
    x = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        y = m(x)
        cache = m.init_cache(2, x.device, x.dtype)
        y_pre = m(x[:, :split], cache=cache)
        y_mid = m(x[:, split:split + 2], cache=cache)  # a second chunk continues the first
        y_post = torch.stack([m.step(x[:, t], cache) for t in range(split + 2, T)], dim=1)
    torch.testing.assert_close(torch.cat([y_pre, y_mid, y_post], dim=1), y, atol=1e-5, rtol=1e-5)


def test_window_limits_what_a_token_sees():
    torch.manual_seed(4)
    m = make(3)
    x = torch.randn(1, 12, D_MODEL)
    x2 = x.clone()
    x2[:, 5] += 1.0  # only tokens 5, 6, 7 can see position 5
    with torch.no_grad():
        diff = (m(x) - m(x2)).abs().amax(-1)[0]
    assert (diff[:5] == 0).all() and (diff[8:] == 0).all() and (diff[5:8] > 0).all()


def test_backward_gives_finite_gradients():
    torch.manual_seed(5)
    m = make(4, 4, 2)
    x = torch.randn(1, 18, D_MODEL, requires_grad=True)
    m(x, cu_seqlens=torch.tensor([0, 1, 11, 18])).square().sum().backward()
    for name, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_heads_are_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        make(4, num_heads=4, num_kv_heads=3)
