"""Triton Mamba2 SSD (scalar decay per head), forward and hand-written backward.

One program owns one sequence (batch row or packed document) and one head, and walks its
chunks of ``BL`` tokens in order with the [P, N] state in fp32 registers: per chunk the
intra-chunk quadratic part (C B^T masked by the segment decays) plus the carried state's
contribution, then the state passed to the next chunk. The state entering every ``SUB``-th
chunk (every 64 tokens) is saved for the backward (fp32, [slots, H, P, N]: P*N/64 floats
per token and head), which walks the chunks in reverse carrying dh; a chunk whose entering
state was not saved gets it by re-running the forward's state update from the saved one
over the chunks in between. So the chunk that registers and shared memory must hold
(BL = 32 for states of 8192+ elements, i.e. Mamba2's P = 64, N = 128, then SUB = 2; else 64)
and the saved-state memory are chosen apart. B and C gradients are written per head and
summed over each group's heads on the host (deterministic, no atomics).

Decays. a_t = exp(dt A), or 2 exp(dt A) - 1 in (-1, 1) with negative eigenvalues. Products
of a over a segment are carried as magnitude (cumsum of log|a|), sign (parity of the count
of negative factors) and a count of exact zeros, so sign changes and zeros are exact; with
only the log-space cumsum the negative case would be wrong. In the backward every decay
product T that contains a_k contributes T dT to d log|a_k|, and da_k = d log|a_k| / a_k
(a_k != 0); for an exact zero (exp(dt A) == 0.5 in fp32) the products are taken without
that factor instead, so the backward is exact there too.

Like the other kernels here it avoids ``triton.language.standard`` (tl.sum, tl.cumsum...),
which breaks under ``TRITON_INTERPRET=1`` set after triton was imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register_triton
from .linear_recurrence import _add, seq_offsets


@triton.jit
def _rsum(v, axis: tl.constexpr):
    return tl.reduce(v, axis, _add)


@triton.jit
def _products(c, nc, zc, rows, NEG: tl.constexpr, NZ: tl.constexpr, BL: tl.constexpr):
    """Segment decays M[l, s] (s <= l), cum_l = M[l, -1] and to_end_s = M[BL-1, s].

    From c = cumsum log|a|, nc = count of a < 0, zc = count of a == 0 (log|0| taken as 0).
    With NZ = 1 each product is taken without its one zero factor (0 if it holds another
    number of zeros): the derivative of a product with respect to that zero factor.
    """
    last = rows == BL - 1
    c_end = _rsum(tl.where(last, c, 0.0), 0)
    lower = rows[:, None] >= rows[None, :]
    M = tl.exp(tl.where(lower, c[:, None] - c[None, :], float("-inf")))
    cum = tl.exp(c)
    to_end = tl.exp(c_end - c)
    if NEG:
        nc_end = _rsum(tl.where(last, nc, 0), 0)
        zc_end = _rsum(tl.where(last, zc, 0), 0)
        M = tl.where(((nc[:, None] - nc[None, :]) & 1) == 1, -M, M)
        M = tl.where(zc[:, None] - zc[None, :] == NZ, M, 0.0)
        cum = tl.where((nc & 1) == 1, -cum, cum)
        cum = tl.where(zc == NZ, cum, 0.0)
        to_end = tl.where(((nc_end - nc) & 1) == 1, -to_end, to_end)
        to_end = tl.where(zc_end - zc == NZ, to_end, 0.0)
    return M, cum, to_end


@triton.jit
def _log_decays(dt, A, NEG: tl.constexpr):
    """a, exp(dt A), and the scans (c, nc, zc) of ``_products``; padding (dt = 0) gives a = 1."""
    e = tl.exp(dt * A)
    if NEG:
        a = 2.0 * e - 1.0
        c = tl.associative_scan(tl.log(tl.where(a == 0.0, 1.0, tl.abs(a))), 0, _add)
        nc = tl.associative_scan(tl.where(a < 0.0, 1, 0), 0, _add)
        zc = tl.associative_scan(tl.where(a == 0.0, 1, 0), 0, _add)
    else:
        a = e
        c = tl.associative_scan(dt * A, 0, _add)
        nc = c.to(tl.int32)  # unused without negative eigenvalues
        zc = nc
    return a, e, c, nc, zc


@triton.jit
def _grad_factor(dSCB, qv, rv, hv, M, cum, to_end, rows, BL: tl.constexpr):
    """sum over the decay products T holding factor k of dT * T, for every k of the chunk.

    T runs over M[l, s] (s < k <= l), to_end_s (s < k), cum_l (l >= k) and the chunk total.
    Masked sums, never prefix-sum differences: every term kept holds factor k, so the result
    stays proportional to a_k and dividing by a_k keeps its relative accuracy near 0.
    """
    strict = rows[:, None] > rows[None, :]
    ge = rows[:, None] <= rows[None, :]  # ge[k, l] = l >= k
    Q = tl.where(strict, dSCB * M, 0.0)
    GQ = tl.dot(ge.to(tl.float32), Q, input_precision="ieee")  # sum_{l >= k} Q[l, s]
    dw = _rsum(tl.where(strict, GQ, 0.0), 1)
    dw += _rsum(tl.where(strict, (to_end * qv)[None, :], 0.0), 1)
    dw += _rsum(tl.where(ge, (cum * rv)[None, :], 0.0), 1)
    dw += _rsum(tl.where(rows == BL - 1, cum, 0.0), 0) * hv
    return dw


@triton.jit
def _load_chunk(x_ptr, dt_ptr, B_ptr, C_ptr, t0, rows, tm, hd, g, p, n, pm, nm, H, P, G, N):
    """The chunk starting at token t0: a scalar int64 base plus small int32 tile offsets
    (int64 offset tiles would cost two registers per element)."""
    xm = tm[:, None] & pm[None, :]
    x = tl.load(x_ptr + (t0 * H + hd) * P + (rows[:, None] * (H * P) + p[None, :]), mask=xm,
                other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + t0 * H + hd + rows * H, mask=tm, other=0.0).to(tl.float32)
    bm = tm[:, None] & nm[None, :]
    boff = rows[:, None] * (G * N) + n[None, :]
    Bc = tl.load(B_ptr + (t0 * G + g) * N + boff, mask=bm, other=0.0).to(tl.float32)
    Cc = tl.load(C_ptr + (t0 * G + g) * N + boff, mask=bm, other=0.0).to(tl.float32)
    return x, dt, Bc, Cc


@triton.jit
def _program_setup(cu_ptr, coff_ptr, A_ptr, P, N, R,
                   BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """This program's sequence sq (tokens s..e, first state slot coff), head hd, group g, the
    head's A, and the chunk and state tile indices (shared by the forward and the backward)."""
    sq = tl.program_id(0).to(tl.int64)  # int64: state offsets (sq*H + hd)*P*N pass 2^31 past 2048 documents
    hd = tl.program_id(1)
    s = tl.load(cu_ptr + sq).to(tl.int64)
    e = tl.load(cu_ptr + sq + 1).to(tl.int64)
    coff = tl.load(coff_ptr + sq).to(tl.int64)
    rows = tl.arange(0, BL)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    pn = p[:, None] * N + n[None, :]
    pnm = pm[:, None] & nm[None, :]
    A = tl.load(A_ptr + hd).to(tl.float32)
    return sq, hd, hd // R, s, e, coff, rows, p, n, pm, nm, pn, pnm, A


