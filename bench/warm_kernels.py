"""Compile the GPU session's Triton kernels in parallel, into the on-disk cache, before its stages.

    python -m bench.warm_kernels [--list] [--keys] [--only SUBSTR ...] [--workers N]

Why: a bare machine has an empty Triton cache, and one process compiles serially: each new
GatedDeltaProduct configuration took 25-30 s on its first call (six kernels), SSD's first
bf16 test 19 s, and the cold ``pytest -m gpu`` stage got through 7 tests in 140 s. Here a pool
of ``cpu_count - 2`` processes each runs ONE tiny forward+backward of one configuration
through the public ``kernels`` API; every compiled kernel lands in Triton's cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``; its writes are atomic renames, so
concurrent writers are safe) and the later stages load it instead of compiling.

Cache-key matching. Triton compiles one binary per (source, constexpr values, num_warps /
num_stages, argument signature). The signature is each pointer's dtype plus a hint when its
address is 16-byte aligned, and each plain int's type plus a specialisation: 1 becomes a
constant and a multiple of 16 gets a divisibility hint; floats are not specialised. So a
tiny call hits the same binary when (1) every size that is a constexpr or picks one (K, V,
n_h, heads H of GatedDeltaProduct; P, N of SSD; conv width and channel block; the row tiles
from the normalised width; rg_lru's rows per program, a power of two up to 256 from the
token count; linear_recurrence's channel block, which shrinks with the number of
sequences) takes the real value, (2) every int argument (token counts L, M, n; widths D,
W; SSD's H, P, G, N, H/G) falls in the same class (1 / multiple of 16 / other) -- the real
token counts are multiples of 16, so tiny calls use 64 tokens (256 rows for rg_lru_gates)
and keep every other int at its real value -- and (3) every tensor has the real dtype,
argument by argument (the 1.3B GatedDeltaProduct takes beta and g in fp32 beside bf16
q, k, v; Mamba2 takes dt in fp32 and D in bf16; the benchmarks' differ). Fresh tensors are
16-byte aligned, as are the real ones: the launchers pass ``.contiguous()`` copies or new
buffers, and every parameter's element count is a multiple of 8 (so views into DeepSpeed's
flat bf16 buffer stay aligned too; an assumption, not checked here). Packed or not
(cu_seqlens) changes no key: offsets reach the kernels as pointers only. ``signature`` computes this key
from a call's arguments; ``tests/test_warm_kernels.py`` records the calls the 1.3B presets
and the small test models make and checks that every key is in ``CONFIGS``.
Not warmed: flash-linear-attention's kernels (comparators, autotuned), the ssd and scan
stages' variants (they call the Triton entry points with launch options) and the opt-in gdp_grid.

Progress: one line per configuration as it ends, then the wall time. A failing configuration
is reported (name, first line of the error) and the others go on; exit status 0 unless
every configuration failed (2 without a GPU, except for ``--list``).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BF, F32 = "bf16", "fp32"
TOKENS = 64  # tokens per tiny call: a multiple of 16, like every real B*T


@dataclass(frozen=True)
class Config:
    """One kernel configuration: the op, who needs it, and the parameters of its tiny call."""

    op: str
    uses: str
    p: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.op} " + " ".join(_fmt(k, v) for k, v in self.p.items())


def _fmt(k: str, v) -> str:
    if v is True:
        return f"+{k}"
    if v is False:
        return f"-{k}"
    return f"{k}={v}"


def C(op: str, uses: str, **p) -> Config:
    return Config(op, uses, p)


GDP, SSD, LR, CONV = "gated_delta_product", "ssd", "linear_recurrence", "causal_conv1d"
NORM, L2, ACT, RGLRU = "rms_norm", "l2_normalize", "gated_activation", "rg_lru_gates"
TRAIN = "train {} (also pytest test_memory_activations)"
MEMO = "pytest test_kernels_offsets_memo (fp32 small {})"
PARITY = "pytest test_evals_bench parity (fp32 gated_deltanet-tiny)"

# In priority order (what the earliest stages need first); run() starts the slow ops first.
CONFIGS: list[Config] = [
    # gdp: bench_gated_delta_product --target, everything bf16 (beta and g too), no state
    C(GDP, "gdp --target, gdp_more (ours)", H=16, K=128, n_h=2, dtype=BF),
    C(GDP, "gdp --target, gdp_more (ours)", H=16, K=128, n_h=1, dtype=BF),
    # pytest test_triton_gated_delta_product: fp32 initial state, final state in the loss
    *[C(GDP, "pytest test_gpu_bf16_tolerances", H=2, K=K, n_h=n, dtype=BF, h0=True, final=True)
      for n, K in ((1, 128), (2, 128), (3, 128), (2, 256))],
    C(GDP, "pytest test_gpu_extremes_finite", H=4, K=128, n_h=2, dtype=BF, h0=True, final=True),
    # the model computes beta and g in fp32
    C(GDP, TRAIN.format("gated_deltaproduct-1.3b"), H=16, K=128, n_h=2, dtype=BF, beta_g=F32),
    C(GDP, MEMO.format("gated_deltaproduct"), H=2, K=16, n_h=2, dtype=F32),
    C(GDP, PARITY, H=2, K=16, n_h=1, dtype=F32, gate=False),
    *[C(GDP, f"gdp_more --variants {v}", H=16, K=128, n_h=n, dtype=BF, variant=v)
      for v in ("onekernel", "w8", "half", "inv_tf32", "bv32", "half_dots", "half_dots+half") for n in (2, 1)],
    # pytest test_triton_ssd: check_bf16_kernel runs the kernel on all-bf16 then all-fp32 inputs
    *[C(SSD, "pytest test_triton_ssd", H=4, P=64, G=2, N=128, dtype=d, D=d, h0=d, neg=neg, final=True)
      for neg in (False, True) for d in (BF, F32)],
    C(SSD, TRAIN.format("mamba2-1.3b"), H=64, P=64, G=1, N=128, dtype=BF, dt=F32, A=F32, D=BF, save=64),
    C(SSD, "ssd bench", H=32, P=64, G=1, N=128, dtype=BF, A=F32, D=F32),
    C(SSD, MEMO.format("mamba2"), H=8, P=16, G=1, N=8, dtype=F32, D=F32, save=64),
    # the conv bench's D = 2560 shares Mamba2's key: both multiples of 16 with 64-channel blocks
    *[C(CONV, "pytest test_triton_causal_conv1d", D=512, W=4, act="silu", dtype=d, bias=d, state=d, final=True)
      for d in (BF, F32)],
    C(CONV, TRAIN.format("gated_deltaproduct-1.3b q/k/v"), D=2048, W=4, act="silu", dtype=BF),
    C(CONV, TRAIN.format("mamba2-1.3b") + "; conv bench", D=4352, W=4, act="silu", dtype=BF, bias=BF),
    C(CONV, TRAIN.format("griffin-1.3b"), D=2048, W=4, act=None, dtype=BF, bias=BF),
    C(CONV, MEMO.format("gated_deltaproduct q"), D=32, W=4, act="silu", dtype=F32),
    C(CONV, MEMO.format("gated_deltaproduct k/v"), D=64, W=4, act="silu", dtype=F32),
    C(CONV, MEMO.format("mamba2"), D=144, W=4, act="silu", dtype=F32, bias=F32),
    C(CONV, MEMO.format("griffin"), D=64, W=4, act=None, dtype=F32, bias=F32),
    *[C(LR, "pytest test_triton_linear_recurrence", D=512, n_seq=2, dtype=d, h0=d, final=True) for d in (BF, F32)],
    C(LR, TRAIN.format("griffin-1.3b") + "; " + MEMO.format("griffin"), D=2048, n_seq=2, dtype=F32),
    C(LR, "scan bench (8 sequences: 32-channel blocks)", D=2560, n_seq=8, dtype=BF),
    # the conv bench's gated norm over 2560 channels shares Mamba2's 4096 key (same row tiles)
    C(NORM, "pytest test_triton_rms_norm; " + TRAIN.format("block norms"), N=2048, dtype=BF),
    C(NORM, "pytest test_triton_rms_norm; " + TRAIN.format("gated_deltaproduct-1.3b o_norm"),
      N=128, gate=True, dtype=BF),
    C(NORM, "pytest test_triton_rms_norm (2 groups)", N=2048, G=2, gate=True, gate_first=True, dtype=BF),
    C(NORM, TRAIN.format("mamba2-1.3b") + "; conv bench", N=4096, gate=True, gate_first=True, dtype=BF),
    C(NORM, MEMO.format("block norms"), N=64, dtype=F32),
    C(NORM, MEMO.format("gated_deltaproduct o_norm"), N=16, gate=True, dtype=F32),
    C(NORM, MEMO.format("mamba2"), N=128, gate=True, gate_first=True, dtype=F32),
    C(NORM, PARITY, N=16, dtype=F32),
    C(NORM, PARITY, N=32, dtype=F32),
    C(L2, "pytest test_triton_l2_normalize; " + TRAIN.format("gated_deltaproduct-1.3b") + "; conv bench",
      N=128, dtype=BF),
    C(L2, "pytest test_triton_l2_normalize", N=256, dtype=BF),
    C(L2, MEMO.format("gated_deltaproduct") + "; " + PARITY, N=16, dtype=F32),
    *[C(ACT, f"pytest test_triton_gated_activation; {u}", kind=k, dtype=BF)
      for k, u in (("silu", TRAIN.format("gated_deltaproduct-1.3b") + "; conv bench"),
                   ("gelu", TRAIN.format("griffin-1.3b")))],
    C(ACT, MEMO.format("gated_deltaproduct"), kind="silu", dtype=F32),
    C(ACT, MEMO.format("griffin"), kind="gelu", dtype=F32),
    C(RGLRU, "pytest test_triton_rg_lru_gates; conv bench", W=2048, dtype=BF, a=F32),
    C(RGLRU, TRAIN.format("griffin-1.3b"), W=2048, dtype=BF, a=BF),
    C(RGLRU, MEMO.format("griffin"), W=64, dtype=F32, a=F32),
]

SLOW_FIRST = {GDP: 0, SSD: 1}  # compile cost rank: longest first keeps the pool's tail short


# ---------------------------------------------------------------- tiny calls


def _dtype(name: str | None):
    import torch

    return None if name is None else {BF: torch.bfloat16, F32: torch.float32}[name]


def _build_gdp(p: dict, dev) -> tuple[list, dict]:
    import torch

    H, K, n = p["H"], p["K"], p["n_h"]
    V, dt = p.get("V", K), _dtype(p["dtype"])
    bg = _dtype(p.get("beta_g", p["dtype"]))
    nrm = torch.nn.functional.normalize
    args = [nrm(torch.randn(1, TOKENS, H, K, device=dev), dim=-1).to(dt),
            nrm(torch.randn(1, TOKENS, n, H, K, device=dev), dim=-1).to(dt),
            torch.randn(1, TOKENS, n, H, V, device=dev).to(dt),
            torch.rand(1, TOKENS, n, H, device=dev).to(bg),
            (-0.5 * torch.rand(1, TOKENS, H, device=dev)).to(bg) if p.get("gate", True) else None]
    h0 = torch.randn(1, H, K, V, device=dev) if p.get("h0") else None
    return args, dict(initial_state=h0, output_final_state=p.get("final", False))


def _build_ssd(p: dict, dev) -> tuple[list, dict]:
    import torch

    H, P, G, N = p["H"], p["P"], p["G"], p["N"]
    dt = _dtype(p["dtype"])
    args = [torch.randn(1, TOKENS, H, P, device=dev).to(dt),
            (torch.rand(1, TOKENS, H, device=dev) * 0.1 + 0.01).to(_dtype(p.get("dt", p["dtype"]))),
            (-torch.rand(H, device=dev) - 0.5).to(_dtype(p.get("A", p["dtype"]))),
            torch.randn(1, TOKENS, G, N, device=dev).to(dt), torch.randn(1, TOKENS, G, N, device=dev).to(dt)]
    D = torch.randn(H, device=dev).to(_dtype(p["D"])) if p.get("D") else None
    h0 = torch.randn(1, H, P, N, device=dev).to(_dtype(p["h0"])) if p.get("h0") else None
    return args, dict(D=D, allow_neg_eigval=p.get("neg", False), initial_state=h0,
                      output_final_state=p.get("final", False), save_state_every=p.get("save"))


def _build_lr(p: dict, dev) -> tuple[list, dict]:
    import torch

    n, D, dt = p["n_seq"], p["D"], _dtype(p["dtype"])  # one sequence per row: n_seq rows
    T = TOKENS // 2  # n_seq * T tokens: a multiple of 16 for the n_seq used
    args = [torch.randn(n, T, D, device=dev).to(dt), (torch.rand(n, T, D, device=dev) * 0.5 + 0.5).to(dt)]
    h0 = torch.randn(n, D, device=dev).to(_dtype(p["h0"])) if p.get("h0") else None
    return args, dict(initial_state=h0, output_final_state=p.get("final", False))


def _build_conv(p: dict, dev) -> tuple[list, dict]:
    import torch

    D, W, dt = p["D"], p["W"], _dtype(p["dtype"])
    args = [torch.randn(1, TOKENS, D, device=dev).to(dt), torch.randn(D, W, device=dev).to(dt),
            torch.randn(D, device=dev).to(_dtype(p["bias"])) if p.get("bias") else None]
    state = torch.randn(1, D, W - 1, device=dev).to(_dtype(p["state"])) if p.get("state") else None
    return args, dict(activation=p.get("act"), initial_state=state, output_final_state=p.get("final", False))


def _build_norm(p: dict, dev) -> tuple[list, dict]:
    import torch

    N, G, dt = p["N"], p.get("G", 1), _dtype(p["dtype"])
    x = torch.randn(TOKENS, G * N, device=dev).to(dt)
    gate = torch.randn(TOKENS, G * N, device=dev).to(dt) if p.get("gate") else None
    return [x, (torch.rand(G * N, device=dev) + 0.5).to(dt), 1e-6], dict(
        gate=gate, group=N, gate_first=p.get("gate_first", False))


def _build_l2(p: dict, dev) -> tuple[list, dict]:
    import torch

    return [torch.randn(TOKENS, p["N"], device=dev).to(_dtype(p["dtype"])), 1e-6], {}


def _build_act(p: dict, dev) -> tuple[list, dict]:
    import torch

    dt = _dtype(p["dtype"])
    return [torch.randn(TOKENS, 16, device=dev).to(dt), torch.randn(TOKENS, 16, device=dev).to(dt), p["kind"]], {}


def _build_rglru(p: dict, dev) -> tuple[list, dict]:
    import torch

    M, W, dt = 256, p["W"], _dtype(p["dtype"])  # 256 rows: MAX_ROWS rows per program, as real counts give
    reset = torch.zeros(M, 1, dtype=torch.bool, device=dev)
    args = [torch.randn(M, W, device=dev).to(dt) for _ in range(3)]
    return [*args, torch.full((W,), -6.0, device=dev).to(_dtype(p["a"])), reset], {}


BUILD: dict[str, Callable[[dict, object], tuple[list, dict]]] = {
    GDP: _build_gdp, SSD: _build_ssd, LR: _build_lr, CONV: _build_conv, NORM: _build_norm, L2: _build_l2,
    ACT: _build_act, RGLRU: _build_rglru}


def build(cfg: Config, device) -> tuple[list, dict]:
    """The op's arguments for ``cfg``'s tiny call, floating tensors as leaves needing grads."""
    args, kw = BUILD[cfg.op](cfg.p, device)
    for t in [*args, *kw.values()]:
        if getattr(t, "is_floating_point", lambda: False)():
            t.requires_grad_()
    return args, kw


def variant(cfg: Config) -> contextlib.AbstractContextManager:
    """bench_gated_delta_product's launch variant (module setting) for a gdp_more config."""
    if not cfg.p.get("variant"):
        return contextlib.nullcontext()
    from bench.bench_gated_delta_product import launch_variant

    return launch_variant(f"ours_{cfg.p['variant']}")


