"""Shared pieces of the Gated DeltaProduct Triton kernels: chunk layout, tile access and gate spans.

The n_h Householder steps of a token are n_h consecutive *sub-steps*: k, v and beta are
read as ``[T*n_h, H, ...]`` (their natural memory layout), a token's gate sits on its
first sub-step and its output is read after its last. A chunk holds ``BT = 64 // n_h``
whole tokens (``BT*n_h <= 64`` sub-steps) in a tile of ``BC = 64`` rows; rows past the
chunk's end are masked to identity steps (k = 0, beta = 0, gate 0).

Every log decay is a sum over the gates of its span (a masked sum or a cumsum over a
masked matrix), never a difference of two cumsums: a difference cancels large values and
leaves fp32 rounding that swamps the tiny true decays (and g-gradients) of strong gates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.standard import _sum_combine

from ..varlen import upload

CHUNK_ROWS = 64  # sub-steps per tile
INV_BLOCK = 16  # diagonal block of the chunk's triangular inverse (CHUNK_ROWS <= 4 blocks)


# tl.reduce / tl.associative_scan with the standard sum combiner instead of tl.sum /
# tl.cumsum (and tl.full instead of tl.zeros): those are jit functions made when triton is
# imported, so they fail under TRITON_INTERPRET=1 set after that import (the tests
# re-import these modules under the interpreter); with this combiner the interpreter
# still takes its fast numpy path. Helpers are inlined where they would sit in loops:
# each jit call costs milliseconds in the interpreter.
#
# Some kernels write out what the tile helpers below do (marked "written out"). An inlined
# call yields the same PTX instructions, but its debug scope adds labels that ptxas
# schedules and allocates registers around; where a call changed a kernel's SASS for some
# launch of bench/kernel_resources.py's GDP cases, the kernel keeps the code written out.
__all__ = ["_sum_combine", "load_tile", "store_tile", "chunk_span", "chunk_masks", "chunk_gates",
           "chunk_scores", "chunk_layout", "dot_operand_dtype", "dot_precision", "inverse_precision",
           "CHUNK_ROWS", "INV_BLOCK"]


@triton.jit
def load_tile(ptr, rows, rmask, cols, cmask, h, H: tl.constexpr, W: tl.constexpr):
    """Tile [rows, cols] of head h of a [*, H, W] tensor, in fp32 (0 where masked)."""
    return tl.load(ptr + rows[:, None] * (H * W) + h * W + cols[None, :],
                   mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, x, rows, rmask, cols, cmask, h, H: tl.constexpr, W: tl.constexpr):
    """Store x at tile [rows, cols] of head h of a [*, H, W] tensor, cast to its dtype."""
    tl.store(ptr + rows[:, None] * (H * W) + h * W + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def chunk_span(chunk_ptr, ic):
    """(first token, token count) of chunk ic, from the [NC, 2] chunk table."""
    return tl.load(chunk_ptr + 2 * ic), tl.load(chunk_ptr + 2 * ic + 1)


@triton.jit
def chunk_masks(i, tok0, ntok, N_H: tl.constexpr):
    """Where tile rows i (tl.arange(0, BC)) of a chunk (ntok tokens from tok0) read and write.

    Returns (rm: the row is a sub-step of the chunk, last: it is its token's last sub-step,
    row: its index into the sub-step tensors k, v, beta, tok: its token, the index into q,
    g, o); row and tok are int64.
    """
    rm = i < ntok * N_H
    last = rm & (i % N_H == N_H - 1)
    row = (tok0 * N_H + i).to(tl.int64)
    tok = (tok0 + i // N_H).to(tl.int64)
    return rm, last, row, tok


@triton.jit
def chunk_gates(g_ptr, tok0, ntok, h, H: tl.constexpr, N_H: tl.constexpr,
                BC: tl.constexpr, HAS_G: tl.constexpr):
    """Log decays of one chunk, all in fp32.

    Returns (gam [BC]: gate of each sub-step, cum [BC]: sum over chunk start..p inclusive,
    rest [BC]: sum over p+1..chunk end, total: sum of the chunk, seg [BC, BC]: sum over
    s+1..p for s < p and 0 elsewhere).
    """
    i = tl.arange(0, BC)
    if HAS_G:
        first = (i % N_H == 0) & (i < ntok * N_H)
        tok = (tok0 + i // N_H).to(tl.int64)
        gam = tl.load(g_ptr + tok * H + h, mask=first, other=0.0).to(tl.float32)
    else:
        gam = tl.full([BC], 0.0, tl.float32)
    le = i[None, :] <= i[:, None]  # [p, p']: p' <= p
    cum = tl.reduce(tl.where(le, gam[None, :], 0.0), 1, _sum_combine)
    rest = tl.reduce(tl.where(le, 0.0, gam[None, :]), 1, _sum_combine)
    total = tl.reduce(gam, 0, _sum_combine)
    # seg[p, s] = sum_{s < p' <= p} gam[p'] as a column-wise cumsum of M[p', s] = gam[p'] [p' > s]
    seg = tl.associative_scan(tl.where(i[:, None] > i[None, :], gam[:, None], 0.0), 0, _sum_combine)
    return gam, cum, rest, total, seg


@triton.jit
def chunk_scores(q_ptr, k_ptr, g_ptr, tok0, ntok, h, H: tl.constexpr, K: tl.constexpr,
                 N_H: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, HAS_G: tl.constexpr,
                 PREC: tl.constexpr, OPD: tl.constexpr):
    """What the output and its dD gradient share: (qb [BC, BK], P [BC, BC], cum [BC]).

    qb holds each token's query on its last sub-step (0 on the others), P[p, s] =
    (q_p . k_s) e^seg[p, s] for s <= p (0 above the diagonal), cum as in ``chunk_gates``.
    """
    i = tl.arange(0, BC)
    ck = tl.arange(0, BK)
    km = ck < K
    rm, last, row, tok = chunk_masks(i, tok0, ntok, N_H)
    qb = load_tile(q_ptr, tok, last, ck, km, h, H, K)
    kb = load_tile(k_ptr, row, rm, ck, km, h, H, K)
    _, cum, _, _, seg = chunk_gates(g_ptr, tok0, ntok, h, H, N_H, BC, HAS_G)
    causal = i[:, None] >= i[None, :]
    P = tl.dot(qb.to(OPD), tl.trans(kb).to(OPD), input_precision=PREC)
    P = tl.where(causal, P * tl.exp(tl.where(causal, seg, 0.0)), 0.0)
    return qb, P, cum


def chunk_layout(cs: list[int], n_h: int, dev: torch.device) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """Tokens per chunk and chunk tables for packed sequences with offsets ``cs`` (host list).

    Returns (BT, chunk_tok [NC, 2] int32 = (first token, token count) per chunk,
    seq_chunk0 [N+1] int32 = index of each sequence's first chunk, NC).
    """
    if n_h > CHUNK_ROWS:
        raise ValueError(f"gated_delta_product: n_h={n_h} exceeds {CHUNK_ROWS} sub-steps per chunk")
    bt = CHUNK_ROWS // n_h
    tok, cnt, starts = [], [], [0]
    for s, e in zip(cs, cs[1:]):
        for t0 in range(s, e, bt):
            tok.append(t0)
            cnt.append(min(bt, e - t0))
        starts.append(len(tok))
    table = upload(torch.tensor([tok, cnt], dtype=torch.int32).T.contiguous(), dev)
    if not tok:
        table = torch.zeros(0, 2, dtype=torch.int32, device=dev)
    return bt, table, upload(torch.tensor(starts, dtype=torch.int32), dev), len(tok)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 and fp64 inputs get full-precision dots (as the references); half inputs use tf32."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def dot_operand_dtype(dtype: torch.dtype, half_operands: bool) -> tl.dtype:
    """What the chunk dots cast their operands to: the input dtype for bf16 / fp16 inputs
    with ``half_operands`` (``HALF_DOT_OPERANDS``), else fp32 (a cast to fp32 of an fp32
    tile is no instruction at all)."""
    if half_operands and dtype in (torch.bfloat16, torch.float16):
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return tl.float32


def inverse_precision(dtype: torch.dtype, half: str = "tf32x3") -> str:
    """Dots inside the chunk's triangular inverse: fp32-accurate for every input dtype by
    default; ``half`` is the choice for bf16 / fp16 inputs (fp32 ones always get "ieee").

    Plain tf32 there (10-bit mantissa) rounds the Neumann factors of (I + A)^-1: with
    correlated keys and beta near 2 it makes W about 5x less accurate than the exact
    inverse does; tf32x3 (three tf32 products) restores fp32 accuracy on tensor cores.
    """
    if dtype == torch.float32:
        return "ieee"
    return half if dtype in (torch.bfloat16, torch.float16) else "tf32x3"
