"""End-to-end training throughput through the real DeepSpeed engine, one process.

    python -m bench.bench_train [--presets gated_deltaproduct-1.3b mamba2-1.3b griffin-1.3b]
                                [--seq-len 4096] [--micro-batch 1] [--steps 30] [--warmup 5]
                                [--zero 1] [--precision bf16] [--activation-checkpointing]
                                [--gdp-kernel {ours,fla,fla_gdn,both} ...] [--results FILE]

Trains each preset on synthetic packed batches (random tokens, 2-3 documents per row, so
the varlen paths run) with the same engine, optimizer and precision as ``linrnn-train``,
and prints tokens/s per GPU, MFU by the per-mixer FLOP count of ``pretrain.flops``, peak
memory and the memory plan's estimate for the same layout (``pretrain.memory``), after ``--warmup`` untimed steps (Triton autotuning, allocator warm-up). On a
CPU it runs too (use a ``-tiny`` preset); MFU is then not reported (no peak to compare).

GatedDeltaProduct presets can also run with flash-linear-attention's kernel in place of
ours (``bench/fla_adapters.py``; fla is installed for the comparison only): ``fla`` is
``chunk_gated_delta_product``, ``fla_gdn`` is ``chunk_gated_delta_rule`` (n_h = 1 presets
only). Only the kernel changes: same model, parameters, projections and FLOP count, so the
tokens/s ratio ours/fla isolates the kernel. ``both`` is ours and fla, plus fla_gdn on
n_h = 1 presets; it is the default where fla imports and runs (CUDA, bf16), else ours with
a printed note. Other presets run ours only. Each run prints one JSON line as it ends; a
table of all runs ends the output (also when interrupted), and ``--results`` appends it to
a Markdown file. Where fla's guard against Triton 3.4-3.7.0 on Hopper would refuse its
backward, it is bypassed to time fla anyway and fla's rows are marked (``bench/fla_guard.py``;
``--fla-respect-triton-guard`` keeps the guard).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
import time

from bench import fla_guard

KERNELS = ("ours", "fla", "fla_gdn")
DEFAULT_PRESETS = ["gated_deltaproduct-1.3b", "mamba2-1.3b", "griffin-1.3b"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--gdp-kernel", nargs="+", default=None, choices=[*KERNELS, "both"],
                   help="GatedDeltaProduct kernel(s) to run: ours, fla (fla's chunk_gated_delta_product), "
                        "fla_gdn (fla's chunk_gated_delta_rule, n_h = 1 presets), both (ours and fla, plus "
                        "fla_gdn for n_h = 1). Default: both where fla runs, else ours")
    p.add_argument("--results", default=None, help="append the table as Markdown to this file")
    fla_guard.add_option(p)
    return p.parse_args(argv)


def fla_unavailable(precision: str) -> str | None:
    """None when fla's kernels can run in this process, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "fla's kernels are Triton-only and need a CUDA GPU"
    if precision != "bf16":
        return "fla's chunk_gated_delta_product does not take float32 inputs: use --precision bf16"
    from bench.fla_adapters import fla_import_error

    err = fla_import_error()
    return None if err is None else f"fla does not import ({err}): install the fla-core wheel"


def resolve_gdp_kernels(requested: list[str] | None, unavailable: str | None) -> tuple[list[str], bool]:
    """The kernels to run on GatedDeltaProduct presets, and whether fla_gdn was asked for by name."""
    if requested is None:
        if unavailable is not None:
            print(f"note: fla unavailable, --gdp-kernel runs ours only: {unavailable}", flush=True)
            return ["ours"], False
        requested = ["both"]
    kernels: list[str] = []
    for name in requested:
        for k in (["ours", "fla", "fla_gdn"] if name == "both" else [name]):
            if k not in kernels:
                kernels.append(k)
    named = [k for k in requested if k != "ours"]
    if named and unavailable is not None:
        raise SystemExit(f"--gdp-kernel {' '.join(named)}: {unavailable} (or use --gdp-kernel ours)")
    return kernels, "fla_gdn" in requested


