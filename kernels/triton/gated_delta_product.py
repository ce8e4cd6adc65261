"""Triton Gated DeltaProduct: host launchers, autograd.Function, registration.

Activation memory: the forward saves only its inputs (and the initial state); the
backward recomputes W, U, the per-chunk states and D, so nothing O(T*K*V) outlives a call.
Within a call those intermediates are fp32, or bf16 / fp16 like the inputs with
``HALF_INTERMEDIATES`` (about half the transient memory; the arithmetic stays fp32).
The per-chunk gradients come from one kernel up to K = 64 and from two kernels that
split K into slices above it (``GRAD_SPLIT_ABOVE_BK``), so every K up to 256 has a
hand-written backward that fits an sm_90 block.
"""
from __future__ import annotations

import torch
import triton

from ..dispatch import register_triton
from ..varlen import derived_from_offsets
from .gated_delta_product_bwd import (
    gdp_dd_local_kernel,
    gdp_dh_kernel,
    gdp_grad_finish_kernel,
    gdp_grad_kernel,
    gdp_grad_kslice_kernel,
)
from .gated_delta_product_common import (
    CHUNK_ROWS,
    INV_BLOCK,
    chunk_layout,
    dot_operand_dtype,
    dot_precision,
    inverse_precision,
)
from .gated_delta_product_fwd import gdp_output_kernel, gdp_prep_kernel, gdp_state_kernel

Tensor = torch.Tensor


def _blocks(K: int, V: int) -> tuple[int, int, int, int]:
    """(BK: all of K, BVF: all of V, BV: a V block for the state-sized kernels, BVG: the V
    block of the one-kernel gradient, which holds six [64, BK] and [64, BV] tiles at once).

    BV is STATE_BV up to BK = 128 (read at each call). At BK = 256 the state-sized kernels
    take 32-wide V blocks: a [256, 64] fp32 state tile alone is 128 registers per thread in
    4 warps, and twice as many programs run at once."""
    bk = max(16, triton.next_power_of_2(K))
    bvf = max(16, triton.next_power_of_2(V))
    return bk, bvf, min(bvf, STATE_BV if bk <= 128 else 32), min(bvf, 32)


# V block of the state-sized kernels (state, output, dd_local, dh) at BK <= 128. 32 halves
# their [BK, BV] state tiles and doubles their programs (twice the re-reads of the [64, K]
# tiles); only a GPU can weigh that: ``bench_gated_delta_product --variants bv32``.
STATE_BV = 64


def _stages(bk: int) -> int:
    """Software-pipelining depth of the sequential state kernels. Triton's default (3)
    buffers each loop's loads three times: at K = 256 that outgrows an H100 block's 227 KB of
    shared memory (``bench/kernel_resources.py``), so the K = 256 kernels run unpipelined."""
    return 1 if bk >= 256 else 3


# The gradient kernel's V loop carries many tiles: pipelined it needs 287-480 KB of shared
# memory at K = V = 128-256 (cannot launch on sm_90); unpipelined with BVG it fits.
GRAD_STAGES = 1
# Warps of the kernels that hold [64, BK] tiles. At BK = 256 one fp32 tile is 128 registers
# per thread in 4 warps (255 allowed in all): in the sm_90 compile check the K = 256 state,
# output and dh kernels spill 1.1 / 0.4 / 2.2 KB per thread in 4 warps and 0 / 0 / 0.5 KB in
# 8. At BK <= 128 8 warps also cut the prep and dh spills (and the one-kernel gradient's,
# ``onekernel``; the K-split pair keeps KSLICE_LAUNCH / FINISH_LAUNCH) but cost occupancy;
# only a GPU can weigh that: ``bench_gated_delta_product --variants w8`` times it.
EIGHT_WARPS_FROM_BK = 256


def _launch(bk: int, num_stages: int | None = None) -> dict:
    """num_warps (and num_stages when given) of a launch that holds [64, bk] tiles."""
    out: dict = dict(num_warps=8 if bk >= EIGHT_WARPS_FROM_BK else 4)
    if num_stages is not None:
        out["num_stages"] = num_stages
    return out
