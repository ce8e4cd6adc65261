"""GPU benchmark of the Triton scan, conv, SSD and fused elementwise (norm, gate) kernels.

Prints, per op: forward and forward+backward time, achieved GB/s (memory-bound scan and
conv; with the GPU's measured copy bandwidth for the scan) or TFLOP/s (SSD, counting the
chunked algorithm's matmuls), and ratios against the torch path of ``kernels`` and the
public comparators when importable: flash-linear-attention (HGRN recurrence for the scan,
chunk_simple_gla for SSD), mamba-ssm's mamba_chunk_scan_combined, Dao's causal_conv1d.
rms_norm (GB/s) is the gated, grouped norm as Mamba2 calls it, against the torch path and
the plain eager composition the models used before (``--norm-group`` channels per group);
gated_activation (GB/s) is SwiGLU's ``silu(gate) * up`` at ``--hidden`` channels, against the
torch path and ``F.silu(gate) * up``; l2_normalize (GB/s) is GDP's q/k normalisation over
``--l2-heads`` heads of ``--l2-dim`` channels, against the torch path and the eager composition;
rg_lru_gates (GB/s) is Griffin's RG-LRU gating at ``--dim`` channels, against the torch path
and the eager composition the model used before.
Needs only torch and triton to import; ``--results FILE`` appends a Markdown table.
``--variants`` also times launch choices of our Triton ops that only a GPU can settle (the
scan's time tile, SSD's chunk length and saved-state spacing; see VARIANTS), in a second
table per op written after the first, each against the default launch re-timed beside it
and checked against its outputs and gradients on the same inputs.
``--profile`` then runs a few warm fwd+bwd of each op's Triton row under torch.profiler and
adds a table of where the time goes, per kernel (``bench/kernel_profile.py``). fla's guard
against Triton 3.4-3.7.0 on Hopper (chunk_simple_gla's backward) is bypassed to time fla
anyway, its row marked (``bench/fla_guard.py``; ``--fla-respect-triton-guard`` keeps it).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import fla_guard  # noqa: E402 - after the path insert, for ``python bench/...``
from bench.kernel_profile import profile_lines  # noqa: E402

Row = dict
# variant -> (op, keyword arguments of the Triton entry point, what it changes); the public ops
# take none of these (the SSD's refuses a saved state per 32 tokens), so variants call the entry
VARIANTS = {
    "bt64": ("linear_recurrence", dict(block_t=64), "64-row time tiles"),
    "bt128": ("linear_recurrence", dict(block_t=128), "128-row time tiles"),
    "bt256": ("linear_recurrence", dict(block_t=256), "256-row time tiles"),
    "prefetch": ("linear_recurrence", dict(prefetch=True), "each tile's loads issued a step early"),
    "bd16": ("linear_recurrence", dict(block_d=16), "16-channel blocks: twice the programs"),
    "bd16prefetch": ("linear_recurrence", dict(block_d=16, prefetch=True), "16-channel blocks and prefetch"),
    "chunk16": ("ssd", dict(block_l=16, save_every=32), "16-token chunks, a state saved per 32 tokens"),
    "chunk16s64": ("ssd", dict(block_l=16, save_every=64), "16-token chunks, a state saved per 64 tokens"),
    "chunk32s32": ("ssd", dict(block_l=32, save_every=32), "32-token chunks, a state saved per 32 tokens"),
    "half_dots": ("ssd", dict(half_dots=True), "bf16 dot operands, not in the state update"),
}
# max|variant - default| / max|default| over the output and every input gradient above
# which a variant is flagged (different tiling only reorders fp32 sums; half_dots rounds
# dot operands to bf16, well within the bf16 limit)
VARIANT_ERR_LIMIT = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 1e-3}
DEVICE = "cuda"  # the CPU smoke test (tests/test_bench_scripts.py) points it at the interpreter
PROFILE = False  # --profile: a "triton" row keeps its fwd+bwd step (row["_step"]) for main to profile


def variant_names(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in names if x not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="linear_recurrence,causal_conv1d,ssd")
    p.add_argument("--tokens", type=int, default=32768, help="B*T")
    p.add_argument("--seqlen", type=int, default=4096, help="T (B = tokens // T)")
    p.add_argument("--dim", type=int, default=2560, help="channels of the scan and the conv")
    p.add_argument("--width", type=int, default=4, help="conv width")
    p.add_argument("--heads", type=int, default=32, help="SSD heads")
    p.add_argument("--headdim", type=int, default=64, help="SSD P")
    p.add_argument("--dstate", type=int, default=128, help="SSD N")
    p.add_argument("--groups", type=int, default=1, help="SSD groups of B/C")
    p.add_argument("--neg", action="store_true", help="SSD with allow_neg_eigval")
    p.add_argument("--norm-group", type=int, default=None, help="rms_norm channels per group (default --dim)")
    p.add_argument("--hidden", type=int, default=5632, help="gated_activation channels (an MLP's hidden width)")
    p.add_argument("--l2-heads", type=int, default=48, help="l2_normalize heads per token (GDP-1.3B n_h=2: 16 q + 32 k)")
    p.add_argument("--l2-dim", type=int, default=128, help="l2_normalize channels per head")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-torch", action="store_true", help="skip the (slow) torch reference path")
    p.add_argument("--results", default=None, help="append a Markdown table to this file")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile a few warm fwd+bwd of each op's Triton row: time per kernel")
    p.add_argument("--variants", type=variant_names, default=[],
                   help="also time these launch variants of our Triton ops, comma-separated: "
                        + ", ".join(f"{k} ({op}: {what})" for k, (op, _, what) in VARIANTS.items()))
    fla_guard.add_option(p)
    a = p.parse_args(argv)
    ops = a.ops.split(",")
    stray = [v for v in a.variants if VARIANTS[v][0] not in ops]
    if stray:
        p.error(f"--variants {','.join(stray)}: for {', '.join(sorted({VARIANTS[v][0] for v in stray}))}, "
                f"which --ops {a.ops} leaves out")
    return a


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the GPU."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def fwd_bwd(fwd: Callable[[], object], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step():
        for t in leaves:
            t.grad = None
        out = fwd()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o is not None and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])  # every output (rg_lru_gates: x̃ and a)
    return step


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def timed(name: str, fwd: Callable[[], object], leaves: list[torch.Tensor]) -> Row | None:
    try:
        step = fwd_bwd(fwd, leaves)
        row = dict(impl=name, fwd=bench(fwd), fwdbwd=bench(step))
        if PROFILE and name == "triton":  # ours, profiled by main once every row is timed
            row["_step"] = step
        return row
    except Exception as exc:  # a comparator that fails to run is reported, not fatal
        print(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
        return None


def three_way(a: argparse.Namespace, op: Callable[[str], Callable[[], object]], eager: Callable[[], object],
              leaves: list[torch.Tensor], fwd_bytes: int, bwd_bytes: int) -> list[Row]:
    """A fused elementwise op: its Triton kernel, its torch path (unless ``--no-torch``) and the
    eager composition the models used before, with GB/s from the bytes one pass must move."""
    rows = [timed("triton", op("triton"), leaves)]
    if not a.no_torch:
        rows.append(timed("torch", op("torch"), leaves))
    rows.append(timed("eager composition", eager, leaves))
    for r in rows:
        if r:
            r["GB/s fwd"] = fwd_bytes / r["fwd"] / 1e6
            r["GB/s fwd+bwd"] = (fwd_bytes + bwd_bytes) / r["fwdbwd"] / 1e6
    return [r for r in rows if r]


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / bench(lambda: dst.copy_(src)) / 1e6  # GB/s


def lr_inputs(a: argparse.Namespace, dtype: torch.dtype) -> list[torch.Tensor]:
    """x and the gate a of the scan, [B, T, D] leaves (gates in [0.9, 1): long memories)."""
    B, T, D = a.tokens // a.seqlen, a.seqlen, a.dim
    x = leaf(torch.randn(B, T, D, device=DEVICE, dtype=dtype))
    gate = leaf(torch.rand(B, T, D, device=DEVICE, dtype=dtype) * 0.1 + 0.9)
    return [x, gate]


def lr_rates(rows: list[Row], x: torch.Tensor, copy: float) -> list[Row]:
    """GB/s from the bytes one pass must move, and the fraction of copy bandwidth ``copy``."""
    esz = x.element_size()
    fwd_bytes, bwd_bytes = 3 * x.numel() * esz, 5 * x.numel() * esz  # x,a->h ; a,h,dh->dx,da
    rows = [r for r in rows if r]
    for r in rows:
        r["GB/s fwd"] = fwd_bytes / r["fwd"] / 1e6
        r["GB/s fwd+bwd"] = (fwd_bytes + bwd_bytes) / r["fwdbwd"] / 1e6
        r["% copy bw (fwd)"] = 100 * r["GB/s fwd"] / copy
    return rows


def bench_linear_recurrence(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    import kernels

    x, gate = lr_inputs(a, dtype)
    rows = [timed("triton", lambda: kernels.linear_recurrence(x, gate, backend="triton"), [x, gate])]
    if not a.no_torch:
        rows.append(timed("torch", lambda: kernels.linear_recurrence(x, gate, backend="torch"), [x, gate]))
    try:
        from fla.ops.hgrn import fused_recurrent_hgrn  # same elementwise scan, log gate

        g = leaf(gate.detach().float().log().to(dtype))
        rows.append(timed("fla fused_recurrent_hgrn", lambda: fused_recurrent_hgrn(x, g), [x, g]))
    except Exception as e:  # a comparator that fails must not lose our measured rows
        print(f"  fla HGRN comparator unavailable: {type(e).__name__}: {e}")
    copy = copy_bandwidth(x.numel() * x.element_size())
    print(f"  measured copy bandwidth: {copy:.0f} GB/s")
    return lr_rates(rows, x, copy)


def bench_causal_conv1d(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    import kernels

    B, T, D, W = a.tokens // a.seqlen, a.seqlen, a.dim, a.width
    x = leaf(torch.randn(B, T, D, device=DEVICE, dtype=dtype))
    w = leaf(torch.randn(D, W, device=DEVICE, dtype=dtype) / W**0.5)
    b = leaf(torch.randn(D, device=DEVICE, dtype=dtype))
    nbytes = 2 * x.numel() * x.element_size()
    rows = [timed("triton", lambda: kernels.causal_conv1d(x, w, b, activation="silu", backend="triton"), [x, w, b])]
    if not a.no_torch:
        rows.append(timed("torch", lambda: kernels.causal_conv1d(x, w, b, activation="silu", backend="torch"), [x, w, b]))
    try:
        from causal_conv1d import causal_conv1d_fn

        xt = leaf(x.detach().transpose(1, 2))  # channels-last view, as mamba uses it
        rows.append(timed("causal_conv1d (Dao)", lambda: causal_conv1d_fn(xt, w, b, activation="silu"), [xt, w, b]))
    except Exception as e:
        print(f"  causal_conv1d comparator unavailable: {type(e).__name__}: {e}")
    for r in rows:
        if r:
            r["GB/s fwd"] = nbytes / r["fwd"] / 1e6
    return [r for r in rows if r]


def _eager_gated_norm(x, w, z, group: int, eps: float = 1e-6):
    """The plain composition (autograd keeps every fp32 intermediate): the eager baseline."""
    u = (x.float() * torch.nn.functional.silu(z.float())).unflatten(-1, (-1, group))
    return ((u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * w.float()).to(x.dtype)


def bench_rms_norm(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    import kernels

    B, T, D = a.tokens // a.seqlen, a.seqlen, a.dim
    group = a.norm_group or D
    x = leaf(torch.randn(B, T, D, device=DEVICE, dtype=dtype))
    z = leaf(torch.randn(B, T, D, device=DEVICE, dtype=dtype))
    w = leaf(torch.ones(D, device=DEVICE, dtype=dtype))
    esz = x.element_size()
    fwd_bytes, bwd_bytes = 3 * x.numel() * esz, 5 * x.numel() * esz  # x,z->y ; x,z,dy->dx,dz

    def norm(backend):
        return lambda: kernels.rms_norm(x, w, gate=z, group=group, gate_first=True, backend=backend)

    return three_way(a, norm, lambda: _eager_gated_norm(x, w, z, group), [x, z, w], fwd_bytes, bwd_bytes)


def bench_gated_activation(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    import kernels

    B, T = a.tokens // a.seqlen, a.seqlen
    g = leaf(torch.randn(B, T, a.hidden, device=DEVICE, dtype=dtype))
    u = leaf(torch.randn(B, T, a.hidden, device=DEVICE, dtype=dtype))
    esz = g.element_size()
    fwd_bytes, bwd_bytes = 3 * g.numel() * esz, 5 * g.numel() * esz  # g,u->out ; g,u,dout->dg,du
    return three_way(a, lambda backend: lambda: kernels.gated_activation(g, u, "silu", backend=backend),
                     lambda: torch.nn.functional.silu(g) * u, [g, u], fwd_bytes, bwd_bytes)


def bench_l2_normalize(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    import kernels

    B, T = a.tokens // a.seqlen, a.seqlen
    x = leaf(torch.randn(B, T, a.l2_heads, a.l2_dim, device=DEVICE, dtype=dtype))
    nbytes = x.numel() * x.element_size()
    fwd_bytes, bwd_bytes = 2 * nbytes, 3 * nbytes  # x->y ; y,dy->dx (rstd is 1/K of a pass)

    def eager():
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + 1e-6)).to(dtype)

    return three_way(a, lambda backend: lambda: kernels.l2_normalize(x, backend=backend), eager, [x],
                     fwd_bytes, bwd_bytes)


def bench_rg_lru_gates(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    import kernels

    B, T, W = a.tokens // a.seqlen, a.seqlen, a.dim
    x, gx, ga = (leaf(torch.randn(B, T, W, device=DEVICE, dtype=dtype)) for _ in range(3))
    lam = leaf(torch.full((W,), -6.0, device=DEVICE))
    reset = torch.zeros(B, T, 1, device=DEVICE, dtype=torch.bool)
    reset[:, 0] = True
    n, esz = x.numel(), x.element_size()
    fwd_bytes, bwd_bytes = n * (3 * esz + 8), n * (6 * esz + 8)  # x,gx,ga->xn,a ; +dxn,da->dx,dgx,dga

    def eager():  # the plain composition: autograd keeps every fp32 intermediate
        log_a = -8.0 * torch.sigmoid(ga.float()) * torch.nn.functional.softplus(lam)
        mult = torch.sqrt(-torch.expm1(2.0 * log_a)).masked_fill(reset, 1.0)
        return x.float() * torch.sigmoid(gx.float()) * mult, torch.exp(log_a).masked_fill(reset, 0.0)

    def gates(backend):
        return lambda: kernels.rg_lru_gates(x, gx, ga, lam, reset, backend=backend)

    return three_way(a, gates, eager, [x, gx, ga, lam], fwd_bytes, bwd_bytes)


def ssd_flops(T_total: int, H: int, P: int, N: int, L: int = 64) -> tuple[float, float]:
    """Matmul FLOPs of the chunked algorithm per token and head, chunk length L."""
    fwd = 2 * L * N + 2 * L * P + 4 * P * N
    bwd = 2 * L * (3 * N + 2 * P + L) + 12 * P * N
    return float(T_total * H * fwd), float(T_total * H * bwd)


def ssd_inputs(a: argparse.Namespace, dtype: torch.dtype) -> list[torch.Tensor]:
    """x, dt, A, B, C, D leaves of the SSD at the bench's sizes (``--heads`` ... ``--groups``)."""
    B, T, H, P, N, G = a.tokens // a.seqlen, a.seqlen, a.heads, a.headdim, a.dstate, a.groups
    dev = DEVICE
    x = leaf(torch.randn(B, T, H, P, device=dev, dtype=dtype))
    dt = leaf((torch.rand(B, T, H, device=dev) * 0.1 + 0.001).to(dtype))
    A = leaf(-torch.rand(H, device=dev) * 15 - 1)
    Bm = leaf(torch.randn(B, T, G, N, device=dev, dtype=dtype) * N**-0.5)
    Cm = leaf(torch.randn(B, T, G, N, device=dev, dtype=dtype) * N**-0.5)
    D = leaf(torch.randn(H, device=dev))
    return [x, dt, A, Bm, Cm, D]