def plan_runs(presets: list[str], kernels: list[str], gdn_named: bool) -> list[tuple[str, str]]:
    """(preset, kernel) pairs in order: a GatedDeltaProduct preset's kernels one after another."""
    from pretrain.config_loader import load_model_config

    runs: list[tuple[str, str]] = []
    for preset in presets:
        model = load_model_config(preset)
        if "gated_deltaproduct" not in model.layer_types():
            runs.append((preset, "ours"))
            continue
        n_h = model.deltaproduct.num_householder
        if gdn_named and n_h != 1:
            raise SystemExit(f"--gdp-kernel fla_gdn: preset {preset} has num_householder = {n_h}, and fla's "
                             "chunk_gated_delta_rule is the n_h = 1 case: use fla, or an n_h = 1 preset "
                             "such as gated_deltanet-1.3b")
        runs.extend((preset, k) for k in kernels if k != "fla_gdn" or n_h == 1)
    return runs


def kernel_route(kernel: str) -> contextlib.AbstractContextManager:
    """Our kernels as they are, or fla's routed into the model's kernels.gated_delta_product calls."""
    if kernel == "ours":
        return contextlib.nullcontext()
    from bench.fla_adapters import load_fla_kernel, route_gated_delta_product

    return route_gated_delta_product(load_fla_kernel(kernel))


