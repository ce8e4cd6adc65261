"""Registers, spills and shared memory of every Triton kernel, compiled for sm_90 on a CPU.

Runs each public op (forward and backward, ``backend="triton"``) at realistic head sizes
under the interpreter only to record the launches its host wrapper makes (constexprs,
argument types, num_warps / num_stages; see ``kernels/triton/aot.py``), compiles every
distinct launch ahead of time for sm_90 with triton's bundled ptxas, and prints one row per
kernel. Nothing runs on a GPU and nothing is timed: this catches kernels that do not
compile, spill, or need more shared memory than a block may have (the launch would fail
with ``OutOfResources``). Exit status 1 when a kernel fails to compile or exceeds a hard
limit (shared memory, registers); spills are only flagged.

    python bench/kernel_resources.py                 # the bf16 grid (~10 min on 2 cores)
    python bench/kernel_resources.py --fp32          # plus fp32 twins (~25 min more)
    python bench/kernel_resources.py --ops ssd --quick
    python bench/kernel_resources.py --num-stages 2  # what a launch option change would give
    python bench/kernel_resources.py --ops gated_delta_product --sass > before.txt
                                                     # digests of the machine code: diff two trees
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels.triton import aot  # noqa: E402

OPS = ("gated_delta_product", "ssd", "linear_recurrence", "causal_conv1d", "rms_norm", "gated_activation",
       "l2_normalize", "rg_lru_gates")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Batch and length only shape the grids and integer arguments (multiples of 16, as in
# training); 8 sequences make the scan's channel block what a B*T = 32K batch gets.
BATCH, SEQLEN = 8, 64


@dataclass(frozen=True)
class Case:
    """One op call (forward and backward) whose launches get compiled."""

    op: str
    label: str
    call: Callable[[], None]


def _leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale + shift).to(dtype).requires_grad_()


def _backward(out: torch.Tensor, state: torch.Tensor | None) -> None:
    loss = out.float().sum()
    if state is not None:
        loss = loss + state.float().sum()
    loss.backward()


def gdp_case(dtype: str, K: int, V: int, n_h: int, *, H: int = 16, gate: bool = True,
             with_state: bool = False, half: bool = False, half_dots: bool = False) -> Case:
    """Gated DeltaProduct; ``with_state`` adds initial and final state (prefill, dht, dh0);
    ``half`` turns on HALF_INTERMEDIATES (the bench's ``half`` variant: half buffers),
    ``half_dots`` HALF_DOT_OPERANDS (``half_dots``: bf16 dot operands)."""
    dt = DTYPES[dtype]

    def call() -> None:
        B, T = BATCH, SEQLEN
        q, k = _leaf(B, T, H, K, dtype=dt), _leaf(B, T, n_h, H, K, dtype=dt)
        # beta and g in fp32, as the GatedDeltaProduct layer passes them
        v, beta = _leaf(B, T, n_h, H, V, dtype=dt), _leaf(B, T, n_h, H, dtype=torch.float32)
        g = _leaf(B, T, H, dtype=torch.float32, shift=-1.0) if gate else None
        h0 = _leaf(B, H, K, V, dtype=torch.float32) if with_state else None
        # set here, not around record(): record re-imports the module, resetting its settings
        with mock.patch("kernels.triton.gated_delta_product.HALF_INTERMEDIATES", half), \
                mock.patch("kernels.triton.gated_delta_product.HALF_DOT_OPERANDS", half_dots):
            o, ht = kernels.gated_delta_product(q, k, v, beta, g, initial_state=h0,
                                                output_final_state=with_state, backend="triton")
            _backward(o, ht)

    label = (f"{dtype} K={K} V={V} n_h={n_h}{'' if gate else ' no-g'}{' +state' if with_state else ''}"
             f"{' half' if half else ''}{' half-dots' if half_dots else ''}")
    return Case("gated_delta_product", label, call)


def ssd_case(dtype: str, P: int, N: int, *, H: int = 64, G: int = 1, neg: bool = False,
             with_state: bool = False, half_dots: bool = False) -> Case:
    """Mamba2 SSD with D; ``neg`` is allow_neg_eigval, ``half_dots`` HALF_DOT_OPERANDS."""
    dt = DTYPES[dtype]

    def call() -> None:
        B, T = BATCH, SEQLEN
        x, dts = _leaf(B, T, H, P, dtype=dt), _leaf(B, T, H, dtype=dt, scale=0.1, shift=0.5)
        A, D = _leaf(H, dtype=dt, shift=-1.0), _leaf(H, dtype=dt)
        Bm, Cm = _leaf(B, T, G, N, dtype=dt), _leaf(B, T, G, N, dtype=dt)
        h0 = _leaf(B, H, P, N, dtype=torch.float32) if with_state else None
        with mock.patch("kernels.triton.ssd.HALF_DOT_OPERANDS", half_dots):  # as in gdp_case
            y, ht = kernels.ssd(x, dts, A, Bm, Cm, D=D, allow_neg_eigval=neg, initial_state=h0,
                                output_final_state=with_state, backend="triton")
            _backward(y, ht)

    label = (f"{dtype} P={P} N={N} G={G}{' neg' if neg else ''}{' +state' if with_state else ''}"
             f"{' half-dots' if half_dots else ''}")
    return Case("ssd", label, call)


def scan_case(dtype: str, D: int, *, with_state: bool = False) -> Case:
    """RG-LRU scan over ``BATCH`` sequences of width D."""
    dt = DTYPES[dtype]

    def call() -> None:
        x, a = _leaf(BATCH, SEQLEN, D, dtype=dt), _leaf(BATCH, SEQLEN, D, dtype=dt, scale=0.01, shift=0.9)
        h0 = _leaf(BATCH, D, dtype=torch.float32) if with_state else None
        h, ht = kernels.linear_recurrence(x, a, initial_state=h0, output_final_state=with_state,
                                          backend="triton")
        _backward(h, ht)

    return Case("linear_recurrence", f"{dtype} D={D}{' +state' if with_state else ''}", call)


def conv_case(dtype: str, D: int, W: int = 4, *, with_state: bool = False) -> Case:
    """Depthwise causal conv with bias and SiLU (as the models use it)."""
    dt = DTYPES[dtype]

    def call() -> None:
        x, w, b = _leaf(BATCH, SEQLEN, D, dtype=dt), _leaf(D, W, dtype=dt), _leaf(D, dtype=dt)
        s0 = _leaf(BATCH, D, W - 1, dtype=torch.float32) if with_state else None
        y, st = kernels.causal_conv1d(x, w, b, activation="silu", initial_state=s0,
                                      output_final_state=with_state, backend="triton")
        _backward(y, st)

    return Case("causal_conv1d", f"{dtype} D={D} W={W}{' +state' if with_state else ''}", call)


def norm_case(dtype: str, D: int, *, group: int | None = None, gated: bool = False,
              gate_first: bool = False) -> Case:
    """RMSNorm over ``BATCH * SEQLEN`` tokens (as the blocks' norms, GDP's per-head gated
    o-norm and Mamba2's grouped gate-first norm use it)."""
    dt = DTYPES[dtype]

    def call() -> None:
        x, w = _leaf(BATCH, SEQLEN, D, dtype=dt), _leaf(D, dtype=dt, shift=1.0)
        gate = _leaf(BATCH, SEQLEN, D, dtype=dt) if gated else None
        y = kernels.rms_norm(x, w, 1e-6, gate=gate, group=group, gate_first=gate_first, backend="triton")
        _backward(y, None)

    label = f"{dtype} D={D} group={group or D}{' gated' if gated else ''}{' gate-first' if gate_first else ''}"
    return Case("rms_norm", label, call)


def act_case(dtype: str, D: int, kind: str = "silu") -> Case:
    """The gated MLP's ``act(gate) * up`` over ``BATCH * SEQLEN`` tokens of width D."""
    dt = DTYPES[dtype]

    def call() -> None:
        g, u = _leaf(BATCH, SEQLEN, D, dtype=dt), _leaf(BATCH, SEQLEN, D, dtype=dt)
        _backward(kernels.gated_activation(g, u, kind, backend="triton"), None)

    return Case("gated_activation", f"{dtype} D={D} {kind}", call)


def l2_case(dtype: str, H: int, K: int) -> Case:
    """GDP's q/k L2 normalisation: ``H`` heads of ``K`` channels over ``BATCH * SEQLEN`` tokens."""
    dt = DTYPES[dtype]

    def call() -> None:
        _backward(kernels.l2_normalize(_leaf(BATCH, SEQLEN, H, K, dtype=dt), backend="triton"), None)

    return Case("l2_normalize", f"{dtype} H={H} K={K}", call)


def rglru_case(dtype: str, W: int) -> Case:
    """Griffin's RG-LRU gating over ``BATCH * SEQLEN`` tokens of width W, a reset per row."""
    dt = DTYPES[dtype]

    def call() -> None:
        x, gx, ga = (_leaf(BATCH, SEQLEN, W, dtype=dt) for _ in range(3))
        reset = torch.zeros(BATCH, SEQLEN, 1, dtype=torch.bool)
        reset[:, 0] = True
        xn, a = kernels.rg_lru_gates(x, gx, ga, _leaf(W, dtype=torch.float32), reset, backend="triton")
        _backward(xn + a, None)

    return Case("rg_lru_gates", f"{dtype} W={W}", call)


def full_grid(fp32: bool = False) -> list[Case]:
    """Shapes of the issues' targets and the model presets (1.3B: GDP H=16 K=V=128, also
    with half intermediates, and with them half dot operands; Mamba2 64 heads of P=64,
    N=128, also with half dot operands; conv over 4352 channels; Griffin width 2048), in
    bf16 (training); ``fp32`` adds fp32 twins (fp32 dots are FMA loops: GDP's take ~10 min)."""
    cases = [
        *(gdp_case("bf16", 128, 128, n_h) for n_h in (1, 2, 3)),
        gdp_case("bf16", 128, 128, 2, with_state=True),
        gdp_case("bf16", 128, 128, 2, half=True),
        gdp_case("bf16", 128, 128, 2, half=True, half_dots=True),
        gdp_case("bf16", 64, 64, 2),
        gdp_case("bf16", 256, 256, 2),
        ssd_case("bf16", 64, 128),
        ssd_case("bf16", 64, 128, neg=True, with_state=True),
        ssd_case("bf16", 64, 128, half_dots=True),
        scan_case("bf16", 2048),
        scan_case("bf16", 2048, with_state=True),
        conv_case("bf16", 4352),
        conv_case("bf16", 2048, with_state=True),
        norm_case("bf16", 2048),
        norm_case("bf16", 2048, group=128, gated=True),
        norm_case("bf16", 4096, gated=True, gate_first=True),
        act_case("bf16", 5632),
        act_case("bf16", 6144, "gelu"),
        l2_case("bf16", 32, 128),
        l2_case("bf16", 16, 256),
        rglru_case("bf16", 2048),
    ]
    if fp32:
        cases += [gdp_case("fp32", 128, 128, 2), ssd_case("fp32", 64, 128),
                  scan_case("fp32", 2048), conv_case("fp32", 2048, with_state=True), norm_case("fp32", 2048),
                  act_case("fp32", 5632), l2_case("fp32", 32, 128),
                  rglru_case("fp32", 2048)]
    return cases


def quick_grid() -> list[Case]:
    """One realistic bf16 case per op."""
    return [gdp_case("bf16", 128, 128, 2), ssd_case("bf16", 64, 128), scan_case("bf16", 2048),
            conv_case("bf16", 4352), norm_case("bf16", 2048, group=128, gated=True), act_case("bf16", 5632),
            l2_case("bf16", 32, 128), rglru_case("bf16", 2048)]


def kernel_config(launch: aot.Launch) -> str:
    """The launch's block sizes and the flags it switches on, e.g. ``BK=128 BV=64 HAS_G``."""
    kw = dict(launch.kwargs)
    blocks = [f"{k}={v}" for k, v in kw.items() if k.startswith("B") and isinstance(v, int)
              and not isinstance(v, bool)]
    flags = [k for k, v in kw.items() if v is True]
    return " ".join(blocks + flags)


def measure(launch: aot.Launch, sass: bool = False, **options) -> dict:
    """Compile one launch; a row with its resources (and SASS digest), or the compiler's error."""
    t0 = time.perf_counter()
    try:
        compiled = aot.compile_launch(launch, **options)
        res = aot.resources(compiled)
        digest = aot.sass_digest(compiled) if sass else None
    except Exception as e:  # noqa: BLE001 - the report shows any compiler failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"error": f"{type(e).__name__}: {first}"[:200], "seconds": time.perf_counter() - t0}
    return {"res": res, "sass": digest, "seconds": time.perf_counter() - t0}


def rows_for(cases: list[Case], sass: bool = False, **options) -> list[dict]:
    """One row per distinct kernel launch of the cases (a launch repeated by a later case
    is compiled once, under the first)."""
    rows, seen = [], set()
    for case in cases:
        for launch in aot.record(case.call):
            key = (launch.module, launch.kernel, aot.specialize(launch, **options).key())
            if key in seen:
                continue
            seen.add(key)
            row = {"kernel": launch.kernel, "case": case.label, "config": kernel_config(launch)}
            row.update(measure(launch, sass, **options))
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


HEADER = (f"{'kernel':<26} {'case':<30} {'config':<40} {'regs':>4} {'spill st/ld':>11} "
          f"{'smem B':>7} {'warps':>5} {'stg':>3} {'s':>5}  flags")


def _format_row(row: dict) -> str:
    head = f"{row['kernel']:<26} {row['case']:<30} {row['config']:<40} "
    if "error" in row:
        return head + f"{'-':>4} {'-':>11} {'-':>7} {'-':>5} {'-':>3} {row['seconds']:>5.1f}  FAIL {row['error']}"
    r: aot.Resources = row["res"]
    spill = f"{r.spill_stores}/{r.spill_loads}"
    notes = r.warnings() + ([f"sass={row['sass']}"] if row.get("sass") else [])
    return (head + f"{r.registers:>4} {spill:>11} {r.shared:>7} {r.num_warps:>5} {r.num_stages:>3} "
            f"{row['seconds']:>5.1f}  {' '.join(notes)}")


def is_hard_failure(row: dict) -> bool:
    """Rows a real launch could not run: compile errors, too much shared memory or registers."""
    if "error" in row:
        return True
    return any(f != "SPILL" for f in row["res"].warnings())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="one bf16 case per op instead of the full grid")
    p.add_argument("--fp32", action="store_true", help="add fp32 cases to the full grid (slow to compile)")
    p.add_argument("--num-stages", type=int, default=None,
                   help="override every launch's num_stages (what-if; the wrappers' choice otherwise)")
    p.add_argument("--num-warps", type=int, default=None, help="override every launch's num_warps")
    p.add_argument("--sass", action="store_true",
                   help="add a digest of each launch's SASS (no line info): equal digests in two trees = the "
                        "same machine code, e.g. after refactoring kernel code")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; choose from {list(OPS)}")
    if not aot.can_compile():
        raise SystemExit("TRITON_INTERPRET is set: run without it (the interpreter is used only "
                         "to record the launches)")
    if aot.ptxas_path() is None:
        raise SystemExit("ptxas not found: needs triton with its NVIDIA backend (or TRITON_PTXAS_PATH)")
    options = {k: v for k, v in (("num_stages", args.num_stages), ("num_warps", args.num_warps))
               if v is not None}
    import triton
    print(f"triton {triton.__version__}, torch {torch.__version__}; ptxas sm_90a (via triton), "
          f"compiled on a CPU machine, not timed; shared-memory limit {aot.SM90_SHARED_LIMIT} B/block"
          + (f"; overrides {options}" if options else ""))
    print(HEADER, flush=True)
    torch.manual_seed(0)
    cases = [c for c in (quick_grid() if args.quick else full_grid(args.fp32)) if c.op in ops]
    rows = rows_for(cases, args.sass, **options)
    bad = [r for r in rows if is_hard_failure(r)]
    spills = [r for r in rows if "res" in r and "SPILL" in r["res"].warnings()]
    print(f"{len(rows)} kernels compiled; {len(bad)} cannot launch on sm_90; {len(spills)} spill; "
          f"compile time {sum(r['seconds'] for r in rows):.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
