"""Mamba2 mixer: parallel forward vs an explicit loop, step/prefill vs forward, packing, init."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model_config import Mamba2Config, ModelConfig
from pretrain.models.mamba2 import Mamba2

D_MODEL = 32


def make(n_groups: int = 1, allow_neg_eigval: bool = False, **kw) -> Mamba2:
    cfg = ModelConfig(d_model=D_MODEL, mamba2=Mamba2Config(
        d_state=8, head_dim=8, expand=2, n_groups=n_groups, conv_size=4,
        allow_neg_eigval=allow_neg_eigval, **kw))
    m = Mamba2(cfg, layer_idx=0)
    with torch.no_grad():  # larger dt and A than the default init so the state matters
        m.dt_bias.add_(2.0)
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
    return m


def loop_reference(m: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """Mamba2 written token by token from its definition (one sequence per batch row)."""
    Bsz, T, _ = x.shape
    H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.d_state
    zxbcdt = x @ m.in_proj.weight.T
    z, xBC, dt_raw = zxbcdt.split([m.d_inner, m.conv_dim, H], dim=-1)
    W = m.conv.weight.shape[1]
    xBC = F.conv1d(F.pad(xBC.transpose(1, 2), (W - 1, 0)), m.conv.weight[:, None, :], m.conv.bias,
                   groups=m.conv_dim).transpose(1, 2)
    xBC = F.silu(xBC)
    xs, Bm, Cm = xBC.split([m.d_inner, G * N, G * N], dim=-1)
    dt = F.softplus(dt_raw + m.dt_bias)
    A = -torch.exp(m.A_log)
    out = torch.zeros(Bsz, T, m.d_inner)
    for b in range(Bsz):
        h = torch.zeros(H, P, N)
        for t in range(T):
            y_t = []
            for hd in range(H):
                g = hd // (H // G)
                a = math.exp(dt[b, t, hd].item() * A[hd].item())
                if m.allow_neg_eigval:
                    a = 2 * a - 1
                xh = xs[b, t, hd * P:(hd + 1) * P]
                Bg = Bm[b, t, g * N:(g + 1) * N]
                Cg = Cm[b, t, g * N:(g + 1) * N]
                h[hd] = a * h[hd] + dt[b, t, hd] * torch.outer(xh, Bg)
                y_t.append(h[hd] @ Cg + m.D[hd] * xh)
            out[b, t] = torch.cat(y_t)
    gated = (out * F.silu(z)).view(Bsz, T, G, -1)
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    return normed.flatten(-2) * m.norm.weight @ m.out_proj.weight.T


CASES = [(g, neg) for g in (1, 2) for neg in (False, True)]


@pytest.mark.parametrize("n_groups,neg", CASES)
def test_forward_matches_loop_reference(n_groups, neg):
    torch.manual_seed(0)
    m = make(n_groups, neg)
    x = torch.randn(2, 11, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(m(x), loop_reference(m, x), atol=1e-5, rtol=1e-4)


def test_neg_eigval_changes_the_recurrence():
    torch.manual_seed(0)
    m = make(1, False)
    x = torch.randn(1, 12, D_MODEL)
    with torch.no_grad():
        y_pos = m(x)
        m.allow_neg_eigval = True
        y_neg = m(x)
    assert (y_pos - y_neg).abs().max() > 1e-3


@pytest.mark.parametrize("n_groups,neg", CASES)
def test_step_matches_forward(n_groups, neg):
    torch.manual_seed(1)
    m = make(n_groups, neg)
    x = torch.randn(2, 12, D_MODEL)
    with torch.no_grad():
        y = m(x)
        cache = m.init_cache(2, x.device, x.dtype)
        ys = torch.stack([m.step(x[:, t], cache) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(ys, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_groups,neg", CASES)
def test_prefill_then_step_matches_forward(n_groups, neg):
    torch.manual_seed(2)
    m = make(n_groups, neg)
    x = torch.randn(2, 14, D_MODEL)
    with torch.no_grad():
        y = m(x)
        cache = m.init_cache(2, x.device, x.dtype)
        y_pre = m(x[:, :9], cache=cache)
        y_post = torch.stack([m.step(x[:, t], cache) for t in range(9, 14)], dim=1)
    torch.testing.assert_close(y_pre, y[:, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_post, y[:, 9:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_groups,neg", CASES)
def test_packed_documents_equal_separate_runs(n_groups, neg):
    torch.manual_seed(3)
    m = make(n_groups, neg)
    cu = torch.tensor([0, 6, 7, 15, 20], dtype=torch.int32)  # includes a length-1 document
    x = torch.randn(1, 20, D_MODEL)
    with torch.no_grad():
        y = m(x, cu_seqlens=cu)
        sep = torch.cat([m(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
        unpacked = m(x)
    torch.testing.assert_close(y, sep, atol=1e-5, rtol=1e-5)
    assert (y[:, 6:] - unpacked[:, 6:]).abs().max() > 1e-4  # the boundaries did matter


def test_init_ranges():
    torch.manual_seed(4)
    cfg = ModelConfig(d_model=256, mamba2=Mamba2Config(d_state=4, head_dim=2, expand=2))
    m = Mamba2(cfg, 0)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= cfg.mamba2.dt_init_floor * 0.999
    assert dt.min() >= cfg.mamba2.dt_min * 0.999 and dt.max() <= cfg.mamba2.dt_max * 1.001
    # log-uniform: the median of log dt sits near the middle of the log range
    mid = 0.5 * (math.log(cfg.mamba2.dt_min) + math.log(cfg.mamba2.dt_max))
    assert abs(dt.log().median().item() - mid) < 0.5
    A = -torch.exp(m.A_log)
    lo, hi = cfg.mamba2.A_init_range
    assert (-A).min() >= lo * 0.999 and (-A).max() <= hi * 1.001
    torch.testing.assert_close(m.D.detach(), torch.ones_like(m.D))


def test_dt_limit_clamps():
    torch.manual_seed(5)
    m = make(1, False, dt_limit=(0.01, 0.05))
    dt = m._dt(torch.randn(3, 7, m.num_heads) * 5)
    assert dt.min() >= 0.01 - 1e-7 and dt.max() <= 0.05 + 1e-7


def test_backward_gives_finite_gradients_for_all_parameters():
    torch.manual_seed(6)
    m = make(2, True)
    x = torch.randn(1, 10, D_MODEL, requires_grad=True)
    m(x, cu_seqlens=torch.tensor([0, 4, 10])).square().sum().backward()
    for name, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_cache_with_cu_seqlens_is_rejected():
    m = make()
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(1, 4, D_MODEL), cu_seqlens=torch.tensor([0, 4]), cache=m.init_cache(1, "cpu", torch.float32))


def test_bad_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2(ModelConfig(d_model=30, mamba2=Mamba2Config(head_dim=16)), 0)
