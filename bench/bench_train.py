"""End-to-end training throughput through the real DeepSpeed engine, one process.

    python -m bench.bench_train [--presets gated_deltaproduct-1.3b mamba2-1.3b griffin-1.3b]
                                [--seq-len 4096] [--micro-batch 1] [--steps 30] [--warmup 5]
                                [--zero 1] [--precision bf16] [--activation-checkpointing]

Trains each preset on synthetic packed batches (random tokens, 2-3 documents per row, so
the varlen paths run) with the same engine, optimizer and precision as ``linrnn-train``,
and prints tokens/s per GPU, MFU by the per-mixer FLOP count of ``pretrain.flops`` and
peak memory, after ``--warmup`` untimed steps (Triton autotuning, allocator warm-up). On a
CPU it runs too (use a ``-tiny`` preset); MFU is then not reported (no peak to compare).
"""
from __future__ import annotations

import argparse
import json
import time


def bench_preset(preset: str, args: argparse.Namespace) -> dict:
    import torch

    from pretrain.config_loader import load_config
    from pretrain.distributed import device
    from pretrain.dry_run import synthetic_batch
    from pretrain.engine import build_engine
    from pretrain.flops import device_peak_flops, flops_per_token

    cfg = load_config(None, [f"model.preset={preset}", f"data.seq_len={args.seq_len}",
                             f"parallel.micro_batch_size={args.micro_batch}",
                             f"parallel.global_batch_size={args.micro_batch}",
                             f"parallel.zero_stage={args.zero}", f"parallel.precision={args.precision}",
                             f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}"])
    eng = build_engine(cfg, 0, 1)
    e, dev = eng.engine, device()
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(dev) for t in synthetic_batch(cfg.model.vocab_size, args.micro_batch, args.seq_len, gen))
               for _ in range(4)]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> float:
        ids, labels, cu = batches[i % len(batches)]
        loss = e(ids, labels, cu)
        e.backward(loss)
        e.step()
        return loss.item()

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
    out = {"preset": preset, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "seq_len": args.seq_len, "micro_batch": args.micro_batch, "tokens_per_s": round(tps, 1),
           "mfu": round(tps * flops / peak, 4) if peak else None, "peak_mem_gb": mem,
           "train_flops_per_token": flops, "final_loss": last}
    del eng, e
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+",
                   default=["gated_deltaproduct-1.3b", "mamba2-1.3b", "griffin-1.3b"])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args(argv)
    from pretrain.distributed import init_distributed

    init_distributed()
    for preset in args.presets:
        print(json.dumps(bench_preset(preset, args)), flush=True)


if __name__ == "__main__":
    main()