def call_once(cfg: Config, device, backend: str = "triton") -> None:
    """cfg's tiny call through ``kernels`` on ``device``, forward then backward through every
    output (the final state too: its gradient is a kernel argument)."""
    import torch

    import kernels

    args, kw = build(cfg, device)
    with variant(cfg):
        out = getattr(kernels, cfg.op)(*args, backend=backend, **kw)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def run_config(cfg: Config) -> float:
    """One forward+backward of ``cfg`` on the GPU (compiling its kernels); seconds taken."""
    import torch

    t0 = time.perf_counter()
    call_once(cfg, "cuda")
    torch.cuda.synchronize()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- cache keys


def spec(v: int) -> str:
    """Triton's specialisation of a plain int argument: 1 is a constant, a multiple of 16 gets
    a divisibility hint, and the type is i32 or i64 by range."""
    if v == 1:
        return "=1"
    return ("i32" if -2**31 <= v < 2**31 else "i64") + ("/16" if v % 16 == 0 else "")


def _dt(t) -> str | None:
    return None if t is None else str(t.dtype).removeprefix("torch.")


def _sig_gdp(q, k, v, beta, g=None, *, initial_state=None, output_final_state=False, **_):
    from kernels.triton import gated_delta_product as m  # the initial state is read as fp32 copy

    K, V = q.shape[-1], v.shape[-1]
    return (q.shape[2], K, V, k.shape[2], m._blocks(K, V), _dt(q), _dt(k), _dt(v), _dt(beta), _dt(g),
            initial_state is not None, output_final_state, m.HALF_INTERMEDIATES, m.GRAD_SPLIT_ABOVE_BK,
            m.EIGHT_WARPS_FROM_BK, m.HALF_INVERSE_PRECISION, m.HALF_DOT_OPERANDS)