# Above this BK the chunk gradients come from the K-split pair gdp_grad_kslice_kernel /
# gdp_grad_finish_kernel, on K slices of GRAD_SLICE_K columns, instead of gdp_grad_kernel.
# At K = 256 the one kernel's [64, BK] tiles outgrow an sm_90 block (~360 KB of shared memory
# even unpipelined). At K = V = 128 it fits but, in the sm_90 compile check with triton 3.6
# (bf16, n_h 1-3; compiled, not timed), it takes 255 registers, spills 5.7 KB per thread and
# needs 217 KB of shared memory (one 4-warp block per SM), where the pair spills 0-48 B
# (kslice) and 0 B (finish) in 106 / 90 KB: the pair by default from K = 128 on. At
# K = 64 the one kernel still spills 2.4 KB in 135 KB (the pair at K = 64: 40 / 0 B), but
# it is one launch and no scratch; ``bench_gated_delta_product --variants onekernel``
# (GRAD_SPLIT_ABOVE_BK = 128, the one kernel at K = 128) times the choice on a GPU.
GRAD_SPLIT_ABOVE_BK = 64
GRAD_SLICE_K = 64
# Launch choices of the split pair from the sm_90 AOT compile at K = V = 256 (bf16; not
# timed): kslice pipelined (3 stages) keeps 0 spills in 4 warps (106 KB of shared memory);
# finish, whose V loop and [64, 64] score tiles spill ~190 B/thread in 4 warps, spills
# none in 8 (90 KB, unpipelined). The same choices at K = V = 128 (triton 3.6): kslice
# 0-48 B, finish 0 B.
SPLIT_BV = 32
KSLICE_LAUNCH = dict(num_warps=4, num_stages=3)
FINISH_LAUNCH = dict(num_warps=8, num_stages=1)
# Storage of the recomputed intermediates that live through a call: fp32 (False), or the
# input dtype for bf16 / fp16 inputs (True), as flash-linear-attention keeps its w, u, h,
# v_new and dh. The arithmetic is fp32 either way: loads are cast up, and the carried state
# and state gradient stay fp32 in registers (the state goes on with the fp32 D, not the
# rounded copy). At B=4 T=4096 H=16 K=V=128 n_h=2 the buffers are 2176 MiB in fp32 and
# 1152 MiB with True. False until a GPU run (``bench_gated_delta_product --variants half``)
# weighs accuracy, speed and peak memory against fla; fp32 inputs always store fp32. fp16
# storage has fp16's range (65504): states or, under a large loss scale, state gradients
# beyond it overflow where fp32 would not.
HALF_INTERMEDIATES = False
# The buffers HALF_INTERMEDIATES rounds: W, U, the per-chunk entering states hs, D and its
# gradient dd, the per-chunk state gradients dhs. Each is rounded after the products that
# made it (error 2^-9 of its own size). tinv, the rows of T = (I + A)^-1, would be rounded
# before its products dRhs = T^T [dW | dU]: error 2^-9 |T|^T |dW|, which the large
# alternating entries of T (beta near 2, correlated keys; why the inverse is computed in
# tf32x3) make far larger than |T^T dW|. It stays fp32, and it is the smallest buffer
# (64 columns: 128 MiB of the 2176 above; rounding it would save 64). fla does keep its
# inverse in bf16; the kernels cast tinv like the rest, so a GPU run may add "tinv" here.
HALF_BUFFERS = frozenset({"w", "u", "hs", "d", "dd", "dhs"})
# Dots of the chunk's triangular inverse for bf16 / fp16 inputs (fp32 inputs: "ieee"):
# "tf32x3" keeps fp32 accuracy (``inverse_precision``); plain "tf32" makes W ~5x less
# accurate with beta near 2 and correlated keys, for far fewer prep spills in the sm_90
# compile check (K = V = 128, triton 3.6, not timed: 3000 -> 492 B/thread). A GPU run
# (``bench_gated_delta_product --variants inv_tf32``: time and accuracy) decides.
HALF_INVERSE_PRECISION = "tf32x3"
# Operands of the chunk dots for bf16 / fp16 inputs: fp32 values on tf32 tensor cores
# (False), or rounded to the input dtype (True), as flash-linear-attention runs its dots:
# twice the tensor-core rate of tf32 and half the shared memory per operand tile (for bf16
# also 8 bits of mantissa instead of tf32's 11 on the rounded operands, the states among
# them). Accumulation stays fp32 and so does the carried state. Some products keep fp32
# operands: those of the chunk's inverse (I + A)^-1 (making W and U, and the gradients
# through it; the inverse itself), for the reason HALF_BUFFERS gives for tinv, and those
# that carry the deltas D into the state and the output, and their gradient dD into the
# state gradient (rounded there, they doubled o's error in the interpreter tests). fp32
# inputs always take fp32 operands. The interpreter tests find every error within the
# issue's bf16 limits (worst: o 3.0e-3 of 5e-3, 4.7e-3 with HALF_INTERMEDIATES, no
# decay). False until a GPU run (``bench_gated_delta_product --variants half_dots``: time
# and accuracy) decides; the backward keeps the forward's choice.
HALF_DOT_OPERANDS = False
# Whether the forward keeps W, U and the rows of (I + A)^-1 for the backward, which then
# skips its prep kernel (by a reading of the kernels, about a sixth of a fwd+bwd at K = V =
# 128, not timed). They are O(T * (K + V + 64)) per call, within the activation
# budget, but about 3x the inputs' bytes in fp32 (at 1.3B, B=1, T=4096, n_h=2: ~160 MiB per
# layer; under per-block checkpointing they live only through that block's backward).
# ``bench_gated_delta_product --variants save_wy`` times it; read at each forward.
SAVE_WY = False


