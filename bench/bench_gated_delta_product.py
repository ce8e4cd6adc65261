"""GPU benchmark of the Triton Gated DeltaProduct kernels.

For each grid point (B*T tokens, H, K = V, n_h) prints forward and forward+backward time,
achieved TFLOP/s and peak memory of: our Triton kernels, the torch chunked path of
``kernels`` (optional, slow) and, when ``fla`` (the fla-core wheel) is importable,
flash-linear-attention's ``chunk_gated_delta_product`` (and ``chunk_gated_delta_rule``
for n_h = 1) through ``bench/fla_adapters.py``, with time ratios comparator / ours (> 1
means we are faster). ``--variants`` also times launch choices of ours that only a GPU can
weigh, each a module setting of ``kernels.triton.gated_delta_product`` held while its row
(``ours_<variant>``) is measured: ``onekernel`` takes the one-kernel chunk gradient up to
K = 128 (``GRAD_SPLIT_ABOVE_BK = 128``, the former default; by default K > 64 takes the
K-split pair, which compiles with 0-48 B/thread of spills at K = 128 where the one kernel
spills 5.7 KB), ``w8`` runs every [64, K]-tile kernel in 8 warps (by default only at
K = 256; 8 warps cut the K = 128 prep and dh spills in the sm_90 compile check; the K-split
gradient pair keeps its own launch settings), ``half`` stores the
recomputed intermediates in the input dtype instead of fp32 (``HALF_INTERMEDIATES``: about
half the transient memory, the issue's peak-memory target), ``inv_tf32`` computes the
chunk's triangular inverse in plain tf32 instead of tf32x3 for half inputs
(``HALF_INVERSE_PRECISION``: fewer prep spills, W less accurate with beta near 2; read
its accuracy columns), ``bv32`` gives the state-sized kernels (state, output, dd_local, dh)
32-wide V blocks instead of 64 at K <= 128 (``STATE_BV``: smaller tiles, twice the programs),
``save_wy`` keeps the forward's W, U and (I + A)^-1 for the backward, which then skips its
prep kernel (``SAVE_WY``: more activation memory, bitwise the same results), ``half_dots``
rounds the dots' operands to the input dtype (bf16 tensor-core dots instead of tf32, as fla
does; ``HALF_DOT_OPERANDS``: read its accuracy columns too). Variants joined by ``+`` (e.g.
``half_dots+half+save_wy``) are timed together, as one row.

Each implementation also runs once more, with a fixed random output gradient, for its
accuracy: the relative RMSE of o, dq, dk, dv, dbeta and dg against an fp32 reference on
the same (rounded) inputs, the torch chunked path run in fp32 with TF32 off (ours in fp32
would first compile its fp32 FMA kernels, minutes at K = 128). The issue's bf16 limits are
5e-3 (o), 1e-2 (dq, dk, dv), 2e-2 (dbeta, dg).

TFLOP/s counts the chunked algorithm's matmuls, with chunks of C = 64 sub-step rows (n_h per
token): per row KK^T, W and U (2C(2K+V)) and the state pass (4KV); per token, once, the
output (2KV + 2C(K+V)); forward+backward is counted as 3x forward.

Order (a session may be cut short): the points as given (``--target``: n_h = 2, the 1.3B
recipe's, before n_h = 1), and at each point ours, then fla, then the variants, then the
torch path; ``--results`` gets each point's rows as soon as they are measured. Every row
also says how long its first call took (compiling the kernels: what sizes a GPU session). Needs only torch and triton to import;
``--results FILE`` appends a Markdown table with the GPU name.

``--profile`` then runs a few warm fwd+bwd of ours at each point under torch.profiler and
adds a table of where the time goes, per kernel (``bench/kernel_profile.py``). fla's guard
against Triton 3.4-3.7.0 on Hopper is bypassed to time fla anyway, its rows marked
(``bench/fla_guard.py``; ``--fla-respect-triton-guard`` to keep it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Iterator
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import fla_guard  # noqa: E402 - after the path insert, for ``python bench/...``
from bench.kernel_profile import profile_lines  # noqa: E402

Row = dict
CHUNK = 64


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# variant -> (module attribute of kernels.triton.gated_delta_product, value while it is timed);
# the launchers read each at call time
VARIANTS = {"onekernel": ("GRAD_SPLIT_ABOVE_BK", 128), "w8": ("EIGHT_WARPS_FROM_BK", 0),
            "half": ("HALF_INTERMEDIATES", True), "inv_tf32": ("HALF_INVERSE_PRECISION", "tf32"),
            "bv32": ("STATE_BV", 32), "save_wy": ("SAVE_WY", True),
            "half_dots": ("HALF_DOT_OPERANDS", True)}
# Output and gradients whose accuracy is reported, and the bf16 limits (relative RMSE).
ERR_LIMITS = {"o": 5e-3, "q": 1e-2, "k": 1e-2, "v": 1e-2, "beta": 2e-2, "g": 2e-2}


def variant_names(s: str) -> list[str]:
    """Comma-separated variants; ``a+b`` is one variant with the settings of both."""
    names = [x for x in s.split(",") if x]
    parts = [p for name in names for p in name.split("+")]
    bad = sorted(set(parts) - set(VARIANTS))
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)} "
                                         "(or several joined by +)")
    for name in names:
        attrs = [VARIANTS[p][0] for p in name.split("+")]
        if len(set(attrs)) != len(attrs):
            raise argparse.ArgumentTypeError(f"variant {name!r} sets one module setting twice")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=ints, default=[16384, 32768, 65536], help="B*T values")
    p.add_argument("--seqlen", type=int, default=4096, help="T (B = tokens // T)")
    p.add_argument("--heads", type=ints, default=[8, 16])
    p.add_argument("--headdim", type=ints, default=[64, 128, 256], help="K = V values")
    p.add_argument("--nh", type=ints, default=[1, 2, 3], help="Householder steps per token")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--torch", action="store_true", help="also time the (slow) torch chunked path")
    p.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    p.add_argument("--variants", type=variant_names, default=[],
                   help=f"also time these variants of ours, comma-separated: {', '.join(VARIANTS)}; "
                        "a+b: both settings at once, one row")
    p.add_argument("--target", action="store_true",
                   help="only the issue's target point: B=4 T=4096 H=16 K=V=128 n_h in {1,2}")
    p.add_argument("--results", default=None, help="append a Markdown table to this file")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile a few warm fwd+bwd of ours per point: time per kernel")
    fla_guard.add_option(p)
    a = p.parse_args(argv)
    if a.target:
        a.tokens, a.seqlen, a.heads, a.headdim, a.nh = [16384], 4096, [16], [128], [2, 1]
    return a


def flops_fwd(B: int, T: int, H: int, K: int, V: int, n_h: int) -> float:
    tokens = B * H * T
    per_row = 2 * CHUNK * (2 * K + V) + 4 * K * V  # n_h sub-step rows per token
    per_token = 2 * K * V + 2 * CHUNK * (K + V)  # the output: one query per token
    return float(tokens * (n_h * per_row + per_token))


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the GPU."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak allocated memory during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_inputs(B: int, T: int, H: int, K: int, V: int, n_h: int, dtype: torch.dtype) -> dict:
    dev = "cuda"
    nrm = torch.nn.functional.normalize
    return dict(
        q=nrm(torch.randn(B, T, H, K, device=dev), dim=-1).to(dtype).requires_grad_(),
        k=nrm(torch.randn(B, T, n_h, H, K, device=dev), dim=-1).to(dtype).requires_grad_(),
        v=torch.randn(B, T, n_h, H, V, device=dev, dtype=dtype).requires_grad_(),
        beta=torch.rand(B, T, n_h, H, device=dev).mul(2).to(dtype).requires_grad_(),
        g=torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev) + 3).to(dtype).requires_grad_(),
    )


def impls(x: dict, n_h: int, use_torch: bool, use_fla: bool,
          variants: list[str] = ()) -> dict[str, Callable[[], torch.Tensor]]:
    import kernels

    q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["g"]
    K = q.shape[-1]
    out: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: kernels.gated_delta_product(q, k, v, beta, g, backend="triton")[0]}
    if use_fla:
        from bench.fla_adapters import load_fla_kernel

        scale = K**-0.5
        for name, kernel in (("fla_gdp", "fla"), ("fla_gdn", "fla_gdn")):
            if kernel == "fla_gdn" and n_h != 1:
                continue  # fla's gated delta rule is the n_h = 1 case only
            try:
                fn = load_fla_kernel(kernel)
            except Exception as exc:  # fla is optional, for the comparison only
                print(f"  {name} unavailable: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            out[name] = lambda fn=fn: fn(q, k, v, beta, g, scale=scale)[0]
    for name in variants:  # after the comparison: a variant that faults cannot cost it
        out[f"ours_{name}"] = out["ours"]  # the same call, timed under launch_variant(...)
    if use_torch:
        out["torch"] = lambda: kernels.gated_delta_product(q, k, v, beta, g, backend="torch")[0]
    return out


@contextlib.contextmanager
def launch_variant(impl: str) -> Iterator[None]:
    """While ``ours_<variant>`` is timed, its module settings of VARIANTS hold (then restored);
    ``ours_a+b`` holds those of ``a`` and ``b``."""
    parts = impl.removeprefix("ours_").split("+")
    with contextlib.ExitStack() as stack:
        if impl.startswith("ours_") and set(parts) <= set(VARIANTS):
            for attr, value in (VARIANTS[p] for p in parts):
                stack.enter_context(mock.patch(f"kernels.triton.gated_delta_product.{attr}", value))
        yield


def output_and_grads(fwd: Callable[[], torch.Tensor], x: dict[str, torch.Tensor],
                     do: torch.Tensor) -> dict[str, torch.Tensor]:
    """fwd()'s output and the gradients of the inputs in ERR_LIMITS for output gradient
    ``do``, as fp32 copies (the inputs' .grad is left cleared)."""
    for t in x.values():
        t.grad = None
    o = fwd()
    o.backward(do.to(o.dtype))
    out = {"o": o.detach().float()}
    out.update({n: x[n].grad.float() for n in ERR_LIMITS if n in x})
    for t in x.values():
        t.grad = None
    return out


def rel_rmse(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def fp32_reference(x: dict[str, torch.Tensor], do: torch.Tensor) -> dict[str, torch.Tensor]:
    """The torch chunked path on fp32 copies of the inputs (the same values), TF32 off."""
    import kernels

    x32 = {n: t.detach().float().requires_grad_() for n, t in x.items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return output_and_grads(lambda: kernels.gated_delta_product(
            x32["q"], x32["k"], x32["v"], x32["beta"], x32["g"], backend="torch")[0], x32, do)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def accuracy(fwd: Callable[[], torch.Tensor], x: dict[str, torch.Tensor], do: torch.Tensor,
             ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative RMSE of fwd's output and gradients against the fp32 reference ``ref``."""
    got = output_and_grads(fwd, x, do)
    return {n: rel_rmse(got[n], ref[n]) for n in ref}


def err_label(name: str) -> str:
    return name if name == "o" else f"d{name}"


def format_error(name: str, err: float) -> str:
    """``1.2e-03``, with a ``!`` when over the issue's bf16 limit."""
    return f"{err:.1e}{'!' if not err <= ERR_LIMITS[name] else ''}"


def format_errors(err: dict[str, float]) -> str:
    """``o 1.2e-03 dq 3.4e-03 ... dg 2.5e-02!``."""
    return " ".join(f"{err_label(n)} {format_error(n, e)}" for n, e in err.items())


def fwd_bwd_step(fwd: Callable[[], torch.Tensor], x: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One timed fwd+bwd: the inputs' gradients cleared, fwd, backward of a ones gradient."""
    leaves = list(x.values())

    def step():
        for t in leaves:
            t.grad = None
        o = fwd()
        o.backward(torch.ones_like(o))
    return step


def measure(name: str, fwd: Callable[[], torch.Tensor], x: dict[str, torch.Tensor],
            check: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None) -> Row | None:
    """Times and peak memory of fwd and fwd+bwd; with ``check`` = (do, reference), also the
    relative RMSE of the output and gradients (row key ``err``)."""
    step = fwd_bwd_step(fwd, x)
    try:
        first = time.perf_counter()
        step()  # the first call compiles (or autotunes): timed on its own
        torch.cuda.synchronize()
        first = time.perf_counter() - first
        with torch.no_grad():
            t_f = bench(fwd)
        row = dict(impl=name, fwd=t_f, fwdbwd=bench(step), mem=peak_mib(step), first_s=first)
    except Exception as exc:  # a comparator that fails is reported, not fatal
        print(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    if check is not None:
        try:
            row["err"] = accuracy(fwd, x, *check)
        except Exception as exc:  # the timings stand without it
            print(f"  {name}: accuracy run failed ({type(exc).__name__}: {str(exc)[:120]})")
    return row


def reference_check(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """(do, fp32 reference) for ``measure``'s accuracy run, or None when the reference fails
    (reported; the timings still run). do is rounded to the inputs' dtype, so every
    implementation and the reference see the same values."""
    q = x["q"]
    gen = torch.Generator(device=q.device).manual_seed(1)
    do = torch.randn(q.shape[:-1] + x["v"].shape[-1:], generator=gen, device=q.device).to(q.dtype).float()
    try:
        return do, fp32_reference(x, do)
    except Exception as exc:  # e.g. out of memory: accuracy is extra, the timings are not
        print(f"  fp32 reference failed, no accuracy columns ({type(exc).__name__}: {str(exc)[:120]})")
        return None


def main(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gated_delta_product needs a CUDA GPU")
    dtype = getattr(torch, a.dtype)
    gpu = torch.cuda.get_device_name()
    fla_note = None if a.no_fla else fla_guard.bypass_fla_triton_guard(a.fla_respect_triton_guard)
    rows: list[Row] = []
    for tokens in a.tokens:
        B, T = max(1, tokens // a.seqlen), min(a.seqlen, tokens)
        for H in a.heads:
            for D in a.headdim:
                for n_h in a.nh:
                    torch.manual_seed(0)
                    x = make_inputs(B, T, H, D, D, n_h, dtype)
                    fl = flops_fwd(B, T, H, D, D, n_h)
                    print(f"B={B} T={T} H={H} K=V={D} n_h={n_h} {a.dtype} on {gpu}")
                    check = reference_check(x)
                    fns = impls(x, n_h, a.torch, not a.no_fla, a.variants)
                    ours = None
                    point: list[Row] = []
                    header = not rows or a.profile
                    # each row reaches the results as soon as it is measured, ours (and its
                    # profile) first: a stage cap during a comparator's compile keeps them
                    for name, fn in fns.items():
                        with launch_variant(name):
                            r = measure(name, fn, x, check)
                        if r is None:
                            continue
                        r.update(B=B, T=T, H=H, D=D, n_h=n_h, tflops_fwd=fl / r["fwd"] / 1e9,
                                 tflops_fwdbwd=3 * fl / r["fwdbwd"] / 1e9)
                        ratio = ""
                        if name == "ours":
                            ours = r
                        elif ours is not None:
                            r["ratio_fwd"] = r["fwd"] / ours["fwd"]
                            r["ratio_fwdbwd"] = r["fwdbwd"] / ours["fwdbwd"]
                            ratio = f"  {name}/ours: fwd {r['ratio_fwd']:.2f}x fwd+bwd {r['ratio_fwdbwd']:.2f}x"
                        print(f"  {name:8s} fwd {r['fwd']:8.3f} ms ({r['tflops_fwd']:6.1f} TFLOP/s)  "
                              f"fwd+bwd {r['fwdbwd']:8.3f} ms ({r['tflops_fwdbwd']:6.1f} TFLOP/s)  "
                              f"peak {r['mem']:8.1f} MiB  first call {r['first_s']:.1f} s{ratio}", flush=True)
                        if "err" in r:
                            flag = f" {fla_guard.FLAG}" if fla_note and name.startswith("fla") else ""
                            print(f"  {'':8s} rel RMSE vs fp32: {format_errors(r['err'])}{flag}", flush=True)
                        point.append(r)
                        if a.results:
                            write_results(a.results, [r], gpu, a.dtype, header=header, fla_note=fla_note)
                            header = False
                        if name == "ours" and a.profile:  # after its timing: compiled already
                            prof = profile_lines(fwd_bwd_step(fn, x),
                                                 f"ours at B={B} T={T} H={H} K=V={D} n_h={n_h} {a.dtype}")
                            if a.results and prof:  # the table after it starts with a header
                                with open(a.results, "a") as f:
                                    f.write("\n".join(prof) + "\n")
                                header = True
                    rows += point
                    del x, check, fns
                    torch.cuda.empty_cache()
    return rows


def write_results(path: str, rows: list[Row], gpu: str, dtype: str, header: bool = True,
                  fla_note: str | None = None) -> None:
    """Append ``rows`` (one grid point's, as they come) to the Markdown table, its header first.
    With ``fla_note`` (fla's Triton guard bypassed) fla's rows are flagged and the header says why."""
    names = " | ".join(f"rmse {err_label(n)}" for n in ERR_LIMITS)
    lines = [f"\n## gated_delta_product on {gpu} ({dtype})\n",
             "Relative RMSE against the fp32 torch chunked path (limits: o 5e-3, dq dk dv 1e-2, "
             "dbeta dg 2e-2; `!` marks a value over its limit); first s: the first call (compiling).\n",
             *([f"{fla_note}\n"] if fla_note else []),
             "| B | T | H | K=V | n_h | impl | fwd ms | fwd+bwd ms | TFLOP/s fwd+bwd | peak MiB | first s | "
             f"comparator/ours fwd+bwd | {names} |",
             "|---" * (12 + len(ERR_LIMITS)) + "|"] if header else []
    for r in rows:
        ratio = f"{r['ratio_fwdbwd']:.2f}" if "ratio_fwdbwd" in r else ""
        err = r.get("err", {})
        errs = " | ".join(format_error(n, err[n]) if n in err else "" for n in ERR_LIMITS)
        impl = f"{r['impl']} {fla_guard.FLAG}" if fla_note and r["impl"].startswith("fla") else r["impl"]
        lines.append(f"| {r['B']} | {r['T']} | {r['H']} | {r['D']} | {r['n_h']} | {impl} | "
                     f"{r['fwd']:.3f} | {r['fwdbwd']:.3f} | {r['tflops_fwdbwd']:.1f} | {r['mem']:.0f} | "
                     f"{r.get('first_s', float('nan')):.1f} | {ratio} | "
                     f"{errs} |")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
