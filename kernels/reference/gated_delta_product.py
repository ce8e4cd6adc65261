"""Gated DeltaProduct references: naive per-token recurrence and chunked WY form."""
from __future__ import annotations

import torch

from ..varlen import packed_to_padded, padded_to_packed, seq_bounds

Tensor = torch.Tensor


def naive_gated_delta_product(q, k, v, beta, g=None, *, scale, initial_state=None,
                              output_final_state=False, cu_seqlens=None):
    """Token by token, exactly the recurrence of the op's definition (fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    n_h = k.shape[2]
    qf, kf, vf, bf = q.float(), k.float(), v.float(), beta.float()
    gf = g.float() if g is not None else None
    outs, finals = [], []
    for i, s, e in seq_bounds(cu_seqlens, B, T):
        b = 0 if cu_seqlens is not None else i
        S = initial_state[i].float() if initial_state is not None else q.new_zeros(H, K, V, dtype=torch.float32)
        seq_out = []
        for t in range(s, e):
            if gf is not None:
                S = S * gf[b, t].exp()[:, None, None]
            for j in range(n_h):
                kt, vt, bt = kf[b, t, j], vf[b, t, j], bf[b, t, j]
                kS = torch.einsum("hk,hkv->hv", kt, S)
                S = S + bt[:, None, None] * kt[:, :, None] * (vt - kS)[:, None, :]
            seq_out.append(scale * torch.einsum("hk,hkv->hv", qf[b, t], S))
        outs.append(torch.stack(seq_out) if seq_out else q.new_zeros(0, H, V, dtype=torch.float32))
        finals.append(S)
    o = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)


def default_chunk_size(head_k: int) -> int:
    """Sub-steps per chunk. Each chunk costs O(C^2 (K+V)) in parallel work plus a K x K
    state transition; on CPU the best C grows with K (measured: 32 for K<=32, ~K above)."""
    return min(128, max(32, head_k))


def chunk_gated_delta_product(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
    scale: float, initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked WY form of the naive recurrence: the CPU training path, plain autograd.

    ``chunk_size`` counts sub-steps (n_h per token; a chunk holds whole tokens).
    Packed documents are scattered into a right-padded batch; the padding steps (k=0,
    beta=0, g=0) are identity transitions, so each row's final state is its document's.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(q.shape[-1])
    if cu_seqlens is None:
        o, S = _chunk_dense(q, k, v, beta, g, scale, initial_state, chunk_size)
    else:
        pad = [packed_to_padded(x, cu_seqlens) for x in (q, k, v, beta)]
        gp = packed_to_padded(g, cu_seqlens) if g is not None else None
        o, S = _chunk_dense(*pad, gp, scale, initial_state, chunk_size)
        o = padded_to_packed(o, cu_seqlens)
    return o.to(q.dtype), (S if output_final_state else None)


def _chunk_dense(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, scale: float,
                 initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Dense batch [B,T,...] -> (o fp32 [B,T,H,V], final state fp32 [B,H,K,V]).

    The n_h Householder steps of a token are n_h consecutive sub-steps of one sequence; a
    chunk holds whole tokens, so a token's gate sits at its first sub-step and its output
    is read after its last. Within a chunk with entering state S0, the sub-step updates are
    delta = u - w S0 (WY form: (I + A) delta = beta (V - (K e^gam) S0), A strictly lower),
    o = scale (q e^gam S0 + P delta), and S' = e^gam_last S0 + K_out^T delta. All that does
    not involve S0 is computed for every chunk at once; the sequential part is one K x K by
    K x V matmul per chunk.
    """
    B, T, H, K = q.shape
    n_h, V = k.shape[2], v.shape[-1]
    f32, dev = torch.float32, q.device
    S = initial_state.to(f32) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=f32)
    if T == 0:
        return q.new_zeros(B, 0, H, V, dtype=f32), S
    ct = max(1, min(chunk_size // n_h, T))  # tokens per chunk
    nc = -(-T // ct)
    pad = nc * ct - T
    C = ct * n_h                            # sub-steps per chunk

    def split(x: Tensor, per_step: bool) -> Tensor:
        """[B,T,(n_h,)H,...] -> [B,H,nc,ct(*n_h),...]; the zero padding is identity steps."""
        x = x.to(f32)
        if pad:
            x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], 1)
        h_dim = 3 if per_step else 2
        x = x.movedim(h_dim, 1)
        return x.reshape(B, H, nc, C if per_step else ct, *x.shape[h_dim + 1:])

    qc, kc, vc, bc = split(q, False), split(k, True), split(v, True), split(beta, True)
    tok = torch.arange(C, device=dev) // n_h                      # sub-step -> token
    strict = torch.arange(C, device=dev)[:, None] > torch.arange(C, device=dev)[None, :]
    causal = torch.arange(ct, device=dev)[:, None] >= tok[None, :]  # token t sees sub-step p
    kk = kc @ kc.transpose(-1, -2)          # [B,H,nc,C,C]
    qk = qc @ kc.transpose(-1, -2)          # [B,H,nc,ct,C]
    if g is not None:
        # Every log decay is a sum of the gates it spans, never a difference of two
        # cumsums: a difference puts +x and -x on the gates before the span, which cancel
        # only up to fp32 rounding and drown the tiny true gradients of strongly negative
        # gates. Spans that would run backwards are -inf before exp (no inf, no NaN).
        gc = split(g, False)                # [B,H,nc,ct]
        gam = gc.cumsum(-1)                 # chunk start .. token t
        rest = torch.cat([gc[..., 1:], gc.new_zeros(*gc.shape[:-1], 1)], -1)
        rest = rest.flip(-1).cumsum(-1).flip(-1)  # after token t .. chunk end
        tri = torch.arange(ct, device=dev)[:, None] > torch.arange(ct, device=dev)[None, :]
        seg = gc[..., :, None].expand(*gc.shape, ct).masked_fill(~tri, 0.0).cumsum(-2)
        seg = seg.masked_fill(tri.T, float("-inf"))  # seg[t, s]: after token s .. token t
        seg_p = seg.repeat_interleave(n_h, -1)       # [.., token t, sub-step p]
        decay = seg_p.repeat_interleave(n_h, -2).masked_fill(~strict, float("-inf")).exp()
        A = kk * decay * bc[..., :, None]
        P = qk * seg_p.exp()
        k_in = kc * gam.repeat_interleave(n_h, -1).exp()[..., None]
        k_out = kc * rest.repeat_interleave(n_h, -1).exp()[..., None]
        q_in = qc * gam.exp()[..., None]
        eye_k = gam[..., -1:, None].exp() * torch.eye(K, device=dev, dtype=f32)  # [B,H,nc,K,K]
    else:
        A = (kk * bc[..., :, None]).masked_fill(~strict, 0.0)
        P = qk.masked_fill(~causal, 0.0)
        k_in = k_out = kc
        q_in = qc
        eye_k = torch.eye(K, device=dev, dtype=f32)
    # [w | u] = (I + A)^-1 diag(beta) [K_in | V]. An explicit unit diagonal is much faster
    # on CPU (forward and backward) than solve_triangular(..., unitriangular=True).
    rhs = torch.cat([k_in, vc], -1) * bc[..., None]
    wu = torch.linalg.solve_triangular(A + torch.eye(C, device=dev, dtype=f32), rhs, upper=False)
    w, u = wu.split([K, V], -1)
    q_eff = q_in - P @ w                    # o = scale (q_eff S0 + P u)
    o_u = P @ u
    k_out_t = k_out.transpose(-1, -2)
    M = eye_k - k_out_t @ w                 # S' = M S0 + b
    b = k_out_t @ u
    states = []
    for M_c, b_c in zip(M.unbind(2), b.unbind(2)):  # unbind: one backward, not nc scatters
        states.append(S)
        S = M_c @ S + b_c
    o = scale * (q_eff @ torch.stack(states, 2) + o_u)  # [B,H,nc,ct,V]
    o = o.reshape(B, H, nc * ct, V)[:, :, :T].transpose(1, 2).contiguous()
    return o, S
