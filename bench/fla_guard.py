"""Let fla's comparators run, for timing, where fla's own Triton guard would refuse them.

fla-core 0.6.0 raises in ``fla.ops.common.chunk_o.chunk_bwd_dqkwg`` (the backward of every
gated chunk kernel we compare with: chunk_gated_delta_product, chunk_gated_delta_rule,
chunk_simple_gla) when ``g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not
TRITON_ABOVE_3_7_1``: fla #640, Triton 3.4.0 - 3.7.0 miscompiles that kernel on Hopper and
the gradients come out wrong. The GPU session's H200 has Triton 3.6 and can get neither a
newer Triton nor tilelang, so every fla row of the headline comparison was lost.

The guard reads those three names as globals of the module that defines the function, at
call time. ``bypass_fla_triton_guard`` sets ``TRITON_ABOVE_3_7_1 = True`` in every loaded fla
module that holds all three as its own globals (in 0.6.0 only ``fla.ops.common.chunk_o``;
``fla.utils``, where they are defined, is left alone), only where the guard would refuse.
The same kernels then run: fla's timings are real, its gradients are as wrong as the bug
makes them. It is on by default in the benches, prints a line, and the results mark fla's
rows and say so (a large fla RMSE is the upstream bug, not the adapter's);
``--fla-respect-triton-guard`` turns it off.
"""
from __future__ import annotations

import argparse
import importlib
import sys

GUARD_MODULE = "fla.ops.common.chunk_o"  # where fla-core 0.6.0's guard is
GUARD_FLAGS = ("IS_NVIDIA_HOPPER", "TRITON_ABOVE_3_4_0", "TRITON_ABOVE_3_7_1")
FLIPPED = "TRITON_ABOVE_3_7_1"
DEFINING_MODULES = ("fla.utils", "fla.utils.env", "fla.utils.hardware")  # definitions, not guards
RESPECT_OPTION = "--fla-respect-triton-guard"
FLAG = "(guard bypassed)"  # appended to the name of an fla row the guard would have refused

_note: str | None = None  # the results note while the guard is bypassed in this process


def add_option(p: argparse.ArgumentParser) -> None:
    """The benches' shared switch; ``args.fla_respect_triton_guard`` is False by default."""
    p.add_argument(RESPECT_OPTION, action="store_true",
                   help="let fla refuse its gated backward on Hopper with Triton >= 3.4.0, < 3.7.1 "
                        "(fla #640) instead of bypassing its guard to time it anyway (the default; "
                        "fla's rows are then marked, its gradients may be wrong)")


def guard_refuses(module: object) -> bool:
    """fla's condition, read from the module's own globals (False where it has no guard)."""
    names = getattr(module, "__dict__", {})
    if not all(f in names for f in GUARD_FLAGS):
        return False
    hopper, above_3_4_0, above_3_7_1 = (names[f] for f in GUARD_FLAGS)
    return bool(hopper and above_3_4_0 and not above_3_7_1)


def guard_sites() -> list[str]:
    """Loaded fla modules that imported the guard's three flags by name."""
    return sorted(name for name, mod in list(sys.modules.items())
                  if (name == "fla" or name.startswith("fla.")) and name not in DEFINING_MODULES
                  and all(f in getattr(mod, "__dict__", {}) for f in GUARD_FLAGS))


def bypass_note() -> str | None:
    """The results note while the guard is bypassed, else None."""
    return _note


def label(name: str) -> str:
    """An fla row's name, flagged while the guard is bypassed (only rows the guard covers)."""
    return f"{name} {FLAG}" if _note else name


def _version(module: str) -> str:
    return str(getattr(sys.modules.get(module), "__version__", "?"))


def bypass_fla_triton_guard(respect: bool = False) -> str | None:
    """Where fla's guard would refuse, flip it (unless ``respect``); the note, or None.

    Never raises: where fla does not import, the comparators report that themselves."""
    global _note
    try:
        importlib.import_module(GUARD_MODULE)  # imports fla.ops, so every guard site is loaded
    except Exception:  # noqa: BLE001 - fla absent, or its import probing a missing GPU
        return None
    sites = [name for name in guard_sites() if guard_refuses(sys.modules[name])]
    if not sites:
        return _note  # no guard refuses here, or this process flipped it already
    why = (f"fla-core {_version('fla')} refuses its gated backward (chunk_bwd_dqkwg) on Hopper with "
           f"Triton {_version('triton')} (>= 3.4.0, < 3.7.1: fla #640, that Triton miscompiles it and "
           "the gradients come out wrong)")
    if respect:
        print(f"fla Triton guard respected ({RESPECT_OPTION}): {why}; fla's gated rows will fail", flush=True)
        return None
    for name in sites:
        setattr(sys.modules[name], FLIPPED, True)
    _note = (f"fla rows marked {FLAG}: {why}. The bench set {FLIPPED} = True in {', '.join(sites)} to time "
             "fla anyway: its timings stand, but its outputs and gradients come from a Triton that fla "
             "flags as wrong on Hopper, so a large fla RMSE is that upstream bug, not the comparison's. "
             f"{RESPECT_OPTION} lets fla refuse instead.")
    print(f"note: {_note}", flush=True)
    return _note