class _Problem:
    """Flattened views and chunk tables shared by the forward and backward launchers."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
                 cu_seqlens: Tensor | None, scale: float, layout: tuple | None = None,
                 opd: object = None):
        B, T, H, K = q.shape
        self.n_h, self.V = k.shape[2], v.shape[-1]
        self.B, self.T, self.H, self.K = B, T, H, K
        self.scale = float(scale)
        # Offsets on the host: a dense batch needs no device sync to lay out its chunks, and a
        # packed one reads its offsets and builds its tables once for all layers (varlen memo);
        # the backward takes the forward's ``layout``.
        def make(cs: list[int]) -> tuple:
            return (len(cs) - 1, *chunk_layout(cs, self.n_h, q.device))

        if layout is None:
            layout = make([b * T for b in range(B + 1)]) if cu_seqlens is None else derived_from_offsets(
                cu_seqlens, ("gdp_chunks", self.n_h, q.device), make)
        self.layout = layout
        self.N, self.bt, self.chunks, self.seq_chunk, self.NC = layout
        self.q = q.reshape(B * T, H, K).contiguous()
        self.k = k.reshape(B * T * self.n_h, H, K).contiguous()
        self.v = v.reshape(B * T * self.n_h, H, self.V).contiguous()
        self.beta = beta.reshape(B * T * self.n_h, H).contiguous()
        self.g = g.reshape(B * T, H).contiguous() if g is not None else None
        self.prec = dot_precision(q.dtype)
        # the backward takes the forward's operand dtype (``opd``), whatever the setting is now
        self.opd = dot_operand_dtype(q.dtype, HALF_DOT_OPERANDS) if opd is None else opd
        self.inv_prec = inverse_precision(q.dtype, HALF_INVERSE_PRECISION)
        self.BK, self.BVF, self.BV, self.BVG = _blocks(K, self.V)
        half = HALF_INTERMEDIATES and q.dtype in (torch.bfloat16, torch.float16)
        self.half_dtype = q.dtype if half else torch.float32

    def buf_dtype(self, name: str) -> torch.dtype:
        """Storage dtype of the intermediate ``name`` (see HALF_INTERMEDIATES)."""
        return self.half_dtype if name in HALF_BUFFERS else torch.float32

    def buffer(self, name: str, *shape: int, zero: bool = False) -> Tensor:
        """A new intermediate ``name`` of ``shape`` in its storage dtype."""
        make = torch.zeros if zero else torch.empty
        return make(*shape, dtype=self.buf_dtype(name), device=self.q.device)

    def consts(self) -> dict:
        return dict(H=self.H, K=self.K, V=self.V, N_H=self.n_h, BC=CHUNK_ROWS, BK=self.BK,
                    HAS_G=self.g is not None, PREC=self.prec, OPD=self.opd)

    def g_arg(self) -> Tensor:
        return self.g if self.g is not None else self.beta  # never read when HAS_G is False

    def recompute(self, h0: Tensor | None, store_t: bool, want_ht: bool, wy: tuple | None = None):
        """W, U (and (I+A)^-1) unless ``wy`` brings them (SAVE_WY), then the per-chunk
        entering states and D."""
        R, H, K, V = self.k.shape[0], self.H, self.K, self.V
        f32, dev = torch.float32, self.q.device
        c = self.consts()
        if wy is not None:
            w, u, tinv = wy
        else:
            w, u = self.buffer("w", R, H, K), self.buffer("u", R, H, V)
            tinv = self.buffer("tinv", R if store_t else 1, H, CHUNK_ROWS)
            if self.NC:
                gdp_prep_kernel[(self.NC, H)](self.k, self.v, self.beta, self.g_arg(), self.chunks,
                                              w, u, tinv, BVF=self.BVF, BLK=INV_BLOCK, STORE_T=store_t,
                                              INV_PREC=self.inv_prec, **_launch(self.BK), **c)
        hs, d = self.buffer("hs", max(self.NC, 1), H, K, V), self.buffer("d", R, H, V)
        ht = torch.empty(self.N, H, K, V, dtype=f32, device=dev) if want_ht else hs
        h0c = h0.float().contiguous() if h0 is not None else hs
        gdp_state_kernel[(self.N, H, triton.cdiv(V, self.BV))](
            self.k, self.g_arg(), w, u, h0c, self.chunks, self.seq_chunk, hs, d, ht,
            BV=self.BV, HAS_H0=h0 is not None, STORE_HT=want_ht, **_launch(self.BK, _stages(self.BK)), **c)
        return w, u, tinv, hs, d, (ht if want_ht else None)


def gdp_forward(p: _Problem, h0: Tensor | None, want_ht: bool,
                keep_wy: bool = False) -> tuple[Tensor, Tensor | None, tuple | None]:
    """(o, final state, (W, U, (I+A)^-1) when ``keep_wy``, for the backward)."""
    w, u, tinv, hs, d, ht = p.recompute(h0, store_t=keep_wy, want_ht=want_ht)
    o = torch.empty(p.B * p.T, p.H, p.V, dtype=p.q.dtype, device=p.q.device)
    if p.NC:
        gdp_output_kernel[(p.NC, p.H, triton.cdiv(p.V, p.BV))](
            p.q, p.k, p.g_arg(), hs, d, o, p.chunks, p.scale, BV=p.BV, **_launch(p.BK), **p.consts())
    return o.view(p.B, p.T, p.H, p.V), ht, ((w, u, tinv) if keep_wy else None)


def gdp_backward(p: _Problem, h0: Tensor | None, do: Tensor, dht: Tensor | None, wy: tuple | None = None):
    """Gradients (dq, dk, dv, dbeta, dg, dh0) in the layouts of the op's inputs; ``wy``:
    the forward's W, U and (I+A)^-1 (SAVE_WY), else recomputed."""
    H, K, V, R = p.H, p.K, p.V, p.k.shape[0]
    f32, dev = torch.float32, p.q.device
    w, u, tinv, hs, d, _ = p.recompute(h0, store_t=True, want_ht=False, wy=wy)
    do = do.reshape(p.B * p.T, H, V).contiguous()
    c = p.consts()
    dd = p.buffer("dd", R, H, V, zero=True)
    nv = triton.cdiv(V, p.BV)
    if p.NC:
        gdp_dd_local_kernel[(p.NC, H, nv)](p.q, p.k, p.g_arg(), do, dd, p.chunks, p.scale,
                                          BV=p.BV, **_launch(p.BK), **c)
    dhs = p.buffer("dhs", max(p.NC, 1), H, K, V)
    dh0 = torch.empty(p.N, H, K, V, dtype=f32, device=dev) if h0 is not None else dhs
    dhtc = dht.float().contiguous() if dht is not None else dhs
    gdp_dh_kernel[(p.N, H, nv)](p.q, p.k, p.g_arg(), w, do, dd, dhtc, p.chunks, p.seq_chunk,
                                dhs, dh0, p.scale, BV=p.BV, HAS_DHT=dht is not None, **_launch(p.BK, _stages(p.BK)),
                                STORE_DH0=h0 is not None, **c)
    dq = torch.zeros_like(p.q)
    dk = torch.empty_like(p.k)
    dv = torch.empty_like(p.v)
    dbeta = torch.empty_like(p.beta)
    dg = torch.zeros(p.B * p.T, H, dtype=f32, device=dev) if p.g is not None else None
    dg_arg = dg if dg is not None else dd  # never written when HAS_G is False
    if p.NC and p.BK <= GRAD_SPLIT_ABOVE_BK:
        gdp_grad_kernel[(p.NC, H)](
            p.q, p.k, p.v, p.beta, p.g_arg(), w, u, tinv, hs, dhs, d, dd, do,
            dq, dk, dv, dbeta, dg_arg, p.chunks, p.scale,
            BV=p.BVG, **_launch(p.BK, GRAD_STAGES), **c)
    elif p.NC:
        _split_k_grads(p, (w, u, tinv, hs, dhs, d, dd, do), (dq, dk, dv, dbeta, dg_arg))
    B, T, n_h = p.B, p.T, p.n_h
    return (dq.view(B, T, H, K), dk.view(B, T, n_h, H, K), dv.view(B, T, n_h, H, V),
            dbeta.view(B, T, n_h, H), dg.view(B, T, H) if dg is not None else None,
            dh0 if h0 is not None else None)