def _sig_ssd(x, dt, A, B, C, *, D=None, allow_neg_eigval=False, initial_state=None, output_final_state=False,
             save_state_every=None, **_):
    import triton

    from kernels.triton import ssd as m

    (H, P), (G, N) = x.shape[2:], B.shape[2:]
    BP, BN = max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))
    return (*map(spec, (H, P, G, N, H // G)), BP, BN, m._chunking(BP, BN, None, save_state_every), _dt(x), _dt(dt),
            _dt(A), _dt(B), _dt(C), _dt(D), _dt(initial_state), bool(allow_neg_eigval), output_final_state)


def _sig_lr(x, a, *, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
    from kernels.triton import linear_recurrence as m

    n = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    D = x.shape[-1]
    return spec(D), m._blocks(n, D, None), _dt(x), _dt(a), _dt(initial_state), output_final_state


def _sig_conv(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False, **_):
    from kernels.triton import causal_conv1d as m

    D = x.shape[-1]
    return (spec(x.numel() // D), spec(D), m._blocks(D, None), weight.shape[1], activation, _dt(x), _dt(weight),
            _dt(bias), _dt(initial_state), output_final_state)


def _sig_norm(x, weight, eps=1e-6, *, gate=None, group=None, gate_first=False, **_):
    from kernels.triton import rms_norm as m

    D = x.shape[-1]
    N = group or D
    return (spec(x.numel() // D), spec(D // N), spec(N), m.row_tiles(N), gate is not None, gate_first, _dt(x),
            _dt(gate), _dt(weight))


def _sig_l2(x, eps=1e-6, **_):
    from kernels.triton import rms_norm as m  # l2_normalize takes its row tiles from rms_norm

    N = x.shape[-1]
    return spec(x.numel() // N), spec(N), m.row_tiles(N), _dt(x)


def _sig_act(gate, up, kind="silu", **_):
    return spec(gate.numel()), kind, _dt(gate), _dt(up)


def _sig_rglru(x, gx_logits, ga_logits, a_param, reset, **_):
    from kernels.triton import rg_lru_gates as m

    W = x.shape[-1]
    M = x.numel() // W
    return spec(M), spec(W), m._launch(M, W)[1], _dt(x), _dt(gx_logits), _dt(ga_logits), _dt(a_param)


SIGNATURE: dict[str, Callable] = {GDP: _sig_gdp, SSD: _sig_ssd, LR: _sig_lr, CONV: _sig_conv, NORM: _sig_norm,
                                  L2: _sig_l2, ACT: _sig_act, RGLRU: _sig_rglru}


def signature(op: str, args, kwargs) -> tuple:
    """What of a ``kernels.<op>(*args, **kwargs)`` call enters its kernels' cache keys (within
    the op): constexpr-deciding sizes, int specialisations, dtypes, flags, module settings."""
    return (op, *SIGNATURE[op](*args, **kwargs))


def config_signature(cfg: Config) -> tuple:
    """``signature`` of cfg's tiny call, built on the meta device (no GPU, no data)."""
    args, kw = build(cfg, "meta")
    with variant(cfg):
        return signature(cfg.op, args, kw)


# ---------------------------------------------------------------- the pool

Result = tuple[Config, float | None, str | None]  # (config, seconds or None, error or None)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_pool(configs: list[Config], fn: Callable[[Config], float], workers: int, *, context: str = "spawn",
             log: Callable[[str], None] = print) -> list[Result]:
    """``fn(config)`` for every config on a pool of ``workers`` processes, one line per config as
    it ends; a config that raises (or whose worker dies) is reported and the others go on."""
    start, n, results = time.perf_counter(), len(configs), []
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(context))
    futures = {pool.submit(fn, c): c for c in configs}
    try:
        for i, fut in enumerate(as_completed(futures), 1):
            cfg = futures[fut]
            try:
                secs, err = fut.result(), None
            except Exception as exc:  # noqa: BLE001 - one config's failure must not stop the rest
                secs, err = None, first_line(exc)
            results.append((cfg, secs, err))
            what = f"ok {secs:6.1f}s" if err is None else "FAILED"
            log(f"[{i:3d}/{n} {time.perf_counter() - start:6.1f}s] {what}  {cfg.name}"
                + (f": {err}" if err else ""))
    except KeyboardInterrupt:  # the stage's cap: what finished is in the cache already
        log(f"interrupted after {time.perf_counter() - start:.1f}s: {n - len(results)} configurations not done")
        # workers outlive a SIGINT (they catch it per call, then take the next queued call) and
        # exit would wait for them: stop them (no public way before Python 3.14's terminate_workers)
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
    finally:  # drop the queued configs and leave at once
        pool.shutdown(wait=False, cancel_futures=True)
    return results


def exit_status(results: list[Result]) -> int:
    """0 unless every config failed (a partly warm cache still saves the later stages time)."""
    return 1 if results and all(err is not None for _, _, err in results) else 0


def select(configs: list[Config], only: list[str] | None) -> list[Config]:
    """Configs whose name or uses contains any of ``only`` (case-insensitive); all without."""
    if not only:
        return list(configs)
    return [c for c in configs if any(s.lower() in f"{c.name} {c.uses}".lower() for s in only)]


def cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")


def default_workers(n: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, cpus - 2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print the configurations and exit (no GPU needed)")
    p.add_argument("--keys", action="store_true", help="with --list: also each one's cache-relevant key")
    p.add_argument("--only", action="append", metavar="SUBSTR",
                   help="only configurations whose name or uses contain SUBSTR (repeatable: any)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPUs - 2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    configs = select(CONFIGS, a.only)
    if a.list:
        for i, c in enumerate(configs, 1):
            print(f"{i:3d} {c.name}  <- {c.uses}" + (f"\n      key {config_signature(c)}" if a.keys else ""))
        print(f"{len(configs)} of {len(CONFIGS)} configurations")
        return 0
    if not configs:
        print(f"warm_kernels: no configuration matches --only {a.only} (see --list)", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("warm_kernels: needs a CUDA GPU to compile for (torch.cuda.is_available() is False); "
              "--list works without one", file=sys.stderr)
        return 2
    workers = a.workers or default_workers(len(configs))
    ordered = sorted(configs, key=lambda c: SLOW_FIRST.get(c.op, 2))
    print(f"warm_kernels: {len(configs)} configurations on {workers} processes into {cache_dir()}", flush=True)
    start = time.perf_counter()
    results = run_pool(ordered, run_config, workers, log=lambda s: print(s, flush=True))
    failed = [c.name for c, _, err in results if err is not None]
    print(f"warm_kernels: {len(results) - len(failed)} of {len(configs)} configurations compiled, "
          f"{len(failed)} failed, wall {time.perf_counter() - start:.1f} s", flush=True)
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
