"""Which kernels a forward+backward spends its device time in (the benches' ``--profile``).

The benches time a whole fwd+bwd; this says where that time goes: a few warm iterations
under ``torch.profiler`` (CUDA activity for the kernels, CPU for the host side), grouped by
kernel name (a Triton kernel's name is its jit function's, e.g. ``gdp_prep_kernel``), per
fwd+bwd, with each kernel's share of the summed kernel time, and the host-side gap: the
wall time of the same iterations run without the profiler, minus that sum (launch overhead,
Python, synchronisation; negative only if kernels overlap). Run it after the timed
measurement, so no compile or autotune lands in it. ``profile_table`` and
``format_profile`` are pure, so the table is tested on the CPU with synthetic records.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, NamedTuple

ITERS = 5  # warm iterations profiled (and timed without the profiler for the wall time)
NAME_WIDTH = 80  # torch's own kernel names are C++ templates: cut to this many characters


class KernelRow(NamedTuple):
    name: str
    calls: float  # per fwd+bwd
    ms: float  # device time per fwd+bwd
    share: float  # of the summed kernel time per fwd+bwd, 0..1


class Profile(NamedTuple):
    rows: list[KernelRow]  # by time, longest first
    kernel_ms: float  # summed kernel time per fwd+bwd
    wall_ms: float | None  # wall time per fwd+bwd without the profiler
    iters: int

    @property
    def host_gap_ms(self) -> float | None:
        return None if self.wall_ms is None else self.wall_ms - self.kernel_ms


# Entries the profiler may list beside the kernels that are its own overhead.
PROFILER_OVERHEAD = ("Activity Buffer Request", "Buffer Flush")


def device_records(events: Iterable[object]) -> list[tuple[str, float, int]]:
    """(name, device µs, count) of the device-side entries of ``prof.key_averages()``.

    CPU ops (aten::*, autograd nodes) also carry a device time, that of the kernels they
    launched, so only entries whose ``device_type`` is not the CPU are kept: counting both
    would count every kernel twice. Plain (name, µs, count) tuples pass through."""
    out = []
    for e in events:
        if isinstance(e, tuple):
            out.append((str(e[0]), float(e[1]), int(e[2])))
            continue
        if str(getattr(e, "device_type", "CPU")).rsplit(".", 1)[-1] == "CPU":
            continue
        if str(e.key).startswith(PROFILER_OVERHEAD):  # CUPTI's own bookkeeping, not our work
            continue
        us = getattr(e, "device_time_total", None)
        if us is None:  # torch before 2.4 named it after CUDA
            us = getattr(e, "cuda_time_total", 0.0)
        out.append((str(e.key), float(us), int(e.count)))
    return out


def profile_table(records: Iterable[object], iters: int, wall_ms: float | None = None) -> Profile:
    """Records (``key_averages()`` entries or (name, µs, count)) over ``iters`` fwd+bwd
    iterations -> per-fwd+bwd rows grouped by name, longest first."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    us: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, t, n in device_records(records):
        us[name] = us.get(name, 0.0) + t
        count[name] = count.get(name, 0) + n
    total_us = sum(us.values())
    rows = [KernelRow(name, count[name] / iters, t / iters / 1e3, t / total_us if total_us > 0 else 0.0)
            for name, t in sorted(us.items(), key=lambda kv: (-kv[1], kv[0]))]
    return Profile(rows, total_us / iters / 1e3, wall_ms, iters)


def _short(name: str) -> str:
    name = name.replace("|", "/")  # a Markdown cell
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 3] + "..."


def format_profile(p: Profile, title: str) -> list[str]:
    """Markdown lines: a title, the kernel table, and the kernel / wall / host-gap totals."""
    lines = [f"\n### {title}: device time per fwd+bwd by kernel ({p.iters} warm iterations)\n",
             "| kernel | calls per fwd+bwd | ms per fwd+bwd | share |", "|---|---:|---:|---:|"]
    lines += [f"| {_short(r.name)} | {r.calls:g} | {r.ms:.3f} | {100 * r.share:.1f}% |" for r in p.rows]
    if not p.rows:
        lines.append("| (no device kernels recorded: is CUPTI available?) | | | |")
    total = f"kernels {p.kernel_ms:.3f} ms per fwd+bwd"
    if p.wall_ms is not None:
        total += (f"; wall {p.wall_ms:.3f} ms without the profiler; host-side gap (wall - kernels) "
                  f"{p.host_gap_ms:.3f} ms ({100 * p.host_gap_ms / p.wall_ms:.1f}% of wall)"
                  if p.wall_ms > 0 else "")
    lines += ["", total + "."]
    return lines


def profile_step(step: Callable[[], object], iters: int = ITERS) -> Profile | None:
    """``step`` (one warm fwd+bwd) timed ``iters`` times, then profiled ``iters`` times.

    None, with a printed line, without CUDA (the benches already exit there; this keeps a
    CPU smoke run of a bench function going)."""
    import torch

    if not torch.cuda.is_available():
        print("  profile skipped: torch.profiler's CUDA activity needs a CUDA GPU", flush=True)
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return profile_table(prof.key_averages(), iters, wall_ms)


def profile_lines(step: Callable[[], object], title: str, iters: int = ITERS) -> list[str]:
    """``format_profile(profile_step(...))``, printed; [] when skipped or when profiling fails
    (reported: the bench's timings stand without it)."""
    try:
        p = profile_step(step, iters)
    except Exception as exc:  # noqa: BLE001 - e.g. CUPTI refused: the timings are already measured
        print(f"  profile failed ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
        return []
    if p is None:
        return []
    lines = format_profile(p, title)
    print("\n".join(lines), flush=True)
    return lines