def _split_k_grads(p: _Problem, saved: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> None:
    """The chunk gradients for BK > GRAD_SPLIT_ABOVE_BK, written into ``grads`` (dq, dk,
    dv, dbeta, dg) from the recomputed ``saved`` (w, u, tinv, hs, dhs, d, dd, do).

    Scratch beside them: the fp32 partial dq and dk (none for fp32 inputs: the gradients
    themselves hold them) and per chunk, head and K slice a [64, 64] share of dA and four
    [64] sums, about (K / GRAD_SLICE_K) * 17 KB per chunk and head in fp32.
    """
    w, u, tinv, hs, dhs, d, dd, do = saved
    dq, dk, dv, dbeta, dg = grads
    f32, dev = torch.float32, p.q.device
    nks = triton.cdiv(p.K, GRAD_SLICE_K)
    dqp = dq if dq.dtype == f32 else torch.empty(dq.shape, dtype=f32, device=dev)
    dkp = dk if dk.dtype == f32 else torch.empty(dk.shape, dtype=f32, device=dev)
    dak = torch.empty(p.NC, p.H, nks, CHUNK_ROWS, CHUNK_ROWS, dtype=f32, device=dev)
    red = torch.empty(p.NC, p.H, nks, 4, CHUNK_ROWS, dtype=f32, device=dev)
    c = {**p.consts(), "BK": GRAD_SLICE_K}
    bv = min(p.BVF, SPLIT_BV)
    gdp_grad_kslice_kernel[(p.NC, p.H, nks)](
        p.q, p.k, p.beta, p.g_arg(), w, tinv, hs, dhs, d, dd, do, dqp, dkp, dak, red, p.chunks,
        p.scale, BV=bv, **KSLICE_LAUNCH, **c)
    gdp_grad_finish_kernel[(p.NC, p.H)](
        p.q, p.k, p.v, p.beta, p.g_arg(), u, tinv, d, dd, do, dqp, dkp, dak, red,
        dq, dk, dv, dbeta, dg, p.chunks, p.scale, BV=bv, **FINISH_LAUNCH, **c)


class GatedDeltaProductFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens):
        p = _Problem(q, k, v, beta, g, cu_seqlens, scale)
        keep_wy = SAVE_WY and any(ctx.needs_input_grad)
        o, ht, wy = gdp_forward(p, initial_state, output_final_state, keep_wy)
        ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens, *(wy or ()))
        ctx.scale, ctx.layout, ctx.opd = scale, p.layout, p.opd
        ctx.g_dtype = g.dtype if g is not None else None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, cu_seqlens, *wy = ctx.saved_tensors
        p = _Problem(q, k, v, beta, g, cu_seqlens, ctx.scale, ctx.layout, ctx.opd)
        dq, dk, dv, db, dg, dh0 = gdp_backward(p, h0, do, dht, tuple(wy) if wy else None)
        if dg is not None:
            dg = dg.to(ctx.g_dtype)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, db, dg, None, dh0, None, None


def triton_gated_delta_product(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None,
                               *, scale: float, initial_state: Tensor | None = None,
                               output_final_state: bool = False,
                               cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The op's Triton backend (inputs already validated by ``kernels.gated_delta_product``)."""
    o, ht = GatedDeltaProductFunction.apply(q, k, v, beta, g, scale, initial_state,
                                            output_final_state, cu_seqlens)
    return o, (ht if output_final_state else None)


register_triton("gated_delta_product", triton_gated_delta_product)