@triton.jit
def _state_or_zeros(ptr, pn, pnm, HAS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """A given [P, N] state (initial h, or final dh) in fp32; zeros when none was given."""
    h = tl.full([BP, BN], 0.0, tl.float32)
    if HAS:
        h = tl.load(ptr + pn, mask=pnm, other=0.0).to(tl.float32)
    return h


@triton.jit
def _carry(h, cum, v, K, rows, PREC: tl.constexpr, BL: tl.constexpr):
    """The state after a chunk, total decay * h + v^T K: the forward's h (v = u to_end,
    K = B) and the backward's dh (v = dy cum, K = C) alike."""
    total = _rsum(tl.where(rows == BL - 1, cum, 0.0), 0)
    return total * h + tl.dot(tl.trans(v), K, input_precision=PREC)


@triton.jit
def _state_after(h, x, dt, Bc, A, rows, NEG: tl.constexpr, PREC: tl.constexpr, BL: tl.constexpr):
    """The forward's state update over one chunk alone (for the backward's unsaved states)."""
    _, _, c, nc, zc = _log_decays(dt, A, NEG)
    _, cum, to_end = _products(c, nc, zc, rows, NEG, 0, BL)
    return _carry(h, cum, x * (dt * to_end)[:, None], Bc, rows, PREC, BL)


@triton.jit
def _ssd_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, hT_ptr, st_ptr,
                    cu_ptr, coff_ptr, H, P, G, N, R,
                    NEG: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr,
                    PREC: tl.constexpr, OPD: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    SUB: tl.constexpr):
    sq, hd, g, s, e, coff, rows, p, n, pm, nm, pn, pnm, A = _program_setup(
        cu_ptr, coff_ptr, A_ptr, P, N, R, BL, BP, BN)
    if HAS_D:
        Dh = tl.load(D_ptr + hd).to(tl.float32)
    h = _state_or_zeros(h0_ptr + (sq * H + hd) * P * N, pn, pnm, HAS_H0, BP, BN)
    for ci in range(0, (e - s + BL - 1) // BL):
        t0 = s + ci * BL
        tm = rows < e - t0
        # the state entering every SUB-th chunk, in slot coff + ci / SUB
        tl.store(st_ptr + ((coff + ci // SUB) * H + hd) * P * N + pn, h, mask=pnm & (ci % SUB == 0))
        x, dt, Bc, Cc = _load_chunk(x_ptr, dt_ptr, B_ptr, C_ptr, t0, rows, tm, hd, g, p, n, pm, nm, H, P, G, N)
        _, _, c, nc, zc = _log_decays(dt, A, NEG)
        M, cum, to_end = _products(c, nc, zc, rows, NEG, 0, BL)
        u = x * dt[:, None]
        S = tl.dot(Cc.to(OPD), tl.trans(Bc).to(OPD), input_precision=PREC) * M
        y = tl.dot(S.to(OPD), u.to(OPD), input_precision=PREC)
        y += cum[:, None] * tl.dot(Cc.to(OPD), tl.trans(h).to(OPD), input_precision=PREC)
        if HAS_D:
            y += Dh * x
        tl.store(y_ptr + (t0 * H + hd) * P + (rows[:, None] * (H * P) + p[None, :]), y.to(y_ptr.dtype.element_ty),
                 mask=tm[:, None] & pm[None, :])
        h = _carry(h, cum, u * to_end[:, None], Bc, rows, PREC, BL)
    tl.store(hT_ptr + (sq * H + hd) * P * N + pn, h, mask=pnm)


@triton.jit
def _ssd_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, st_ptr, dy_ptr, dhT_ptr,
                    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dh0_ptr, cu_ptr, coff_ptr,
                    H, P, G, N, R,
                    NEG: tl.constexpr, HAS_D: tl.constexpr, HAS_DHT: tl.constexpr,
                    PREC: tl.constexpr, OPD: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    SUB: tl.constexpr):
    sq, hd, g, s, e, coff, rows, p, n, pm, nm, pn, pnm, A = _program_setup(
        cu_ptr, coff_ptr, A_ptr, P, N, R, BL, BP, BN)
    Dh = 0.0
    if HAS_D:
        Dh = tl.load(D_ptr + hd).to(tl.float32)
    dh = _state_or_zeros(dhT_ptr + (sq * H + hd) * P * N, pn, pnm, HAS_DHT, BP, BN)
    dA = 0.0
    dD = 0.0
    nch = (e - s + BL - 1) // BL
    for i in range(0, nch):
        ci = nch - 1 - i
        t0 = s + ci * BL
        # The state entering chunk ci: the saved one, run through the chunks in between
        # (unrolled: a dynamic loop here stops triton pipelining this loop's loads).
        first = ci - ci % SUB
        h = tl.load(st_ptr + ((coff + ci // SUB) * H + hd) * P * N + pn, mask=pnm, other=0.0)
        for j in tl.static_range(SUB - 1):
            if first + j < ci:
                tj = s + (first + j) * BL
                xj, dtj, Bj, _ = _load_chunk(x_ptr, dt_ptr, B_ptr, C_ptr, tj, rows, rows < e - tj, hd, g,
                                             p, n, pm, nm, H, P, G, N)
                h = _state_after(h, xj, dtj, Bj, A, rows, NEG, PREC, BL)
        tm = rows < e - t0
        xm = tm[:, None] & pm[None, :]
        x, dt, Bc, Cc = _load_chunk(x_ptr, dt_ptr, B_ptr, C_ptr, t0, rows, tm, hd, g, p, n, pm, nm, H, P, G, N)
        a, ex, c, nc, zc = _log_decays(dt, A, NEG)
        M, cum, to_end = _products(c, nc, zc, rows, NEG, 0, BL)
        dy = tl.load(dy_ptr + (t0 * H + hd) * P + (rows[:, None] * (H * P) + p[None, :]), mask=xm, other=0.0).to(tl.float32)
        u = x * dt[:, None]
        CB = tl.dot(Cc.to(OPD), tl.trans(Bc).to(OPD), input_precision=PREC)
        S = CB * M
        # y = S u + cum (C h^T) + D x ;  h_next = total h + (u to_end)^T B
        dS = tl.dot(dy.to(OPD), tl.trans(u).to(OPD), input_precision=PREC)
        Bdh = tl.dot(Bc.to(OPD), tl.trans(dh).to(OPD), input_precision=PREC)  # [BL, BP]
        Ch = tl.dot(Cc.to(OPD), tl.trans(h).to(OPD), input_precision=PREC)    # [BL, BP]
        dU = tl.dot(tl.trans(S).to(OPD), dy.to(OPD), input_precision=PREC) + to_end[:, None] * Bdh
        dCB = dS * M
        dC = (tl.dot(dCB.to(OPD), Bc.to(OPD), input_precision=PREC)
              + cum[:, None] * tl.dot(dy.to(OPD), h.to(OPD), input_precision=PREC))
        dB = (tl.dot(tl.trans(dCB).to(OPD), Cc.to(OPD), input_precision=PREC)
              + to_end[:, None] * tl.dot(u.to(OPD), dh.to(OPD), input_precision=PREC))
        dx = dU * dt[:, None]
        if HAS_D:
            dx += Dh * dy
            dD += _rsum(_rsum(x * dy, 1), 0)
        ddt = _rsum(x * dU, 1)
        # decays: d log|a_k| = sum of dT T over the decay products T holding a_k
        dSCB = dS * CB
        qv = _rsum(u * Bdh, 1)
        rv = _rsum(dy * Ch, 1)
        hv = _rsum(_rsum(h * dh, 1), 0)
        dw = _grad_factor(dSCB, qv, rv, hv, M, cum, to_end, rows, BL)
        if NEG:
            da = dw / tl.where(a == 0.0, 1.0, a)
            if _rsum(zc, 0) > 0:  # an exact zero: d/da_k = products without that factor
                M1, cum1, to_end1 = _products(c, nc, zc, rows, NEG, 1, BL)
                da = tl.where(a == 0.0, _grad_factor(dSCB, qv, rv, hv, M1, cum1, to_end1, rows, BL), da)
            ddt += da * 2.0 * ex * A
            dA += _rsum(tl.where(tm, da * 2.0 * ex * dt, 0.0), 0)
        else:
            ddt += dw * A
            dA += _rsum(tl.where(tm, dw * dt, 0.0), 0)
        tl.store(dx_ptr + (t0 * H + hd) * P + (rows[:, None] * (H * P) + p[None, :]), dx.to(dx_ptr.dtype.element_ty), mask=xm)
        tl.store(ddt_ptr + t0 * H + hd + rows * H, ddt, mask=tm)
        bm = tm[:, None] & nm[None, :]
        tl.store(dB_ptr + (t0 * H + hd) * N + (rows[:, None] * (H * N) + n[None, :]), dB, mask=bm)
        tl.store(dC_ptr + (t0 * H + hd) * N + (rows[:, None] * (H * N) + n[None, :]), dC, mask=bm)
        dh = _carry(dh, cum, dy * cum[:, None], Cc, rows, PREC, BL)
    tl.store(dh0_ptr + (sq * H + hd) * P * N + pn, dh, mask=pnm)
    tl.store(dA_ptr + sq * H + hd, dA)
    tl.store(dD_ptr + sq * H + hd, dD)


SAVE_EVERY = 64  # tokens per saved state, whatever the chunk the kernels compute in
# Operands of the chunk dots for bf16 / fp16 inputs: fp32 values on tf32 tensor cores
# (False), or rounded to the input dtype (True; fla's chunk_simple_gla and mamba-ssm run
# theirs so), with fp32 accumulators. The state update (``_carry``: the forward's h and
# the backward's dh) keeps fp32 operands, as in GatedDeltaProduct's HALF_DOT_OPERANDS;
# fp32 inputs always take fp32 operands. False until a GPU run times it (the scan/SSD
# bench's ``half_dots`` variant); ``ssd(..., half_dots=...)`` overrides it per call.
HALF_DOT_OPERANDS = False


def _chunk_len(BP: int, BN: int) -> int:
    """Tokens per kernel chunk: 64, or 32 for states of 8192+ elements (Mamba2's P = 64,
    N = 128), where the backward at 64 needs ~300 KB of shared memory, over an H100 block's
    227 KB, and spills ~4x more (``bench/kernel_resources.py``). States are still saved per
    ``SAVE_EVERY`` tokens: the backward recomputes the one in between."""
    return 32 if BP * BN >= 8192 else 64


def _slot_offsets(cu: torch.Tensor, save_every: int) -> torch.Tensor:
    """First saved-state slot of each sequence (its saved states take consecutive slots)."""
    nsaved = (cu[1:] - cu[:-1] + save_every - 1) // save_every
    coff = torch.zeros_like(cu)
    coff[1:] = nsaved.cumsum(0)
    return coff.to(torch.int32)


def _chunking(BP: int, BN: int, block_l: int | None, save_every: int | None) -> tuple[int, int]:
    """(BL, SUB): tokens per kernel chunk and kernel chunks per saved state."""
    BL = block_l or _chunk_len(BP, BN)
    save = save_every or max(SAVE_EVERY, BL)
    if BL < 16 or BL & (BL - 1) or save % BL:
        raise ValueError(f"ssd: block_l={BL} must be a power of two >= 16 and save_every={save} "
                         "a multiple of it; leave both unset for the defaults")
    return BL, save // BL


def _operand_dtype(dtype: torch.dtype, half: bool) -> tl.dtype:
    """What the chunk dots cast their operands to (a cast of fp32 to fp32 is no instruction)."""
    if half and dtype in (torch.bfloat16, torch.float16):
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return tl.float32


class _SSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, D, h0, cu, neg, block_l, save_every, half_dots):
        L, H, P = x.shape
        G, N = Bm.shape[1], Bm.shape[2]
        n_seq = cu.numel() - 1
        BP, BN = max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))
        BL, SUB = _chunking(BP, BN, block_l, save_every)
        coff = _slot_offsets(cu, BL * SUB)
        slots = L // (BL * SUB) + n_seq  # >= sum over sequences of ceil(len / (BL SUB))
        states = torch.empty(slots, H, P, N, device=x.device, dtype=torch.float32)
        y = torch.empty_like(x)
        hT = torch.empty(n_seq, H, P, N, device=x.device, dtype=torch.float32)
        prec = "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"
        opd = _operand_dtype(x.dtype, HALF_DOT_OPERANDS if half_dots is None else half_dots)
        _ssd_fwd_kernel[(n_seq, H)](
            x, dt, A, Bm, Cm, D if D is not None else A, h0 if h0 is not None else hT, y, hT, states,
            cu, coff, H, P, G, N, H // G, NEG=neg, HAS_D=D is not None, HAS_H0=h0 is not None,
            PREC=prec, OPD=opd, BL=BL, BP=BP, BN=BN, SUB=SUB, num_warps=8 if BP * BN >= 4096 else 4)
        ctx.save_for_backward(x, dt, A, Bm, Cm, D, h0, cu, coff, states)
        ctx.cfg = (neg, prec, opd, BL, BP, BN, SUB)
        ctx.set_materialize_grads(False)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, dt, A, Bm, Cm, D, h0, cu, coff, states = ctx.saved_tensors
        neg, prec, opd, BL, BP, BN, SUB = ctx.cfg
        L, H, P = x.shape
        G, N = Bm.shape[1], Bm.shape[2]
        n_seq = cu.numel() - 1
        dev = x.device
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dx = torch.empty_like(x)
        ddt = torch.empty(L, H, device=dev, dtype=torch.float32)
        dBh = torch.empty(L, H, N, device=dev, dtype=torch.float32)
        dCh = torch.empty(L, H, N, device=dev, dtype=torch.float32)
        dA = torch.empty(n_seq, H, device=dev, dtype=torch.float32)
        dD = torch.empty(n_seq, H, device=dev, dtype=torch.float32)
        dh0 = torch.empty(n_seq, H, P, N, device=dev, dtype=torch.float32)
        _ssd_bwd_kernel[(n_seq, H)](
            x, dt, A, Bm, Cm, D if D is not None else A, states, dy,
            dhT.float().contiguous() if dhT is not None else dh0,
            dx, ddt, dBh, dCh, dA, dD, dh0, cu, coff, H, P, G, N, H // G,
            NEG=neg, HAS_D=D is not None, HAS_DHT=dhT is not None, PREC=prec, OPD=opd,
            BL=BL, BP=BP, BN=BN, SUB=SUB, num_warps=8 if BP * BN >= 4096 else 4)
        dB = dBh.view(L, G, H // G, N).sum(2).to(Bm.dtype)
        dC = dCh.view(L, G, H // G, N).sum(2).to(Cm.dtype)
        dD = dD.sum(0).to(D.dtype) if D is not None else None
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return (dx, ddt.to(dt.dtype), dA.sum(0).to(A.dtype), dB, dC, dD, dh0,
                None, None, None, None, None)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
        D: torch.Tensor | None = None, allow_neg_eigval: bool = False,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None, block_l: int | None = None,
        save_every: int | None = None, half_dots: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of ``kernels.ssd`` (inputs already validated by ops.py).

    y comes back in x's dtype, the final state [N_seq, H, P, N] in fp32 (fp64 for fp64
    inputs, though the kernel computes in fp32). For tests that must cross chunk edges at
    small T: ``block_l`` (a power of two >= 16) overrides the kernels' chunk length and
    ``save_every`` (a multiple of it; default max(64, chunk)) the tokens per saved state;
    ``half_dots`` overrides ``HALF_DOT_OPERANDS`` for this call.
    """
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cu = seq_offsets(Bsz, T, cu_seqlens, x.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    y, hT = _SSD.apply(x.reshape(Bsz * T, H, P).contiguous(), dt.reshape(Bsz * T, H).contiguous(),
                       A.contiguous(), B.reshape(Bsz * T, G, N).contiguous(),
                       C.reshape(Bsz * T, G, N).contiguous(), D.contiguous() if D is not None else None,
                       h0, cu, bool(allow_neg_eigval), block_l, save_every, half_dots)
    final = hT.to(torch.promote_types(x.dtype, torch.float32)) if output_final_state else None
    return y.view(Bsz, T, H, P), final


register_triton("ssd", ssd)
