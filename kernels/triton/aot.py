"""Ahead-of-time compilation of our Triton kernels for a GPU target, on any machine.

The kernel tests run under ``TRITON_INTERPRET=1``, which never reaches the compiler: layout
rules, ``tl.dot`` shape limits, shared memory and register allocation go unchecked until a
GPU runs them. This module closes that gap without a GPU:

1. ``record(call)`` runs ``call`` (which calls the public ops with ``backend="triton"``)
   with the kernel modules imported under the interpreter and intercepts every launch,
   keeping per kernel the argument types, the constexprs and the launch options
   (num_warps, num_stages) that the host wrappers chose. Tensors are reduced to their
   dtype and 16-byte alignment, all a launch specialises on.
2. ``compile_launch`` compiles a recorded launch for a target (sm_90 by default) through
   the same specialisation as a real launch (``JITFunction.run``'s binder: integers equal
   to 1 become constants, 16-divisible integers and aligned pointers get divisibility
   hints), with triton's bundled ``ptxas``.
3. ``resources`` reads registers, spills and shared memory of a compiled kernel from
   ``ptxas -v`` (the flags triton itself uses) and triton's shared-memory allocation.

Uses triton internals (``create_function_from_signature``, ``JITFunction._pack_args``) so
the specialisation cannot drift from the launcher's; written against triton 3.8.
Imports only torch and triton (and the kernels package it inspects). Compiling needs a
process that imported triton without TRITON_INTERPRET (see ``can_compile``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import triton

# Reload order: a module after the ones it imports kernels from.
KERNEL_MODULES = (
    "kernels.triton.linear_recurrence",
    "kernels.triton.causal_conv1d",
    "kernels.triton.ssd",
    "kernels.triton.gated_delta_product_common",
    "kernels.triton.gated_delta_product_fwd",
    "kernels.triton.gated_delta_product_bwd",
    "kernels.triton.gated_delta_product",
    "kernels.triton.jit_math",
    "kernels.triton.rms_norm",
    "kernels.triton.gated_activation",
    "kernels.triton.l2_normalize",
    "kernels.triton.rg_lru_gates",
)
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on H100/H200 (227 KiB)
REGISTER_LIMIT = 255  # registers per thread the ISA can address


@dataclass(frozen=True)
class Pointer:
    """A tensor argument as the launcher specialises it: element type and 16-byte alignment."""

    dtype: torch.dtype
    aligned: bool

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the kernel (by module and name) and its arguments."""

    module: str
    kernel: str
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]

    def jit_function(self) -> triton.runtime.JITFunction:
        """The compilable kernel object (the modules must be imported without the interpreter)."""
        fn = getattr(importlib.import_module(self.module), self.kernel)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(
                f"{self.module}.{self.kernel} is a {type(fn).__name__}, not a JITFunction: the "
                "kernel modules were imported under TRITON_INTERPRET=1; unset it before compiling")
        return fn


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel needs per block on the target."""

    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int  # bytes of local stack frame per thread
    shared: int  # bytes per block: triton's allocation plus ptxas' static smem
    num_warps: int
    num_stages: int

    def warnings(self, shared_limit: int = SM90_SHARED_LIMIT) -> list[str]:
        """Flags for what costs speed (spills) or fails the launch (shared memory, registers)."""
        flags = []
        if self.spill_stores or self.spill_loads:
            flags.append("SPILL")
        if self.registers > REGISTER_LIMIT:
            flags.append("REGS>255")
        if self.shared > shared_limit:
            flags.append(f"SMEM>{shared_limit}")
        return flags


@dataclass(frozen=True)
class Specialization:
    """A launch as the compiler sees it: signature types, constants, hints and options."""

    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        return repr((sorted(self.signature.items()), sorted(self.constexprs.items(), key=repr),
                     sorted(self.attrs.items(), key=repr), sorted(self.options.items(), key=repr)))


def sm90() -> Any:
    """The default target: compute capability 9.0 (H100/H200), 32 threads per warp."""
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def _freeze(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return Pointer(arg.dtype, arg.data_ptr() % 16 == 0)
    return arg


def reload_kernels() -> None:
    """Re-import the kernel modules, so ``triton.jit`` sees the current TRITON_INTERPRET."""
    for name in KERNEL_MODULES:
        importlib.reload(importlib.import_module(name))


@contextlib.contextmanager
def _interpreted_kernels() -> Iterator[None]:
    """Kernel modules re-imported under TRITON_INTERPRET=1 (``triton.jit`` decides at
    definition time), then re-imported for the compiler on exit."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        reload_kernels()
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET")
        reload_kernels()
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