def ssd_rates(rows: list[Row], a: argparse.Namespace) -> list[Row]:
    """TFLOP/s of the chunked algorithm's matmuls (at 64-token chunks for every row)."""
    f_fwd, f_bwd = ssd_flops(a.tokens // a.seqlen * a.seqlen, a.heads, a.headdim, a.dstate)
    rows = [r for r in rows if r]
    for r in rows:
        r["TFLOP/s fwd"] = f_fwd / r["fwd"] / 1e9
        r["TFLOP/s fwd+bwd"] = (f_fwd + f_bwd) / r["fwdbwd"] / 1e9
    return rows


def bench_ssd(a: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    import kernels

    H, G = a.heads, a.groups
    leaves = ssd_inputs(a, dtype)
    x, dt, A, Bm, Cm, D = leaves

    def ours(backend):
        return lambda: kernels.ssd(x, dt, A, Bm, Cm, D=D, allow_neg_eigval=a.neg, backend=backend)

    rows = [timed("triton", ours("triton"), leaves)]
    if not a.no_torch:
        rows.append(timed("torch", ours("torch"), leaves))
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        rows.append(timed("mamba_chunk_scan_combined",
                          lambda: mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size=256, D=D), leaves))
    except Exception as e:
        print(f"  mamba-ssm comparator unavailable: {type(e).__name__}: {e}")
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # same scalar-decay recurrence

        q = leaf(Cm.detach().repeat_interleave(H // G, dim=2))
        k = leaf(Bm.detach().repeat_interleave(H // G, dim=2))
        v = leaf((x.detach() * dt.detach()[..., None]).to(dtype))
        g = leaf((dt.detach().float() * A.detach()).to(dtype))
        extra = {}
        if "head_first" in inspect.signature(chunk_simple_gla).parameters:
            extra["head_first"] = False  # older fla releases default to [B, H, T, K]
        # not like for like: B and C repeated to every head (more bytes read), x*dt given, and no
        # gradient for dt, A or D computed; the row's name says so
        rows.append(timed(fla_guard.label("fla chunk_simple_gla (B/C per head, no dt/A/D grads)"),
                          lambda: chunk_simple_gla(q=q, k=k, v=v, g=g, scale=1.0, **extra), [q, k, v, g]))
    except Exception as e:
        print(f"  fla chunk_simple_gla comparator unavailable: {type(e).__name__}: {e}")
    return ssd_rates(rows, a)


def outputs_and_grads(fwd: Callable[[], object], leaves: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """fwd()'s outputs, then the gradients of ``leaves`` for a seeded random output gradient,
    as fp32 copies (the leaves' .grad is left cleared)."""
    for t in leaves:
        t.grad = None
    out = fwd()
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o is not None]
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, cots)
    res = [o.detach().float() for o in outs] + [t.grad.float() for t in leaves]
    for t in leaves:
        t.grad = None
    return res


def rel_errors(ref: list[torch.Tensor], got: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    """max|got - ref| / max|ref| per tensor (max|got - ref| where ref is all zeros)."""
    errs = {}
    for n, r, g in zip(names, ref, got, strict=True):
        scale = float(r.abs().max())
        errs[n] = float((g - r).abs().max()) / (scale if scale > 0 else 1.0)
    return errs


def default_launch(op: str, a: argparse.Namespace) -> str:
    """Our Triton op's own launch choice at the bench's sizes, e.g. ``bt64 bd32`` (what the
    variants are timed against; defaults change, so the table says which it was)."""
    import triton

    if op == "linear_recurrence":
        from kernels.triton.linear_recurrence import _blocks

        bt, bd = _blocks(a.tokens // a.seqlen, a.dim, None)
        return f"bt{bt} bd{bd}"
    from kernels.triton.ssd import _chunking

    BL, SUB = _chunking(max(16, triton.next_power_of_2(a.headdim)), max(16, triton.next_power_of_2(a.dstate)),
                        None, None)
    return f"chunk{BL}s{BL * SUB}"


def bench_variants(op: str, a: argparse.Namespace, dtype: torch.dtype) -> tuple[list[Row], list[str]]:
    """The ``--variants`` of ``op`` on fresh inputs: the default launch (re-timed, the base),
    then each variant, checked first against the default's output and input gradients.
    Returns the rows and the table's notes."""
    from kernels.dispatch import triton_impl

    names = [v for v in a.variants if VARIANTS[v][0] == op]
    if not names:
        return [], []
    if op == "linear_recurrence":
        leaves = lr_inputs(a, dtype)
        labels = ["h", "dx", "da"]

        def call(**kw):
            return triton_impl(op)(*leaves, **kw)
    else:
        leaves = ssd_inputs(a, dtype)
        labels = ["y", "dx", "ddt", "dA", "dB", "dC", "dD"]

        def call(**kw):
            return triton_impl(op)(*leaves[:5], D=leaves[5], allow_neg_eigval=a.neg, **kw)
    print(f"{op} variants:", flush=True)
    default = default_launch(op, a)
    base = timed(f"triton default ({default})", call, leaves)
    if base is None:
        return [], []
    ref = outputs_and_grads(call, leaves)
    limit = VARIANT_ERR_LIMIT[a.dtype]
    rows, over = [base], []
    for v in names:
        fn = functools.partial(call, **VARIANTS[v][1])
        try:
            err = rel_errors(ref, outputs_and_grads(fn, leaves), labels)
        except Exception as exc:  # a variant the kernel refuses (or that faults) is reported, not fatal
            print(f"  triton {v}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        worst = max(err.values(), key=lambda e: (e != e, e))  # a NaN wins
        if not worst <= limit:
            over.append(v)
        print(f"  triton {v} ({VARIANTS[v][2]}): max|diff| / max|default| "
              + ", ".join(f"{k} {e:.1e}" for k, e in err.items()) + ("  OVER LIMIT" if v in over else ""),
              flush=True)
        row = timed(f"triton {v}", fn, leaves)
        if row is not None:
            row["max rel err vs default"] = worst
            rows.append(row)
    if op == "linear_recurrence":
        rows = lr_rates(rows, leaves[0], copy_bandwidth(leaves[0].numel() * leaves[0].element_size()))
    else:
        rows = ssd_rates(rows, a)
    notes = [f"Variants against the default launch ({default}), re-timed beside them on the same inputs: "
             + "; ".join(f"{v}: {VARIANTS[v][2]}" for v in names) + ". Max rel err: the largest over "
             f"{', '.join(labels[:1])} and the gradients {', '.join(labels[1:])} of max|variant - default| / "
             f"max|default| for one random output gradient (limit {limit:g} in {a.dtype})"
             + (f"; OVER THE LIMIT: {', '.join(over)}." if over else ".")]
    return rows, notes


def report(op: str, rows: list[Row], lines: list[str], notes: list[str] = ()) -> None:
    if not rows:
        return
    base = rows[0]
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "impl" and not k.startswith("_")))
    head = f"| {op} | " + " | ".join(f"{k}" + (" ms" if k in ("fwd", "fwdbwd") else "") for k in keys) + \
        " | triton speed-up fwd | triton speed-up fwd+bwd |"
    lines += [head, "|" + "---|" * (len(keys) + 3)]

    def cell(r: Row, k: str) -> str:
        if k not in r:
            return "-"
        return f"{r[k]:.1e}" if k.startswith("max rel err") else f"{r[k]:.3f}"

    for r in rows:
        vals = " | ".join(cell(r, k) for k in keys)
        lines.append(f"| {r['impl']} | {vals} | {r['fwd'] / base['fwd']:.2f}x | {r['fwdbwd'] / base['fwdbwd']:.2f}x |")
    if any(fla_guard.FLAG in r["impl"] for r in rows) and fla_guard.bypass_note():
        lines += ["", fla_guard.bypass_note() + " (This table has timings only, no accuracy.)"]
    if notes:
        lines += ["", *notes]
    lines.append("")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_scan_conv_ssd: needs a CUDA GPU (the kernels' CPU tests are in tests/)")
    global PROFILE
    PROFILE = a.profile
    dtype = getattr(torch, a.dtype)
    gpu = torch.cuda.get_device_name()
    if {"ssd", "linear_recurrence"} & set(a.ops.split(",")):  # the ops with fla comparators
        fla_guard.bypass_fla_triton_guard(a.fla_respect_triton_guard)
    title = [f"## {gpu}, {a.dtype}, B*T = {a.tokens}, T = {a.seqlen}", ""]
    funcs = dict(linear_recurrence=bench_linear_recurrence, causal_conv1d=bench_causal_conv1d, ssd=bench_ssd,
                 rms_norm=bench_rms_norm, gated_activation=bench_gated_activation,
                 l2_normalize=bench_l2_normalize, rg_lru_gates=bench_rg_lru_gates)
    for i, op in enumerate(a.ops.split(",")):  # each op's table once measured (a cap may end the rest)
        print(f"{op}:", flush=True)
        lines = list(title) if i == 0 else []
        rows = funcs[op](a, dtype)
        report(op, rows, lines)
        write_lines(a.results, lines)
        step = next((r["_step"] for r in rows if "_step" in r), None)
        del rows
        if a.variants:  # after the op's own table is written (a cap keeps it), before its profile
            lines = []
            vrows, notes = bench_variants(op, a, dtype)
            report(f"{op} variants", vrows, lines, notes)
            del vrows
            write_lines(a.results, lines)
        if step is not None:  # after every row is timed and written: compiled, and a cap keeps the table
            write_lines(a.results, profile_lines(step, f"{op} triton, {a.dtype}, B*T = {a.tokens}, T = {a.seqlen}"),
                        echo=False)  # profile_lines printed them
        del step  # the op's inputs, before the next op


def write_lines(path: str | None, lines: list[str], echo: bool = True) -> None:
    """Print ``lines`` and append them to the results file, if any."""
    if not lines:
        return
    text = "\n".join(lines)
    if echo:
        print(text, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
