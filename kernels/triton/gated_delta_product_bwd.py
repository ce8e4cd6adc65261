"""Backward kernels of the chunked Gated DeltaProduct (forward notation in _fwd).

Given each chunk's entering state S0 and the gradient dH of its leaving state:
  dD  = (K e^rest) dH + scale P^T dO               (``dd_local`` + ``dh``)
  dS0 = e^total dH + scale (Q e^cum)^T dO - W^T dD (``dh``: sequential, reverse chunks)
and then, per chunk in parallel (``grad``), with [W | U] = T diag(beta) [K e^cum | V],
T = (I + A)^-1: dRhs = T^T [dW | dU], dA = -dRhs [W | U]^T, and the chain rule down to
q, k, v, beta and the gates. Gate gradients are accumulated span by span (see
_common): dseg is zeroed on same-token pairs (their decay is exactly 1) and summed with
a reverse cumsum, so strongly negative gates keep exact tiny gradients.
The n_h sub-steps are rows of the same tiles: no padded n_h-times-longer sequence.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gated_delta_product_common import _sum_combine, chunk_gates, chunk_scores


@triton.jit
def gdp_dd_local_kernel(q_ptr, k_ptr, g_ptr, do_ptr, dd_ptr, chunk_ptr, scale,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                        BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        HAS_G: tl.constexpr, PREC: tl.constexpr):
    """dd = scale P^T dO: the intra-chunk part of dD (parallel over chunks)."""
    ic = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    tok0 = tl.load(chunk_ptr + 2 * ic)
    ntok = tl.load(chunk_ptr + 2 * ic + 1)
    i = tl.arange(0, BC)
    cv = iv * BV + tl.arange(0, BV)
    vm = cv < V
    rm = i < ntok * N_H
    last = rm & (i % N_H == N_H - 1)
    row = (tok0 * N_H + i).to(tl.int64)
    tok = (tok0 + i // N_H).to(tl.int64)
    dob = tl.load(do_ptr + tok[:, None] * (H * V) + h * V + cv[None, :],
                  mask=last[:, None] & vm[None, :], other=0.0).to(tl.float32)
    _, P, _ = chunk_scores(q_ptr, k_ptr, g_ptr, tok0, ntok, h, H, K, N_H, BC, BK, HAS_G, PREC)
    dd = tl.dot(tl.trans(P), dob, input_precision=PREC) * scale
    tl.store(dd_ptr + row[:, None] * (H * V) + h * V + cv[None, :], dd,
             mask=rm[:, None] & vm[None, :])


@triton.jit
def gdp_dh_kernel(q_ptr, k_ptr, g_ptr, w_ptr, do_ptr, dd_ptr, dht_ptr, chunk_ptr, seq_chunk_ptr,
                  dhs_ptr, dh0_ptr, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                  PREC: tl.constexpr):
    """State gradient pass: reverse over a sequence's chunks, fp32 dH in registers.

    Writes dhs[c] = gradient of chunk c's leaving state, completes dd in place, and dh0.
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    i = tl.arange(0, BC)
    ck = tl.arange(0, BK)
    cv = iv * BV + tl.arange(0, BV)
    km = ck < K
    vm = cv < V
    sm = km[:, None] & vm[None, :]
    s_off = h * (K * V) + ck[:, None] * V + cv[None, :]
    if HAS_DHT:
        dH = tl.load(dht_ptr + n.to(tl.int64) * (H * K * V) + s_off, mask=sm, other=0.0).to(tl.float32)
    else:
        dH = tl.full([BK, BV], 0.0, tl.float32)
    c0 = tl.load(seq_chunk_ptr + n)
    c1 = tl.load(seq_chunk_ptr + n + 1)
    for j in range(0, c1 - c0):
        ic = c1 - 1 - j
        tok0 = tl.load(chunk_ptr + 2 * ic)
        ntok = tl.load(chunk_ptr + 2 * ic + 1)
        rm = i < ntok * N_H
        last = rm & (i % N_H == N_H - 1)
        row = (tok0 * N_H + i).to(tl.int64)
        tok = (tok0 + i // N_H).to(tl.int64)
        tl.store(dhs_ptr + tl.cast(ic, tl.int64) * (H * K * V) + s_off, dH, mask=sm)
        kb = tl.load(k_ptr + row[:, None] * (H * K) + h * K + ck[None, :],
                     mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
        wb = tl.load(w_ptr + row[:, None] * (H * K) + h * K + ck[None, :],
                     mask=rm[:, None] & km[None, :], other=0.0)
        qb = tl.load(q_ptr + tok[:, None] * (H * K) + h * K + ck[None, :],
                     mask=last[:, None] & km[None, :], other=0.0).to(tl.float32)
        dob = tl.load(do_ptr + tok[:, None] * (H * V) + h * V + cv[None, :],
                      mask=last[:, None] & vm[None, :], other=0.0).to(tl.float32)
        dd_off = dd_ptr + row[:, None] * (H * V) + h * V + cv[None, :]
        ddm = rm[:, None] & vm[None, :]
        _, cum, rest, total, _ = chunk_gates(g_ptr, tok0, ntok, h, H, N_H, BC, HAS_G)
        dd = tl.load(dd_off, mask=ddm, other=0.0)
        dd += tl.dot(kb * tl.exp(rest)[:, None], dH, input_precision=PREC)
        tl.store(dd_off, dd, mask=ddm)
        qg = qb * (tl.exp(cum) * scale)[:, None]
        dH = (dH * tl.exp(total) + tl.dot(tl.trans(qg), dob, input_precision=PREC)
              - tl.dot(tl.trans(wb), dd, input_precision=PREC))
    if STORE_DH0:
        tl.store(dh0_ptr + n.to(tl.int64) * (H * K * V) + s_off, dH, mask=sm)


@triton.jit
def gdp_grad_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, w_ptr, u_ptr, t_ptr, hs_ptr, dhs_ptr,
                    d_ptr, dd_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr,
                    chunk_ptr, scale,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    HAS_G: tl.constexpr, PREC: tl.constexpr):
    """Per-chunk gradients of q, k, v, beta and g (loops over V blocks, all of K)."""
    ic = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(chunk_ptr + 2 * ic)
    ntok = tl.load(chunk_ptr + 2 * ic + 1)
    i = tl.arange(0, BC)
    ck = tl.arange(0, BK)
    km = ck < K
    rm = i < ntok * N_H
    last = rm & (i % N_H == N_H - 1)
    row = (tok0 * N_H + i).to(tl.int64)
    tok = (tok0 + i // N_H).to(tl.int64)
    rk = rm[:, None] & km[None, :]
    k_off = row[:, None] * (H * K) + h * K + ck[None, :]
    qb = tl.load(q_ptr + tok[:, None] * (H * K) + h * K + ck[None, :],
                 mask=last[:, None] & km[None, :], other=0.0).to(tl.float32)
    kb = tl.load(k_ptr + k_off, mask=rk, other=0.0).to(tl.float32)
    wb = tl.load(w_ptr + k_off, mask=rk, other=0.0)
    bb = tl.load(beta_ptr + row * H + h, mask=rm, other=0.0).to(tl.float32)
    tinv = tl.load(t_ptr + row[:, None] * (H * BC) + h * BC + i[None, :], mask=rm[:, None], other=0.0)
    _, cum, rest, total, seg = chunk_gates(g_ptr, tok0, ntok, h, H, N_H, BC, HAS_G)

    dqg = tl.full([BC, BK], 0.0, tl.float32)   # d(q e^cum), without scale
    dP = tl.full([BC, BC], 0.0, tl.float32)    # d(P), without scale
    dw = tl.full([BC, BK], 0.0, tl.float32)
    dkr = tl.full([BC, BK], 0.0, tl.float32)   # d(k e^rest)
    dA = tl.full([BC, BC], 0.0, tl.float32)
    db = tl.full([BC], 0.0, tl.float32)
    dtot = tl.full([BK, BV], 0.0, tl.float32)  # S0 * dH, summed at the end
    s_base = tl.cast(ic, tl.int64) * (H * K * V) + h * (K * V)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        vm = cv < V
        rv = rm[:, None] & vm[None, :]
        v_off = row[:, None] * (H * V) + h * V + cv[None, :]
        s_off = s_base + ck[:, None] * V + cv[None, :]
        sm = km[:, None] & vm[None, :]
        S0 = tl.load(hs_ptr + s_off, mask=sm, other=0.0)
        dH = tl.load(dhs_ptr + s_off, mask=sm, other=0.0)
        db_ = tl.load(d_ptr + v_off, mask=rv, other=0.0)
        ddb = tl.load(dd_ptr + v_off, mask=rv, other=0.0)
        ub = tl.load(u_ptr + v_off, mask=rv, other=0.0)
        vb = tl.load(v_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        dob = tl.load(do_ptr + tok[:, None] * (H * V) + h * V + cv[None, :],
                      mask=last[:, None] & vm[None, :], other=0.0).to(tl.float32)
        dqg += tl.dot(dob, tl.trans(S0), input_precision=PREC)
        dP += tl.dot(dob, tl.trans(db_), input_precision=PREC)
        dw -= tl.dot(ddb, tl.trans(S0), input_precision=PREC)
        dkr += tl.dot(db_, tl.trans(dH), input_precision=PREC)
        dtot += S0 * dH
        drv = tl.dot(tl.trans(tinv), ddb, input_precision=PREC)   # dRhs for the V part
        tl.store(dv_ptr + v_off, (drv * bb[:, None]).to(dv_ptr.dtype.element_ty), mask=rv)
        dA -= tl.dot(drv, tl.trans(ub), input_precision=PREC)
        db += tl.reduce(drv * vb, 1, _sum_combine)
    dqg = dqg * scale
    dP = dP * scale

    strict = i[:, None] > i[None, :]
    causal = i[:, None] >= i[None, :]
    e_cum = tl.exp(cum)
    e_rest = tl.exp(rest)
    E = tl.exp(tl.where(causal, seg, 0.0))
    # W = T diag(beta) (k e^cum)
    drk = tl.dot(tl.trans(tinv), dw, input_precision=PREC)
    dA -= tl.dot(drk, tl.trans(wb), input_precision=PREC)
    kg = kb * e_cum[:, None]
    db += tl.reduce(drk * kg, 1, _sum_combine)
    dkg = drk * bb[:, None]
    # A = beta_p (k_p . k_s) E, strictly lower
    dA = tl.where(strict, dA, 0.0)
    kk = tl.dot(kb, tl.trans(kb), input_precision=PREC)
    kkE = tl.where(strict, kk * E, 0.0)
    db += tl.reduce(dA * kkE, 1, _sum_combine)
    gm = dA * E * bb[:, None]
    # P = (q_p . k_s) E on s <= p
    qk = tl.dot(qb, tl.trans(kb), input_precision=PREC)
    dP = tl.where(causal, dP, 0.0)
    dPE = dP * E
    dq = dqg * e_cum[:, None] + tl.dot(dPE, kb, input_precision=PREC)
    dk = (tl.dot(gm + tl.trans(gm), kb, input_precision=PREC)
          + tl.dot(tl.trans(dPE), qb, input_precision=PREC)
          + dkg * e_cum[:, None] + dkr * e_rest[:, None])
    tl.store(dq_ptr + tok[:, None] * (H * K) + h * K + ck[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=last[:, None] & km[None, :])
    tl.store(dk_ptr + k_off, dk.to(dk_ptr.dtype.element_ty), mask=rk)
    tl.store(dbeta_ptr + row * H + h, db.to(dbeta_ptr.dtype.element_ty), mask=rm)
    if HAS_G:
        tpos = i // N_H
        cross = tpos[:, None] > tpos[None, :]
        dseg = tl.where(cross, dA * bb[:, None] * kkE + dPE * qk, 0.0)
        # dgam[p'] = sum_{p >= p', s < p'} dseg[p, s]
        dM = tl.associative_scan(dseg, 0, _sum_combine, reverse=True)
        dgam = tl.reduce(tl.where(i[None, :] < i[:, None], dM, 0.0), 1, _sum_combine)
        dcum = tl.reduce(dqg * qb * e_cum[:, None], 1, _sum_combine) + tl.reduce(dkg * kg, 1, _sum_combine)
        drest = tl.reduce(dkr * kb * e_rest[:, None], 1, _sum_combine)
        dgam += tl.reduce(tl.where(i[None, :] >= i[:, None], dcum[None, :], 0.0), 1, _sum_combine)
        dgam += tl.reduce(tl.where(i[None, :] < i[:, None], drest[None, :], 0.0), 1, _sum_combine)
        dgam += tl.reduce(tl.reduce(dtot, 1, _sum_combine), 0, _sum_combine) * tl.exp(total)
        first = rm & (i % N_H == 0)
        tl.store(dg_ptr + tok * H + h, dgam, mask=first)
