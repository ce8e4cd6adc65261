"""CPU benchmark of the PyTorch reference ops: chunked form vs the naive per-token oracle.

Prints forward+backward time of both forms and their ratio, measured in one run.
Usage: python bench/bench_reference_kernels.py [--T 512] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from kernels.reference import causal_conv1d as conv
from kernels.reference import gated_delta_product as gdp
from kernels.reference import linear_recurrence as lr
from kernels.reference import ssd as ssd_ref


def _inputs(B: int, T: int, seed: int = 0) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    H, K, n_h, P, N, D = 4, 32, 2, 16, 16, 256
    k = torch.nn.functional.normalize(torch.randn(B, T, n_h, H, K, generator=g), dim=-1).requires_grad_()
    return {
        "gated_delta_product (H4 K=V=32 n_h=2)": (
            (r(B, T, H, K), k, r(B, T, n_h, H, K), torch.rand(B, T, n_h, H, generator=g).mul(2).requires_grad_(),
             (-torch.rand(B, T, H, generator=g)).requires_grad_()),
            dict(scale=K**-0.5), gdp.naive_gated_delta_product, gdp.chunk_gated_delta_product),
        "ssd (H4 P16 N16 G1)": (
            (r(B, T, H, P), torch.rand(B, T, H, generator=g).add(0.01).requires_grad_(),
             (-torch.rand(H, generator=g) - 0.5).requires_grad_(), r(B, T, 1, N), r(B, T, 1, N)),
            dict(D=torch.ones(H, requires_grad=True)), ssd_ref.naive_ssd, ssd_ref.chunk_ssd),
        "linear_recurrence (D256)": (
            (r(B, T, D), torch.rand(B, T, D, generator=g).requires_grad_()), {},
            lr.naive_linear_recurrence, lr.chunk_linear_recurrence),
        "causal_conv1d (D256 W4 silu)": (
            (r(B, T, D), r(D, 4), r(D)), dict(activation="silu"),
            conv.naive_causal_conv1d, conv.chunk_causal_conv1d),
    }


def _time(fn: Callable, args: tuple, kwargs: dict, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        for a in args:
            a.grad = None
        start = time.perf_counter()
        out, _ = fn(*args, **kwargs)
        out.float().pow(2).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, fp32, B={args.B} T={args.T}, {args.threads} thread(s), forward+backward, best of {args.repeats}")
    print(f"{'op':40s} {'naive ms':>10s} {'chunked ms':>11s} {'speedup':>8s}")
    for name, (tensors, kwargs, naive, chunk) in _inputs(args.B, args.T).items():
        t_naive = _time(naive, tensors, kwargs, 1)
        t_chunk = _time(chunk, tensors, kwargs, args.repeats)
        print(f"{name:40s} {t_naive * 1e3:10.1f} {t_chunk * 1e3:11.2f} {t_naive / t_chunk:7.1f}x")


if __name__ == "__main__":
    main()
