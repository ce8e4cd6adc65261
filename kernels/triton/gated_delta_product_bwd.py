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

``grad`` holds all of K at once (by default up to K = 64: ``GRAD_SPLIT_ABOVE_BK``). Wider
heads split it in two: ``grad_kslice`` (per chunk and K slice: the V loop and the slice's
shares of the K sums) and ``grad_finish`` (per chunk: the V-only part, the sums, dbeta, dg,
then dq and dk slice by slice); every tile is then [64, slice] or [64, 64] whatever K is.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gated_delta_product_common import (_sum_combine, chunk_gates, chunk_masks, chunk_scores, chunk_span,
                                         load_tile, store_tile)


@triton.jit
def v_block(v0, row, rm, h, H: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """V block v0.. of a per-chunk gradient kernel's loop over V: (cv, vm: its columns and
    their mask, rv: the [BC, BV] mask, v_off: offsets into a [*, H, V] sub-step tensor)."""
    cv = v0 + tl.arange(0, BV)
    vm = cv < V
    rv = rm[:, None] & vm[None, :]
    v_off = row[:, None] * (H * V) + h * V + cv[None, :]
    return cv, vm, rv, v_off


@triton.jit
def load_inverse(t_ptr, row, rm, h, H: tl.constexpr, BC: tl.constexpr):
    """The chunk's T = (I + A)^-1 as the forward's prep kernel stored it, in fp32."""
    return tl.load(t_ptr + row[:, None] * (H * BC) + h * BC + tl.arange(0, BC)[None, :], mask=rm[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def v_rhs_grad(tinv, ddb, ub, vb, bb, dv_ptr, v_off, rv, dA, db, PREC: tl.constexpr, OPD: tl.constexpr):
    """The V half of [W | U] = T diag(beta) [K e^cum | V] on one V block: stores dv and
    returns dA and dbeta with the block's shares added."""
    drv = tl.dot(tl.trans(tinv), ddb, input_precision=PREC)   # dRhs for the V part
    tl.store(dv_ptr + v_off, (drv * bb[:, None]).to(dv_ptr.dtype.element_ty), mask=rv)
    dA -= tl.dot(drv.to(OPD), tl.trans(ub).to(OPD), input_precision=PREC)
    db += tl.reduce(drv * vb, 1, _sum_combine)
    return dA, db


@triton.jit
def gdp_dd_local_kernel(q_ptr, k_ptr, g_ptr, do_ptr, dd_ptr, chunk_ptr, scale,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                        BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        HAS_G: tl.constexpr, PREC: tl.constexpr, OPD: tl.constexpr):
    """dd = scale P^T dO: the intra-chunk part of dD (parallel over chunks)."""
    ic = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    tok0, ntok = chunk_span(chunk_ptr, ic)
    i = tl.arange(0, BC)
    cv = iv * BV + tl.arange(0, BV)
    vm = cv < V
    rm, last, row, tok = chunk_masks(i, tok0, ntok, N_H)
    dob = load_tile(do_ptr, tok, last, cv, vm, h, H, V)
    _, P, _ = chunk_scores(q_ptr, k_ptr, g_ptr, tok0, ntok, h, H, K, N_H, BC, BK, HAS_G, PREC, OPD)
    dd = tl.dot(tl.trans(P).to(OPD), dob.to(OPD), input_precision=PREC) * scale
    store_tile(dd_ptr, dd, row, rm, cv, vm, h, H, V)


@triton.jit
def gdp_dh_kernel(q_ptr, k_ptr, g_ptr, w_ptr, do_ptr, dd_ptr, dht_ptr, chunk_ptr, seq_chunk_ptr,
                  dhs_ptr, dh0_ptr, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                  PREC: tl.constexpr, OPD: tl.constexpr):
    """State gradient pass: reverse over a sequence's chunks, fp32 dH in registers.

    Writes dhs[c] = gradient of chunk c's leaving state, completes dd in place, and dh0.
    """
    # written out, no chunk or tile helpers: their calls change ptxas' code (see _common)
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
        tl.store(dhs_ptr + tl.cast(ic, tl.int64) * (H * K * V) + s_off, dH.to(dhs_ptr.dtype.element_ty),
                 mask=sm)
        kb = tl.load(k_ptr + row[:, None] * (H * K) + h * K + ck[None, :],
                     mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
        wb = tl.load(w_ptr + row[:, None] * (H * K) + h * K + ck[None, :],
                     mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + tok[:, None] * (H * K) + h * K + ck[None, :],
                     mask=last[:, None] & km[None, :], other=0.0).to(tl.float32)
        dob = tl.load(do_ptr + tok[:, None] * (H * V) + h * V + cv[None, :],
                      mask=last[:, None] & vm[None, :], other=0.0).to(tl.float32)
        dd_off = dd_ptr + row[:, None] * (H * V) + h * V + cv[None, :]
        ddm = rm[:, None] & vm[None, :]
        _, cum, rest, total, _ = chunk_gates(g_ptr, tok0, ntok, h, H, N_H, BC, HAS_G)
        dd = tl.load(dd_off, mask=ddm, other=0.0).to(tl.float32)
        dd += tl.dot((kb * tl.exp(rest)[:, None]).to(OPD), dH.to(OPD), input_precision=PREC)
        # dH goes on with this fp32 dd; only the stored copy is rounded.
        tl.store(dd_off, dd.to(dd_ptr.dtype.element_ty), mask=ddm)
        qg = qb * (tl.exp(cum) * scale)[:, None]
        # fp32 operands for dd entering dH, also with half OPD, as D entering the forward's
        # state (rounded here, dh0's error rose from 4.5e-3 to 7.1e-3 in the interpreter tests)
        dH = (dH * tl.exp(total) + tl.dot(tl.trans(qg).to(OPD), dob.to(OPD), input_precision=PREC)
              - tl.dot(tl.trans(wb), dd, input_precision=PREC))
    if STORE_DH0:
        tl.store(dh0_ptr + n.to(tl.int64) * (H * K * V) + s_off, dH, mask=sm)


@triton.jit
def gdp_grad_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, w_ptr, u_ptr, t_ptr, hs_ptr, dhs_ptr,
                    d_ptr, dd_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr,
                    chunk_ptr, scale,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    HAS_G: tl.constexpr, PREC: tl.constexpr, OPD: tl.constexpr):
    """Per-chunk gradients of q, k, v, beta and g (loops over V blocks, all of K)."""
    ic = tl.program_id(0)
    h = tl.program_id(1)
    tok0, ntok = chunk_span(chunk_ptr, ic)
    i = tl.arange(0, BC)
    ck = tl.arange(0, BK)
    km = ck < K
    rm, last, row, tok = chunk_masks(i, tok0, ntok, N_H)
    rk = rm[:, None] & km[None, :]
    k_off = row[:, None] * (H * K) + h * K + ck[None, :]
    # written out (q and T loads): a helper call here changes ptxas' code (see _common)
    qb = tl.load(q_ptr + tok[:, None] * (H * K) + h * K + ck[None, :],
                 mask=last[:, None] & km[None, :], other=0.0).to(tl.float32)
    kb = tl.load(k_ptr + k_off, mask=rk, other=0.0).to(tl.float32)
    wb = tl.load(w_ptr + k_off, mask=rk, other=0.0).to(tl.float32)
    bb = tl.load(beta_ptr + row * H + h, mask=rm, other=0.0).to(tl.float32)
    tinv = tl.load(t_ptr + row[:, None] * (H * BC) + h * BC + i[None, :], mask=rm[:, None],
                   other=0.0).to(tl.float32)
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
        cv, vm, rv, v_off = v_block(v0, row, rm, h, H, V, BV)
        # written out (S0, dH and dO loads): a helper call here changes ptxas' code (see _common)
        s_off = s_base + ck[:, None] * V + cv[None, :]
        sm = km[:, None] & vm[None, :]
        S0 = tl.load(hs_ptr + s_off, mask=sm, other=0.0).to(tl.float32)
        dH = tl.load(dhs_ptr + s_off, mask=sm, other=0.0).to(tl.float32)
        db_ = tl.load(d_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        ddb = tl.load(dd_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        ub = tl.load(u_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        vb = tl.load(v_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        dob = tl.load(do_ptr + tok[:, None] * (H * V) + h * V + cv[None, :],
                      mask=last[:, None] & vm[None, :], other=0.0).to(tl.float32)
        dqg += tl.dot(dob.to(OPD), tl.trans(S0).to(OPD), input_precision=PREC)
        dP += tl.dot(dob.to(OPD), tl.trans(db_).to(OPD), input_precision=PREC)
        dw -= tl.dot(ddb.to(OPD), tl.trans(S0).to(OPD), input_precision=PREC)
        dkr += tl.dot(db_.to(OPD), tl.trans(dH).to(OPD), input_precision=PREC)
        dtot += S0 * dH
        dA, db = v_rhs_grad(tinv, ddb, ub, vb, bb, dv_ptr, v_off, rv, dA, db, PREC, OPD)
    dqg = dqg * scale
    dP = dP * scale

    strict = i[:, None] > i[None, :]
    causal = i[:, None] >= i[None, :]
    e_cum = tl.exp(cum)
    e_rest = tl.exp(rest)
    E = tl.exp(tl.where(causal, seg, 0.0))
    # W = T diag(beta) (k e^cum)
    drk = tl.dot(tl.trans(tinv), dw, input_precision=PREC)
    dA -= tl.dot(drk.to(OPD), tl.trans(wb).to(OPD), input_precision=PREC)
    kg = kb * e_cum[:, None]
    db += tl.reduce(drk * kg, 1, _sum_combine)
    dkg = drk * bb[:, None]
    # A = beta_p (k_p . k_s) E, strictly lower
    dA = tl.where(strict, dA, 0.0)
    kk = tl.dot(kb.to(OPD), tl.trans(kb).to(OPD), input_precision=PREC)
    kkE = tl.where(strict, kk * E, 0.0)
    db += tl.reduce(dA * kkE, 1, _sum_combine)
    gm = dA * E * bb[:, None]
    # P = (q_p . k_s) E on s <= p
    qk = tl.dot(qb.to(OPD), tl.trans(kb).to(OPD), input_precision=PREC)
    dP = tl.where(causal, dP, 0.0)
    dPE = dP * E
    dq = dqg * e_cum[:, None] + tl.dot(dPE.to(OPD), kb.to(OPD), input_precision=PREC)
    dk = (tl.dot((gm + tl.trans(gm)).to(OPD), kb.to(OPD), input_precision=PREC)
          + tl.dot(tl.trans(dPE).to(OPD), qb.to(OPD), input_precision=PREC)
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


# The two kernels below are gdp_grad_kernel split along K, for heads too wide for it (its
# [64, K] tiles outgrow an sm_90 block at K = 256). What needs all of K (dA, the k.k and
# q.k scores, dbeta, dg) is a sum over K slices, written per slice by ``kslice`` and summed
# by ``finish`` in a fixed order (deterministic: no atomics). In them BK is the slice width.


@triton.jit
def gdp_grad_kslice_kernel(q_ptr, k_ptr, beta_ptr, g_ptr, w_ptr, t_ptr, hs_ptr, dhs_ptr, d_ptr,
                           dd_ptr, do_ptr, dqp_ptr, dkp_ptr, dak_ptr, red_ptr, chunk_ptr, scale,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                           BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           HAS_G: tl.constexpr, PREC: tl.constexpr, OPD: tl.constexpr):
    """One K slice of one chunk: gdp_grad_kernel's V loop restricted to the slice.

    Writes the slice's fp32 partial dq (scale dO S0^T e^cum) and dk (the W and k e^rest
    parts), its share -dRk W^T of dA (dak: [BC, BC] per slice) and four [BC] sums (red):
    dbeta's dRk.(k e^cum) part and, with gates, d(cum), d(rest) and sum(S0 * dH) (the
    chunk-total gate's part, the same in every entry).
    """
    ic = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    tok0, ntok = chunk_span(chunk_ptr, ic)
    i = tl.arange(0, BC)
    ck = j * BK + tl.arange(0, BK)
    km = ck < K
    rm, last, row, tok = chunk_masks(i, tok0, ntok, N_H)

    dqg = tl.full([BC, BK], 0.0, tl.float32)   # d(q e^cum), without scale
    dw = tl.full([BC, BK], 0.0, tl.float32)
    dkr = tl.full([BC, BK], 0.0, tl.float32)   # d(k e^rest)
    dtot = tl.full([BK], 0.0, tl.float32)      # S0 * dH summed over V
    s_base = tl.cast(ic, tl.int64) * (H * K * V) + h * (K * V)
    for v0 in range(0, V, BV):
        # written out: a helper call here changes ptxas' code (see _common)
        cv = v0 + tl.arange(0, BV)
        vm = cv < V
        rv = rm[:, None] & vm[None, :]
        v_off = row[:, None] * (H * V) + h * V + cv[None, :]
        s_off = s_base + ck[:, None] * V + cv[None, :]
        sm = km[:, None] & vm[None, :]
        S0 = tl.load(hs_ptr + s_off, mask=sm, other=0.0).to(tl.float32)
        dH = tl.load(dhs_ptr + s_off, mask=sm, other=0.0).to(tl.float32)
        db_ = tl.load(d_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        ddb = tl.load(dd_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        dob = load_tile(do_ptr, tok, last, cv, vm, h, H, V)
        dqg += tl.dot(dob.to(OPD), tl.trans(S0).to(OPD), input_precision=PREC)
        dw -= tl.dot(ddb.to(OPD), tl.trans(S0).to(OPD), input_precision=PREC)
        dkr += tl.dot(db_.to(OPD), tl.trans(dH).to(OPD), input_precision=PREC)
        if HAS_G:
            dtot += tl.reduce(S0 * dH, 1, _sum_combine)
    dqg = dqg * scale

    rk = rm[:, None] & km[None, :]
    k_off = row[:, None] * (H * K) + h * K + ck[None, :]
    kb = tl.load(k_ptr + k_off, mask=rk, other=0.0).to(tl.float32)
    wb = tl.load(w_ptr + k_off, mask=rk, other=0.0).to(tl.float32)
    bb = tl.load(beta_ptr + row * H + h, mask=rm, other=0.0).to(tl.float32)
    tinv = load_inverse(t_ptr, row, rm, h, H, BC)
    _, cum, rest, _, _ = chunk_gates(g_ptr, tok0, ntok, h, H, N_H, BC, HAS_G)
    e_cum = tl.exp(cum)
    e_rest = tl.exp(rest)
    # W = T diag(beta) (k e^cum): this slice's columns of dRk and its share of dA
    drk = tl.dot(tl.trans(tinv), dw, input_precision=PREC)
    slot = (tl.cast(ic, tl.int64) * H + h) * tl.num_programs(2) + j
    dak = -tl.dot(drk.to(OPD), tl.trans(wb).to(OPD), input_precision=PREC)
    tl.store(dak_ptr + slot * (BC * BC) + i[:, None] * BC + i[None, :], dak)
    kg = kb * e_cum[:, None]
    dkg = drk * bb[:, None]
    tl.store(dqp_ptr + tok[:, None] * (H * K) + h * K + ck[None, :], dqg * e_cum[:, None],
             mask=last[:, None] & km[None, :])
    tl.store(dkp_ptr + k_off, dkg * e_cum[:, None] + dkr * e_rest[:, None], mask=rk)
    red = red_ptr + slot * (4 * BC) + i
    tl.store(red, tl.reduce(drk * kg, 1, _sum_combine))
    if HAS_G:
        qb = load_tile(q_ptr, tok, last, ck, km, h, H, K)
        dcum = tl.reduce(dqg * qb * e_cum[:, None], 1, _sum_combine) + tl.reduce(dkg * kg, 1, _sum_combine)
        tl.store(red + BC, dcum)
        tl.store(red + 2 * BC, tl.reduce(dkr * kb * e_rest[:, None], 1, _sum_combine))
        tl.store(red + 3 * BC, tl.full([BC], 0.0, tl.float32) + tl.reduce(dtot, 0, _sum_combine))


@triton.jit
def gdp_grad_finish_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, u_ptr, t_ptr, d_ptr, dd_ptr,
                           do_ptr, dqp_ptr, dkp_ptr, dak_ptr, red_ptr, dq_ptr, dk_ptr, dv_ptr,
                           dbeta_ptr, dg_ptr, chunk_ptr, scale,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, N_H: tl.constexpr,
                           BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           HAS_G: tl.constexpr, PREC: tl.constexpr, OPD: tl.constexpr):
    """The rest of one chunk after ``kslice``: the V part (dv, dP and dU's share of dA and
    dbeta), the slices' sums, then dbeta, dg and, slice by slice, dq and dk.

    dq and dk may alias dqp and dkp (fp32 inputs): each element is read before it is written.
    """
    ic = tl.program_id(0)
    h = tl.program_id(1)
    # written out: a helper call here changes ptxas' code (see _common)
    tok0 = tl.load(chunk_ptr + 2 * ic)
    ntok = tl.load(chunk_ptr + 2 * ic + 1)
    i = tl.arange(0, BC)
    rm = i < ntok * N_H
    last = rm & (i % N_H == N_H - 1)
    row = (tok0 * N_H + i).to(tl.int64)
    tok = (tok0 + i // N_H).to(tl.int64)
    bb = tl.load(beta_ptr + row * H + h, mask=rm, other=0.0).to(tl.float32)
    tinv = load_inverse(t_ptr, row, rm, h, H, BC)

    dP = tl.full([BC, BC], 0.0, tl.float32)    # d(P), without scale
    dA = tl.full([BC, BC], 0.0, tl.float32)
    db = tl.full([BC], 0.0, tl.float32)
    for v0 in range(0, V, BV):
        cv, vm, rv, v_off = v_block(v0, row, rm, h, H, V, BV)
        db_ = tl.load(d_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        ddb = tl.load(dd_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        ub = tl.load(u_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        vb = tl.load(v_ptr + v_off, mask=rv, other=0.0).to(tl.float32)
        dob = load_tile(do_ptr, tok, last, cv, vm, h, H, V)
        dP += tl.dot(dob.to(OPD), tl.trans(db_).to(OPD), input_precision=PREC)
        dA, db = v_rhs_grad(tinv, ddb, ub, vb, bb, dv_ptr, v_off, rv, dA, db, PREC, OPD)

    slot0 = (tl.cast(ic, tl.int64) * H + h) * ((K + BK - 1) // BK)
    dcum = tl.full([BC], 0.0, tl.float32)
    drest = tl.full([BC], 0.0, tl.float32)
    dtot = tl.full([BC], 0.0, tl.float32)
    for k0 in range(0, K, BK):
        slot = slot0 + k0 // BK
        dA += tl.load(dak_ptr + slot * (BC * BC) + i[:, None] * BC + i[None, :])
        red = red_ptr + slot * (4 * BC) + i
        db += tl.load(red)
        if HAS_G:
            dcum += tl.load(red + BC)
            drest += tl.load(red + 2 * BC)
            dtot += tl.load(red + 3 * BC)

    _, _, _, total, seg = chunk_gates(g_ptr, tok0, ntok, h, H, N_H, BC, HAS_G)
    strict = i[:, None] > i[None, :]
    causal = i[:, None] >= i[None, :]
    E = tl.exp(tl.where(causal, seg, 0.0))
    # A = beta_p (k_p . k_s) E, strictly lower; P = (q_p . k_s) E on s <= p
    dA = tl.where(strict, dA, 0.0)
    dPE = tl.where(causal, dP * scale, 0.0) * E
    kk = tl.full([BC, BC], 0.0, tl.float32)
    qk = tl.full([BC, BC], 0.0, tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        km = ck < K
        kb = load_tile(k_ptr, row, rm, ck, km, h, H, K)
        kk += tl.dot(kb.to(OPD), tl.trans(kb).to(OPD), input_precision=PREC)
        if HAS_G:
            qb = load_tile(q_ptr, tok, last, ck, km, h, H, K)
            qk += tl.dot(qb.to(OPD), tl.trans(kb).to(OPD), input_precision=PREC)
    db += tl.reduce(dA * kk * E, 1, _sum_combine)
    tl.store(dbeta_ptr + row * H + h, db.to(dbeta_ptr.dtype.element_ty), mask=rm)
    gm = dA * E * bb[:, None]
    if HAS_G:
        tpos = i // N_H
        cross = tpos[:, None] > tpos[None, :]
        dseg = tl.where(cross, gm * kk + dPE * qk, 0.0)
        # dgam[p'] = sum_{p >= p', s < p'} dseg[p, s]
        dM = tl.associative_scan(dseg, 0, _sum_combine, reverse=True)
        dgam = tl.reduce(tl.where(i[None, :] < i[:, None], dM, 0.0), 1, _sum_combine)
        dgam += tl.reduce(tl.where(i[None, :] >= i[:, None], dcum[None, :], 0.0), 1, _sum_combine)
        dgam += tl.reduce(tl.where(i[None, :] < i[:, None], drest[None, :], 0.0), 1, _sum_combine)
        dgam += dtot * tl.exp(total)
        first = rm & (i % N_H == 0)
        tl.store(dg_ptr + tok * H + h, dgam, mask=first)

    gsym = gm + tl.trans(gm)
    dPEt = tl.trans(dPE)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        km = ck < K
        rk = rm[:, None] & km[None, :]
        qm = last[:, None] & km[None, :]
        k_off = row[:, None] * (H * K) + h * K + ck[None, :]
        q_off = tok[:, None] * (H * K) + h * K + ck[None, :]
        kb = tl.load(k_ptr + k_off, mask=rk, other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + q_off, mask=qm, other=0.0).to(tl.float32)
        dq = (tl.load(dqp_ptr + q_off, mask=qm, other=0.0)
              + tl.dot(dPE.to(OPD), kb.to(OPD), input_precision=PREC))
        dk = (tl.load(dkp_ptr + k_off, mask=rk, other=0.0)
              + tl.dot(gsym.to(OPD), kb.to(OPD), input_precision=PREC)
              + tl.dot(dPEt.to(OPD), qb.to(OPD), input_precision=PREC))
        tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=qm)
        tl.store(dk_ptr + k_off, dk.to(dk_ptr.dtype.element_ty), mask=rk)