def record(call: Callable[[], Any], *, execute: bool = False) -> list[Launch]:
    """Every kernel launch that ``call()`` makes through the Triton backend, in order.

    ``execute=False`` skips the kernels themselves (outputs stay uninitialised): the host
    wrappers pick launch parameters from shapes, dtypes and flags only, so realistic head
    sizes cost nothing. Needs CPU tensors; on return the kernels are compilable again.
    """
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self.fn.__module__, self.fn.__name__,
                               tuple(_freeze(a) for a in args),
                               tuple(sorted((k, _freeze(v)) for k, v in kwargs.items()))))
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    with _interpreted_kernels():
        InterpretedFunction.run = run
        try:
            call()
        finally:
            InterpretedFunction.run = original
    return launches


def can_compile() -> bool:
    """False in a process that imported triton under TRITON_INTERPRET=1: triton's own jit
    helpers (``tl.sum``, ``tl.cdiv``...) were then made interpreted and cannot compile."""
    from triton.language import standard
    return isinstance(standard.sum, triton.runtime.JITFunction)


def specialize(launch: Launch, target: Any = None, **options: Any) -> Specialization:
    """The launch as ``JITFunction.run`` would hand it to the compiler for ``target``.

    ``options`` override the launch's own (e.g. ``num_stages=2`` to see what would fit).
    """
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.jit_function()
    backend = make_backend(target or sm90())
    kwargs = {**dict(launch.kwargs), **options}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return Specialization(signature, constexprs, attrs, dict(parsed.__dict__))


def compile_launch(launch: Launch, target: Any = None, **options: Any):
    """Compile one recorded launch (to PTX and cubin) for ``target``; returns the
    ``CompiledKernel``. Raises triton's error when the kernel does not compile."""
    from triton.compiler import ASTSource

    if not can_compile():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1, so its own jit helpers "
                           "are interpreted: compile in a process started without it")
    target = target or sm90()
    s = specialize(launch, target, **options)
    src = ASTSource(launch.jit_function(), s.signature, s.constexprs, s.attrs)
    return triton.compile(src, target=target, options=s.options)


def ptxas_path(capability: int = 90) -> str | None:
    """Triton's ptxas for this capability (TRITON_PTXAS_PATH or the bundled one), if usable."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(capability).path
        subprocess.run([path, "--version"], check=True, capture_output=True)
        return path
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError):
        return None


def sass_digest(compiled) -> str:
    """Short hash of a compiled kernel's SASS without line information: two source trees
    whose launches have the same digests run the same machine code (what a refactor of
    kernel code should keep). Uses the nvdisasm that ships beside triton's ptxas."""
    path = ptxas_path(compiled.metadata.target.arch)
    nvdisasm = os.path.join(os.path.dirname(path), "nvdisasm") if path else ""
    if not os.path.isfile(nvdisasm):
        raise RuntimeError("nvdisasm is not available beside triton's ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout
    return hashlib.sha1(sass.encode()).hexdigest()[:12]


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_smem": r"(\d+) bytes smem",
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Numbers of one kernel from ``ptxas -v`` output (absent fields are 0)."""
    out = {}
    for field, pattern in _PTXAS_PATTERNS.items():
        m = re.search(pattern, log)
        out[field] = int(m.group(1)) if m else 0
    if not re.search(_PTXAS_PATTERNS["registers"], log):
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    return out


def resources(compiled) -> Resources:
    """Registers, spills and shared memory of a compiled kernel, by rerunning triton's
    ptxas with ``-v`` on its PTX (same flags as triton's own ptxas step)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    capability = compiled.metadata.target.arch
    path = ptxas_path(capability)
    if path is None:
        raise RuntimeError("ptxas is not available: install triton with its NVIDIA backend "
                           "or set TRITON_PTXAS_PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        cmd = [path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", src + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    r = parse_ptxas_log(log)
    md = compiled.metadata
    return Resources(r["registers"], r["spill_stores"], r["spill_loads"], r["stack"],
                     md.shared + r["static_smem"], md.num_warps, md.num_stages)
