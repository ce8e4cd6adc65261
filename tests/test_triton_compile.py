"""Every Triton kernel compiles for sm_90 (H100/H200) on this CPU-only machine.

The other Triton tests run the kernels under TRITON_INTERPRET=1, which never reaches the
compiler. Here the public ops run forward and backward only to record their launches
(``kernels/triton/aot.py``), and each distinct launch is compiled ahead of time with
triton's bundled ptxas at a few small but representative configs (bf16 and fp32, a GDP
with n_h > 1, initial/final states): it must compile and fit an sm_90 block's shared
memory. Realistic sizes, registers and spills are ``bench/kernel_resources.py``'s job.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re

import pytest
import torch

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError:  # pragma: no cover - depends on the triton build
    pytest.skip("triton's NVIDIA backend is not installed", allow_module_level=True)

import kernels  # noqa: E402
from bench import kernel_resources as kr  # noqa: E402
from kernels.triton import aot  # noqa: E402

INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET")
_NO_COMPILER = (
    "triton was imported under TRITON_INTERPRET=1: its own jit helpers cannot compile"
    if not aot.can_compile() else
    "triton's ptxas is not available (no NVIDIA backend binaries)" if aot.ptxas_path() is None
    else None)
needs_ptxas = pytest.mark.skipif(_NO_COMPILER is not None, reason=_NO_COMPILER or "")

# name -> (case, kernels left to the bench). Small head sizes keep LLVM and ptxas quick;
# together the cases launch, and compile, every kernel we have. fp32 dots are FMA loops
# whose compile time is set by the 64-row chunk, not the head size: GDP's prep and grad
# kernels take ~55 s and SSD's backward ~20 s even at K = 16, so those fp32 twins are
# compiled only by ``bench/kernel_resources.py --fp32`` (their bf16 twins are here).
CASES = {
    "gdp-bf16-nh2-state": (kr.gdp_case("bf16", 32, 32, 2, H=2, with_state=True), ()),
    "gdp-fp32-nh1": (kr.gdp_case("fp32", 16, 16, 1, H=2), ("gdp_prep_kernel", "gdp_grad_kernel")),
    # K > 64 takes the K-split gradient pair (its tiles are K slices: compile time as K = 64)
    "gdp-bf16-k256-split": (kr.gdp_case("bf16", 256, 32, 1, H=1), (
        "gdp_prep_kernel", "gdp_state_kernel", "gdp_output_kernel", "gdp_dd_local_kernel", "gdp_dh_kernel")),
    # HALF_INTERMEDIATES (the bench's ``half`` variant): bf16 buffers between the kernels
    "gdp-bf16-nh2-half": (kr.gdp_case("bf16", 32, 32, 2, H=2, half=True), ()),
    "gdp-bf16-k256-split-half": (kr.gdp_case("bf16", 256, 32, 1, H=1, half=True), (
        "gdp_prep_kernel", "gdp_state_kernel", "gdp_output_kernel", "gdp_dd_local_kernel", "gdp_dh_kernel")),
    # HALF_DOT_OPERANDS (``half_dots``, with half buffers): bf16 dot operands, fp32 accumulators
    "gdp-bf16-nh2-half-dots": (kr.gdp_case("bf16", 32, 32, 2, H=2, half=True, half_dots=True), ()),
    "gdp-bf16-k256-split-half-dots": (kr.gdp_case("bf16", 256, 32, 1, H=1, half=True, half_dots=True), (
        "gdp_prep_kernel", "gdp_state_kernel", "gdp_output_kernel", "gdp_dd_local_kernel", "gdp_dh_kernel")),
    "ssd-bf16-neg-state": (kr.ssd_case("bf16", 32, 32, H=2, neg=True, with_state=True), ()),
    "ssd-fp32": (kr.ssd_case("fp32", 16, 16, H=2, G=2), ("_ssd_bwd_kernel",)),
    "ssd-bf16-half-dots": (kr.ssd_case("bf16", 32, 32, H=2, neg=True, half_dots=True), ()),
    "scan-bf16": (kr.scan_case("bf16", 256), ()),
    "scan-fp32-state": (kr.scan_case("fp32", 256, with_state=True), ()),
    "conv-bf16-state": (kr.conv_case("bf16", 256, with_state=True), ()),
    "conv-fp32-state": (kr.conv_case("fp32", 256, with_state=True), ()),  # the final state only when asked for
    "norm-bf16-gate-first": (kr.norm_case("bf16", 96, group=32, gated=True, gate_first=True), ()),
    "norm-fp32": (kr.norm_case("fp32", 256), ()),
    "act-bf16-gelu": (kr.act_case("bf16", 96, "gelu"), ()),
    "act-fp32-silu": (kr.act_case("fp32", 96), ()),
    "l2-bf16": (kr.l2_case("bf16", 2, 48), ()),
    "l2-fp32": (kr.l2_case("fp32", 2, 128), ()),
    "rglru-bf16": (kr.rglru_case("bf16", 192), ()),
    "rglru-fp32": (kr.rglru_case("fp32", 64), ()),
}


def representatives(launches: list[aot.Launch], skip=()) -> list[aot.Launch]:
    """One launch per kernel function: the variant with the most flags switched on (the
    other variants compile a subset of its code; the bench compiles them all)."""
    best: dict[str, aot.Launch] = {}
    for launch in launches:
        flags = sum(v is True for _, v in launch.kwargs)
        old = best.get(launch.kernel)
        if launch.kernel not in skip and (old is None or flags > sum(v is True for _, v in old.kwargs)):
            best[launch.kernel] = launch
    return list(best.values())


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[aot.Launch]]:
    return {name: aot.record(case.call) for name, (case, _) in CASES.items()}


def _all_kernels() -> set[str]:
    """Every top-level ``@triton.jit`` kernel (name ending in ``_kernel``) of our modules."""
    package = importlib.import_module("kernels.triton")
    modules = {f"kernels.triton.{m.name}" for m in pkgutil.iter_modules(package.__path__)}
    assert modules - {"kernels.triton.aot"} == set(aot.KERNEL_MODULES), "update aot.KERNEL_MODULES"
    names = set()
    for mod in aot.KERNEL_MODULES:
        for name, obj in vars(importlib.import_module(mod)).items():
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel") \
                    and obj.fn.__module__ == mod:
                names.add(name)
    return names


def test_cases_launch_and_compile_every_kernel(recorded):
    launched = {launch.kernel for launches in recorded.values() for launch in launches}
    assert launched == _all_kernels()
    compiled = {launch.kernel for name, launches in recorded.items()
                for launch in representatives(launches, CASES[name][1])}
    assert compiled == launched


def _param_index(launch: aot.Launch, name: str) -> int:
    return [p.name for p in launch.jit_function().params].index(name)


def test_record_keeps_the_wrappers_choices_and_restores_the_compiler(recorded):
    assert os.environ.get("TRITON_INTERPRET") == INTERPRET_AT_IMPORT
    prep = next(x for x in recorded["gdp-bf16-nh2-state"] if x.kernel == "gdp_prep_kernel")
    kw = dict(prep.kwargs)
    assert (kw["N_H"], kw["K"], kw["BK"], kw["INV_PREC"], kw["PREC"]) == (2, 32, 32, "tf32x3", "tf32")
    assert kw["OPD"] == triton.language.float32  # fp32 operands unless HALF_DOT_OPERANDS
    dots = [dict(x.kwargs)["OPD"] for x in recorded["gdp-bf16-nh2-half-dots"]]
    assert len(dots) >= 8 and set(dots) == {triton.language.bfloat16}
    ssd = [dict(x.kwargs)["OPD"] for x in recorded["ssd-bf16-half-dots"]]
    assert len(ssd) == 2 and set(ssd) == {triton.language.bfloat16}  # forward and backward
    assert {dict(x.kwargs)["OPD"] for x in recorded["ssd-bf16-neg-state"]} == {triton.language.float32}
    spec = aot.specialize(prep)
    assert spec.signature["k_ptr"] == "*bf16" and spec.signature["w_ptr"] == "*fp32"
    # the half case's launches carry bf16 buffers (W, U) but an fp32 tinv
    half = next(x for x in recorded["gdp-bf16-nh2-half"] if x.kernel == "gdp_prep_kernel")
    sig = aot.specialize(half).signature
    assert (sig["w_ptr"], sig["u_ptr"], sig["t_ptr"]) == ("*bf16", "*bf16", "*fp32")
    grad = next(x for x in recorded["gdp-bf16-k256-split-half"] if x.kernel == "gdp_grad_kslice_kernel")
    sig = aot.specialize(grad).signature
    assert [sig[f"{n}_ptr"] for n in ("w", "hs", "dhs", "d", "dd", "t")] == ["*bf16"] * 5 + ["*fp32"]
    assert spec.signature["H"] == "constexpr" and spec.constexprs[(_param_index(prep, "H"),)] == 2
    assert isinstance(prep.jit_function(), triton.runtime.JITFunction)
    # SSD's wrapper picks num_warps from the tile; the launch carries it to the compiler.
    big = aot.record(kr.ssd_case("bf16", 64, 128, H=1).call)
    assert {dict(x.kwargs)["num_warps"] for x in big} == {8}
    assert aot.specialize(big[0]).options["num_warps"] == 8


def test_pointer_alignment_becomes_a_divisibility_hint():
    aligned, odd = aot.Pointer(torch.float32, True), aot.Pointer(torch.float32, False)
    launch = aot.Launch("kernels.triton.linear_recurrence", "_lr_fwd_kernel",
                        (odd, aligned, aligned, aligned, aligned, aligned, 64),
                        (("BD", 16), ("BT", 64), ("HAS_H0", False), ("PREFETCH", False)))
    attrs = aot.specialize(launch).attrs
    hint = [["tt.divisibility", 16]]
    assert not attrs.get((0,)) and attrs[(1,)] == hint and attrs[(6,)] == hint  # x unaligned; a, D=64 hinted


def test_record_can_execute_the_kernels():
    """``execute=True`` runs the interpreted kernels as usual (the result is the op's)."""
    x, w = torch.randn(1, 9, 16), torch.randn(16, 3)
    out = {}

    def call():
        out["triton"] = kernels.causal_conv1d(x, w, backend="triton", output_final_state=True)[0]

    launches = aot.record(call, execute=True)
    assert [x.kernel for x in launches] == ["_conv_fwd_kernel", "_conv_final_state_kernel"]
    torch.testing.assert_close(out["triton"], kernels.causal_conv1d(x, w, backend="torch")[0])
    # without a final state asked for, none is made
    launches = aot.record(lambda: kernels.causal_conv1d(x, w, backend="triton"), execute=True)
    assert [x.kernel for x in launches] == ["_conv_fwd_kernel"]


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    96 bytes stack frame, 128 bytes spill stores, 136 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]"""
    assert aot.parse_ptxas_log(log) == {"registers": 255, "stack": 96, "spill_stores": 128,
                                        "spill_loads": 136, "static_smem": 16}
    assert aot.Resources(255, 128, 136, 96, 300000, 8, 3).warnings() == ["SPILL", "SMEM>232448"]
    assert aot.Resources(40, 0, 0, 0, 1024, 4, 3).warnings() == []
    with pytest.raises(ValueError, match="no register count"):
        aot.parse_ptxas_log("ptxas fatal   : Unresolved extern function 'f'")


@pytest.mark.slow
@needs_ptxas
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_compile_and_fit_sm90(name, recorded):
    """Compiles (triton.compile raises otherwise) and fits one sm_90 block's shared memory
    (over it, a real launch raises OutOfResources). Registers cannot exceed 255: ptxas
    spills instead, which the bench reports."""
    for launch in representatives(recorded[name], CASES[name][1]):
        compiled = aot.compile_launch(launch)
        assert compiled.metadata.name == launch.kernel and compiled.asm["cubin"]
        assert compiled.metadata.shared <= aot.SM90_SHARED_LIMIT, \
            f"{launch.kernel} ({kr.kernel_config(launch)}) needs {compiled.metadata.shared} B of shared memory"


@needs_ptxas
def test_bench_cli_prints_a_row_per_kernel(capsys):
    assert kr.main(["--ops", "linear_recurrence", "--quick", "--sass"]) == 0
    out = capsys.readouterr().out
    assert "ptxas sm_90a" in out and "not timed" in out
    rows = [line for line in out.splitlines() if line.startswith("_lr_")]
    assert [r.split()[0] for r in rows] == ["_lr_fwd_kernel", "_lr_bwd_kernel"]
    for row in rows:  # kernel, case "bf16 D=2048", config "BD=32 BT=64", registers (ptxas -v), ...
        assert "FAIL" not in row and 0 < int(row.split()[5]) <= aot.REGISTER_LIMIT
        assert re.search(r"sass=[0-9a-f]{12}$", row)
    with pytest.raises(SystemExit, match="unknown op"):
        kr.main(["--ops", "nope"])


@needs_ptxas
def test_sass_digest_tells_machine_code_apart(recorded):
    """Equal for the same launch compiled twice, different for another kernel or launch
    option (the digest --sass prints to compare two source trees)."""
    fwd, bwd = recorded["scan-bf16"][:2]
    first = aot.sass_digest(aot.compile_launch(fwd))
    assert len(first) == 12 and first == aot.sass_digest(aot.compile_launch(fwd))
    assert first != aot.sass_digest(aot.compile_launch(bwd))
    assert first != aot.sass_digest(aot.compile_launch(fwd, num_warps=8))
