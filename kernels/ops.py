"""The public ops. Each validates its inputs once, then dispatches to a backend.

Signatures are stable: the Triton kernels implement exactly these. The torch backend is
the chunked reference (fast enough to train tiny models on a CPU); the naive per-token
forms in ``kernels.reference`` are the oracle for tests.
"""
from __future__ import annotations

import torch

from .dispatch import resolve_backend, triton_impl
from .reference import causal_conv1d as _conv_ref
from .reference import gated_activation as _act_ref
from .reference import gated_delta_product as _gdp_ref
from .reference import l2_normalize as _l2_ref
from .reference import linear_recurrence as _lr_ref
from .reference import rg_lru_gates as _rglru_ref
from .reference import rms_norm as _norm_ref
from .reference import ssd as _ssd_ref
from .varlen import check_cu_seqlens

State = torch.Tensor | None


def _num_seqs(batch: int, cu_seqlens: torch.Tensor | None) -> int:
    return batch if cu_seqlens is None else cu_seqlens.numel() - 1


def _check_state(op: str, state: State, expected: tuple[int, ...], name: str = "initial_state") -> None:
    if state is not None and tuple(state.shape) != expected:
        raise ValueError(f"{op}: {name} must have shape {list(expected)}, got {list(state.shape)}")


def gated_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    """Gated DeltaProduct: per token decay by exp(g), then n_h Householder-like updates.

    q [B,T,H,K], k [B,T,n_h,H,K], v [B,T,n_h,H,V], beta [B,T,n_h,H], g [B,T,H] (<= 0),
    states [N,H,K,V] fp32. Returns (o [B,T,H,V], final_state or None).
    """
    op = "gated_delta_product"
    B, T, H, K = q.shape
    if k.dim() != 5 or k.shape[0] != B or k.shape[1] != T or k.shape[3:] != (H, K):
        raise ValueError(f"{op}: k must be [B,T,n_h,H,K]={[B, T, 'n_h', H, K]}, got {list(k.shape)}")
    n_h = k.shape[2]
    if v.dim() != 5 or v.shape[:4] != (B, T, n_h, H):
        raise ValueError(f"{op}: v must be [B,T,n_h,H,V] with n_h={n_h}, got {list(v.shape)}")
    if beta.shape != (B, T, n_h, H):
        raise ValueError(f"{op}: beta must be {[B, T, n_h, H]}, got {list(beta.shape)}")
    if g is not None and g.shape != (B, T, H):
        raise ValueError(f"{op}: g must be {[B, T, H]}, got {list(g.shape)}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, T, B, op)
    _check_state(op, initial_state, (_num_seqs(B, cu_seqlens), H, K, v.shape[-1]))
    scale = K**-0.5 if scale is None else scale
    args = (q, k, v, beta, g)
    kwargs = dict(scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if resolve_backend(op, backend, q) == "triton":
        return triton_impl(op)(*args, **kwargs)
    return _gdp_ref.chunk_gated_delta_product(*args, **kwargs)


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    allow_neg_eigval: bool = False,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    save_state_every: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    """Mamba2 state-space duality scan with scalar decay per head.

    x [B,T,H,P], dt [B,T,H] (> 0), A [H] (< 0), B and C [B,T,G,N], D [H] or None,
    states [N_seq,H,P,N] fp32. a_t = exp(dt A), or 2 exp(dt A) - 1 with allow_neg_eigval;
    h_t = a_t h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t. ``save_state_every`` (a
    multiple of 64, default 64): tokens per chunk state the Triton path keeps for backward,
    which recomputes those in between; a memory/time trade that does not change results.
    """
    op = "ssd"
    Bsz, T, H, P = x.shape
    if dt.shape != (Bsz, T, H):
        raise ValueError(f"{op}: dt must be {[Bsz, T, H]}, got {list(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"{op}: A must be [{H}], got {list(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (Bsz, T) or B.shape != C.shape:
        raise ValueError(f"{op}: B and C must both be [B,T,G,N], got {list(B.shape)} and {list(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if H % G != 0:
        raise ValueError(f"{op}: number of heads {H} must be divisible by groups {G}")
    if D is not None and D.shape != (H,):
        raise ValueError(f"{op}: D must be [{H}], got {list(D.shape)}")
    if save_state_every is not None and (save_state_every < 64 or save_state_every % 64):
        raise ValueError(f"{op}: save_state_every must be a positive multiple of 64, got {save_state_every}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, T, Bsz, op)
    _check_state(op, initial_state, (_num_seqs(Bsz, cu_seqlens), H, P, N))
    args = (x, dt, A, B, C)
    kwargs = dict(D=D, allow_neg_eigval=allow_neg_eigval, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if resolve_backend(op, backend, x) == "triton":
        return triton_impl(op)(*args, **kwargs, save_every=save_state_every)
    return _ssd_ref.chunk_ssd(*args, **kwargs)


def linear_recurrence(
    x: torch.Tensor,
    a: torch.Tensor,
    *,
    initial_state: State = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    """Elementwise h_t = a_t h_{t-1} + x_t over [B,T,D] (the RG-LRU scan); state [N,D] fp32."""
    op = "linear_recurrence"
    if x.dim() != 3 or a.shape != x.shape:
        raise ValueError(f"{op}: x and a must both be [B,T,D], got {list(x.shape)} and {list(a.shape)}")
    Bsz, T, Dm = x.shape
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, T, Bsz, op)
    _check_state(op, initial_state, (_num_seqs(Bsz, cu_seqlens), Dm))
    kwargs = dict(initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if resolve_backend(op, backend, x) == "triton":
        return triton_impl(op)(x, a, **kwargs)
    return _lr_ref.chunk_linear_recurrence(x, a, **kwargs)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: State = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    """Depthwise causal conv over [B,T,D] with weight [D,W], W <= 4, never mixing documents.

    The conv state is the last W-1 inputs, [N, D, W-1] (zeros before a sequence's start).
    activation: None or "silu".
    """
    op = "causal_conv1d"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B,T,D], got {list(x.shape)}")
    Bsz, T, Dm = x.shape
    if weight.dim() != 2 or weight.shape[0] != Dm or not 1 <= weight.shape[1] <= 4:
        raise ValueError(f"{op}: weight must be [D={Dm}, W<=4], got {list(weight.shape)}")
    if bias is not None and bias.shape != (Dm,):
        raise ValueError(f"{op}: bias must be [{Dm}], got {list(bias.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"{op}: activation must be None or 'silu', got {activation!r}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, T, Bsz, op)
    _check_state(op, initial_state, (_num_seqs(Bsz, cu_seqlens), Dm, weight.shape[1] - 1))
    kwargs = dict(activation=activation, cu_seqlens=cu_seqlens, initial_state=initial_state,
                  output_final_state=output_final_state)
    if resolve_backend(op, backend, x) == "triton":
        return triton_impl(op)(x, weight, bias, **kwargs)
    return _conv_ref.chunk_causal_conv1d(x, weight, bias, **kwargs)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    gate: torch.Tensor | None = None,
    group: int | None = None,
    gate_first: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm of ``x [..., D]`` over each group of ``group`` channels (default D), times
    ``weight [D]``, in fp32, returned in x's dtype. With ``gate`` (x's shape):
    ``norm(x) * silu(gate)``, or ``norm(x * silu(gate))`` with ``gate_first`` (Mamba2).
    Backward keeps x, gate and an fp32 rstd per row, nothing else."""
    op = "rms_norm"
    D = x.shape[-1]
    group = group or D
    if tuple(weight.shape) != (D,):
        raise ValueError(f"{op}: weight must have shape [{D}] (x's last dim), got {list(weight.shape)}")
    if D % group:
        raise ValueError(f"{op}: group {group} must divide the last dim {D}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"{op}: gate must have x's shape {list(x.shape)}, got {list(gate.shape)}")
    if resolve_backend(op, backend, x) == "triton":
        return triton_impl(op)(x, weight, eps, gate, group, gate_first)
    return _norm_ref.rms_norm(x, weight, eps, gate, group, gate_first)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str = "silu", *,
                     backend: str = "auto") -> torch.Tensor:
    """``act(gate) * up`` with act SiLU (``kind="silu"``, SwiGLU) or tanh-GeLU (``"gelu"``,
    GeGLU), in gate's dtype. Backward keeps gate and up and recomputes the activation."""
    op = "gated_activation"
    if kind not in _act_ref.KINDS:
        raise ValueError(f"{op}: kind must be one of {_act_ref.KINDS}, got {kind!r}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"{op}: gate and up must have the same shape and dtype, got "
                         f"{list(gate.shape)} {gate.dtype} and {list(up.shape)} {up.dtype}")
    if resolve_backend(op, backend, gate) == "triton":
        return triton_impl(op)(gate, up, kind)
    return _act_ref.gated_activation(gate, up, kind)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """``x / sqrt(sum(x²) + eps)`` over the last dim, in fp32, returned in x's dtype (q and k
    of the delta rule). Backward keeps the output and an fp32 rstd per row, nothing else."""
    op = "l2_normalize"
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dim (normalised over the last)")
    if resolve_backend(op, backend, x) == "triton":
        return triton_impl(op)(x, eps)
    return _l2_ref.l2_normalize(x, eps)


def rg_lru_gates(x: torch.Tensor, gx_logits: torch.Tensor, ga_logits: torch.Tensor, a_param: torch.Tensor,
                 reset: torch.Tensor, *, c: float = 8.0, max_sqrt_gradient: float = 1000.0,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The RG-LRU's inputs to ``linear_recurrence``, both fp32 ``[..., W]``:
    ``x̃ = x·σ(gx)·sqrt(1 - a²)`` and ``a = exp(-c·σ(ga)·softplus(a_param))``; at rows where
    ``reset [..., 1]`` (bool) is True, x̃ = x·σ(gx) and a = 0 (a document start). The sqrt's
    derivative is capped at ``max_sqrt_gradient``. Backward keeps x, the logits and reset."""
    op = "rg_lru_gates"
    W = x.shape[-1]
    if gx_logits.shape != x.shape or ga_logits.shape != x.shape:
        raise ValueError(f"{op}: gx_logits and ga_logits must have x's shape {list(x.shape)}, got "
                         f"{list(gx_logits.shape)} and {list(ga_logits.shape)}")
    if a_param.shape != (W,):
        raise ValueError(f"{op}: a_param must be [{W}] (x's last dim), got {list(a_param.shape)}")
    if reset.dtype != torch.bool or reset.shape != (*x.shape[:-1], 1):
        raise ValueError(f"{op}: reset must be a bool tensor of shape {[*x.shape[:-1], 1]}, got "
                         f"{reset.dtype} {list(reset.shape)}")
    args = (x, gx_logits, ga_logits, a_param, reset, c, max_sqrt_gradient)
    if resolve_backend(op, backend, x) == "triton":
        return triton_impl(op)(*args)
    return _rglru_ref.rg_lru_gates(*args)