def bench_preset(preset: str, args: argparse.Namespace, kernel: str = "ours") -> dict:
    import torch

    from pretrain.config_loader import load_config
    from kernels.varlen import offsets_to
    from pretrain.distributed import device
    from pretrain.dry_run import synthetic_batch
    from pretrain.engine import build_engine
    from pretrain.flops import device_peak_flops, flops_per_token
    from pretrain.memory import estimate_memory

    cfg = load_config(None, [f"model.preset={preset}", f"data.seq_len={args.seq_len}",
                             f"parallel.micro_batch_size={args.micro_batch}",
                             f"parallel.global_batch_size={args.micro_batch}",
                             f"parallel.zero_stage={args.zero}", f"parallel.precision={args.precision}",
                             f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}"])
    dev = device()
    if kernel != "ours" and dev.type != "cuda":
        raise SystemExit(f"--gdp-kernel {kernel}: fla's kernels need a CUDA GPU (use --gdp-kernel ours)")
    start = time.perf_counter()
    eng = build_engine(cfg, world_size=1)  # weights drawn on the host part by part, made on the device
    build_s = time.perf_counter() - start
    e = eng.engine
    gen = torch.Generator().manual_seed(0)
    batches = [(ids.to(dev), labels.to(dev), offsets_to(cu, dev))  # as the trainer moves a batch
               for ids, labels, cu in (synthetic_batch(cfg.model.vocab_size, args.micro_batch, args.seq_len, gen)
                                       for _ in range(4))]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> float:
        ids, labels, cu = batches[i % len(batches)]
        loss = e(ids, labels, cu)
        e.backward(loss)
        e.step()
        return loss.item()

    with kernel_route(kernel):
        for i in range(args.warmup):
            step(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(args.steps):
            last = step(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    tokens = args.steps * args.micro_batch * args.seq_len
    tps = tokens / seconds
    flops = flops_per_token(cfg.model, args.seq_len).train
    peak = device_peak_flops(args.precision)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    bypassed = kernel != "ours" and fla_guard.bypass_note() is not None
    return {"preset": preset, "gdp_kernel": kernel, **({"fla_guard_bypassed": True} if bypassed else {}),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "tokens_per_s": round(tps, 1),
            "mfu": round(tps * flops / peak, 4) if peak else None, "peak_mem_gb": mem,
            "plan_mem_gb": round(estimate_memory(cfg, world_size=1).total_gb, 2),
            "train_flops_per_token": flops, "final_loss": last, "build_s": round(build_s, 1),
            "host_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def free_device_memory() -> None:
    """Drop the finished run's engine (and a failed run's traceback) before the next one."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_one(preset: str, kernel: str, args: argparse.Namespace) -> dict:
    """One run's JSON row; a failure becomes a row with "error" so the other runs still report."""
    try:
        row = bench_preset(preset, args, kernel)
    except Exception as exc:  # noqa: BLE001 - an OOM or a comparator's error must not lose the table
        row = {"preset": preset, "gdp_kernel": kernel, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        print(f"{preset} [{kernel}]: failed ({row['error']})", flush=True)
    else:
        print(json.dumps(row), flush=True)
    free_device_memory()
    return row


def ratios(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(preset, comparator kernel) -> our tokens/s over the comparator's (> 1: ours is faster)."""
    ours = {r["preset"]: r["tokens_per_s"] for r in rows if r["gdp_kernel"] == "ours" and "error" not in r}
    return {(r["preset"], r["gdp_kernel"]): ours[r["preset"]] / r["tokens_per_s"]
            for r in rows if r["gdp_kernel"] != "ours" and "error" not in r and r["preset"] in ours}


def _cells(r: dict, ratio: float | None) -> list[str]:
    if "error" in r:
        return [r["preset"], r["gdp_kernel"], "failed", "", "", "", r["error"][:60]]
    kernel = f"{r['gdp_kernel']} {fla_guard.FLAG}" if r.get("fla_guard_bypassed") else r["gdp_kernel"]
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
    plan = "-" if r.get("plan_mem_gb") is None else f"{r['plan_mem_gb']:.1f}"
    return [r["preset"], kernel, f"{r['tokens_per_s']:.1f}", mfu, mem, plan,
            "" if ratio is None else f"{ratio:.3f}"]


HEADER = ["preset", "kernel", "tokens/s/GPU", "MFU", "peak GiB", "plan GiB", "ours/kernel"]


def format_table(rows: list[dict]) -> str:
    """Fixed-width table; the last column is ours/this kernel in tokens/s on comparator rows."""
    rat = ratios(rows)
    body = [_cells(r, rat.get((r["preset"], r["gdp_kernel"]))) for r in rows]
    widths = [max(len(c[i]) for c in [HEADER, *body]) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [HEADER, *body])


def write_results(path: str, rows: list[dict], args: argparse.Namespace) -> None:
    dev = next((r["device"] for r in rows if "device" in r), "unknown device")
    rat = ratios(rows)
    lines = [f"\n## bench_train on {dev} ({args.precision}, seq {args.seq_len}, micro-batch "
             f"{args.micro_batch}, {args.steps} steps after {args.warmup} warm-up, ZeRO-{args.zero})\n",
             "| " + " | ".join(HEADER) + " |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(_cells(r, rat.get((r["preset"], r["gdp_kernel"])))) + " |" for r in rows]
    if any(r.get("fla_guard_bypassed") for r in rows) and fla_guard.bypass_note():
        lines += ["", fla_guard.bypass_note() + " (bench_train reports no RMSE: the loss is all it shows.)"]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.distributed import init_distributed

    needs_fla = args.gdp_kernel is None or any(k != "ours" for k in args.gdp_kernel)
    unavailable = fla_unavailable(args.precision) if needs_fla else None
    if needs_fla and unavailable is None:  # before any fla run: its gated backward meets the guard
        fla_guard.bypass_fla_triton_guard(args.fla_respect_triton_guard)
    kernels, gdn_named = resolve_gdp_kernels(args.gdp_kernel, unavailable)
    runs = plan_runs(args.presets, kernels, gdn_named)
    init_distributed()
    rows: list[dict] = []
    try:
        for preset, kernel in runs:
            rows.append(run_one(preset, kernel, args))
    finally:  # an interrupted session (the GPU session's time cap) still prints what it measured
        if rows:
            print("\n" + format_table(rows), flush=True)
            if args.results:
                write_results(args.results, rows, args)
    return 1 if any("error" in r and r["gdp_kernel"] == "ours" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
