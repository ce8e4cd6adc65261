#!/usr/bin/env bash
# One GPU session in one command: environment, optional wheels, `pytest -m gpu`, then the
# kernel and training benchmarks, each stage under its own time cap so that one hanging
# stage cannot eat a short GPU lease. Stages are independent: a failure is recorded in
# $OUT/summary.txt and the next stage runs. Run from anywhere; it works in the repo root.
#
#   bash bench/gpu_session.sh            # all default stages, at most ~9 minutes
#   GPU_SESSION_STAGES=wheels,pytest,gdp bash bench/gpu_session.sh
#
# Stages (default order: what decides the most first, since a lease can end early; warm
# compiles the later stages' kernels first, in parallel): wheels env warm gdp gdp_more train
# ssd scan conv pytest; gdp_grid is opt-in. All of them need more than one call's 540 s:
# bench/RESULTS.md ("How to run the GPU session") gives the two-call plan for a 15-minute lease.
#   env       GPU, driver, Python, torch, triton and optional packages -> env.txt
#   wheels    pip install --no-index --no-deps every *.whl in $WHEELS_DIR (fla-core,
#             deepspeed and its missing dependencies) into a private folder on PYTHONPATH
#             (a later call on the same machine finds that folder without this stage)
#   warm      bench.warm_kernels: one tiny forward+backward of every kernel configuration
#             the later stages use, on CPUs-2 processes at once, into Triton's on-disk cache
#             (a bare machine compiles each GDP configuration for 25-30 s; serially, in the
#             stages, that ate most of a lease); progress in env.txt
#   gdp       bench_gated_delta_product --target (B=4 T=4096 H=16 K=V=128, n_h 2 then 1, bf16;
#             ours vs fla when importable, each with its relative RMSE against an fp32
#             reference and its first-call (compile) time)
#   pytest    python -m pytest -m gpu on the test modules that hold GPU tests, the kernel
#             modules first
#   train     bench_train (1.3B presets, seq 4096, 10 steps each), only when deepspeed
#             imports; the GatedDeltaProduct preset runs twice, with our kernel and with
#             fla's chunk_gated_delta_product (ours/fla tokens/s), when fla imports
#   ssd, scan, conv   bench_scan_conv_ssd, one op each (conv also times rms_norm,
#             gated_activation, l2_normalize and rg_lru_gates), at B*T = 32768 tokens, T = 4096;
#             ssd with its variants and --profile, scan with its tile and prefetch variants
#   gdp_more  the target point again with variants of ours (half_dots, the three of
#             half_dots+half+save_wy together, onekernel, w8, half, inv_tf32, bv32, save_wy:
#             bench_gated_delta_product --help) and the torch path
#   gdp_grid  a wider GDP grid without the torch path, for time left over
#
# Environment:
#   OUT                  output folder (the device tool sets it; default runs/gpu_session)
#   GPU_SESSION_STAGES   comma-separated stages to run, in the default order
#   GPU_SESSION_BUDGET_S all stages together, seconds (default 540); a stage's cap is cut
#                        to what is left, and a stage is skipped with under 20 s left
#   CAP_<STAGE>          one stage's cap in seconds, e.g. CAP_PYTEST=240
#   WHEELS_DIR           folder of wheels (default wheels; absent or empty: nothing to do)
#   PYTEST_ARGS          replaces the module list given to pytest (-m gpu stays)
#   GDP_ARGS SCAN_ARGS CONV_ARGS SSD_ARGS TRAIN_ARGS GDP_MORE_ARGS GDP_GRID_ARGS
#                        replace a benchmark's default arguments (word-split)
#   WARM_ARGS            arguments of bench.warm_kernels, e.g. "--only gdp" (default none: all)
#   PYTHON               interpreter (default python3)
#
# Files under $OUT (the device tool returns at most 8): env.txt, pytest.log,
# pytest_junit.xml, bench_gdp.log, bench_scan_conv_ssd.log, bench_train.log, results.md
# (the benchmarks' Markdown tables) and summary.txt (printed at the end too).
# Exit status: 0 when every stage that ran passed, 1 otherwise, 2 for bad arguments.
set -u -o pipefail

ALL_STAGES="env wheels warm gdp gdp_more train ssd scan conv pytest gdp_grid"
DEFAULT_STAGES="env,wheels,warm,gdp,gdp_more,train,ssd,scan,conv,pytest"

source "$(dirname "$0")/gpu_common.sh" || exit 2
gpu_script_start "$0" GPU_SESSION_STAGES "$@"
OUT=${OUT:-$REPO/runs/gpu_session}
mkdir -p "$OUT" || exit 2
WHEELS_DIR=${WHEELS_DIR:-wheels}
SITE=/tmp/gpu_session_site
BUDGET=${GPU_SESSION_BUDGET_S:-540}
STAGES=${GPU_SESSION_STAGES:-$DEFAULT_STAGES}
SUMMARY=$OUT/summary.txt
RESULTS=$OUT/results.md
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# wheels installed by an earlier call on this machine (a rerun of some stages only)
[[ -d $SITE ]] && export PYTHONPATH="$SITE:$PYTHONPATH"

check_stages GPU_SESSION_STAGES "$STAGES" "$ALL_STAGES"
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "GPU_SESSION_BUDGET_S must be whole seconds, got '$BUDGET'" >&2; exit 2; }

# A command started in the background inherits SIGINT as ignored, and then Python installs
# no KeyboardInterrupt handler: reset it so the caps' SIGINT reaches the stages.
SIGRESET=()
env --default-signal=INT true 2>/dev/null && SIGRESET=(env --default-signal=INT)

START=$SECONDS
for f in summary.txt results.md env.txt pytest.log pytest_junit.xml bench_gdp.log \
    bench_scan_conv_ssd.log bench_train.log; do
    rm -f "${OUT:?}/$f"  # a rerun into the same folder starts clean
done
: >"$SUMMARY"
: >"$RESULTS"

wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

# cap_for STAGE DEFAULT -> the stage's cap: CAP_<STAGE> or DEFAULT, cut to the budget left
cap_for() {
    local var="CAP_${1^^}" cap left
    cap=${!var:-$2}
    left=$((BUDGET - (SECONDS - START)))
    ((cap > left)) && cap=$left
    echo $((cap < 0 ? 0 : cap))
}

FAILED_STAGES=""
NOTES=$(mktemp)  # the end of each failed stage's output, for the summary
trap 'rm -f "$NOTES"' EXIT
record() {  # record STAGE STATUS SECONDS NOTE
    [[ $2 == ok || $2 == skipped ]] || FAILED_STAGES+=" $1"
    printf '%-9s %-22s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

# run_stage NAME DEFAULT_CAP LOG CMD... : runs CMD under its cap (SIGINT first, so pytest
# still writes its junit file and Python prints a traceback; SIGKILL 15 s later), logs to LOG
run_stage() {
    local name=$1 cap log=$3 t0 rc status
    cap=$(cap_for "$1" "$2")
    shift 3
    if ! wanted "$name"; then return 0; fi
    if ((cap < 20)); then
        record "$name" "skipped" 0 "a cap of ${cap}s (CAP_${name^^}, or what GPU_SESSION_BUDGET_S=${BUDGET} left) is under 20s"
        return 0
    fi
    echo "== $name (cap ${cap}s): $*" | tee -a "$log"
    local from
    from=$(($(stat -c %s "$log") + 1))
    t0=$SECONDS
    timeout -s INT -k 15 "$cap" "${SIGRESET[@]}" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="timeout after ${cap}s" ;;
        *) status="failed rc=$rc" ;;
    esac
    echo "== $name: $status" >>"$log"
    if [[ $status != ok ]]; then
        { echo; echo "## $name: $status, last lines of its output"; tail -c +"$from" "$log" | tail -n 12; } >>"$NOTES"
    fi
    record "$name" "$status" $((SECONDS - t0)) "$(basename "$log")"
}

stage_env() {
    local f=$OUT/env.txt
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
            --format=csv 2>&1 || echo "nvidia-smi failed"
        timeout 90 "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", sys.version.split()[0], sys.executable, platform.machine())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB")
import triton
print("triton", triton.__version__)
import importlib.util as iu
for dist, mod in [("fla-core", "fla"), ("deepspeed", "deepspeed"), ("pydantic", "pydantic"),
                  ("mosaicml-streaming", "streaming"), ("datasets", "datasets"), ("pytest", "pytest"),
                  ("pytest-timeout", "pytest_timeout"), ("sentencepiece", "sentencepiece"),
                  ("numpy", "numpy")]:
    try:
        ver = md.version(dist)
    except md.PackageNotFoundError:
        ver = "(no metadata)"
    print(f"  {dist} {ver}", "" if iu.find_spec(mod) else f"- '{mod}' not importable")
EOF
    } >>"$f" 2>&1
}

stage_wheels() {
    local f=$OUT/env.txt w
    shopt -s nullglob
    local wheels=("$WHEELS_DIR"/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        echo "wheels: none in '$WHEELS_DIR' (carry a folder of wheels and set WHEELS_DIR to use it)" >>"$f"
        return 0
    fi
    echo "wheels: installing ${#wheels[@]} from $WHEELS_DIR into $SITE" >>"$f"
    [[ ":$PYTHONPATH:" == *":$SITE:"* ]] || export PYTHONPATH="$SITE:$PYTHONPATH"
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" >>"$f" 2>&1; then
        return 0
    fi
    # one bad wheel (wrong Python tag, say) should not cost the others: one at a time
    local bad=0
    for w in "${wheels[@]}"; do
        timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$w" >>"$f" 2>&1 || { echo "wheels: FAILED $w" >>"$f"; bad=1; }
    done
    return $bad
}

# the test modules that hold GPU tests: collecting only these keeps an import error in an
# unrelated module (a package the GPU machine lacks) from stopping the run. The kernels'
# tolerance tests first (GatedDeltaProduct, then SSD), the model and training tests after.
gpu_test_modules() {
    local first=(tests/test_triton_gated_delta_product.py tests/test_triton_ssd.py tests/test_triton_*.py
                 tests/test_kernels_*.py tests/test_*.py)
    grep -l "pytest.mark.gpu" "${first[@]}" 2>/dev/null | awk '!seen[$0]++'
}

main() {
    local t0 st
    # wheels first, so that env.txt lists the versions the stages will import
    if wanted wheels; then
        t0=$SECONDS
        if stage_wheels; then st=ok; else st="failed"; fi
        record wheels "$st" $((SECONDS - t0)) "env.txt"
    fi
    if wanted env; then
        t0=$SECONDS
        if stage_env; then st=ok; else st="failed"; fi
        record env "$st" $((SECONDS - t0)) "env.txt"
    fi

    local pytest_args=() timeout_opt=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout=150)
    if [[ -n ${PYTEST_ARGS:-} ]]; then
        read -r -a pytest_args <<<"$PYTEST_ARGS"
    else
        mapfile -t pytest_args < <(gpu_test_modules)
    fi
    local gdp=$OUT/bench_gdp.log scan=$OUT/bench_scan_conv_ssd.log
    # shellcheck disable=SC2086  # the *_ARGS variables are word-split on purpose
    {
        run_stage warm 150 "$OUT/env.txt" "$PY" -m bench.warm_kernels ${WARM_ARGS:-}
        run_stage gdp 150 "$gdp" "$PY" -m bench.bench_gated_delta_product \
            ${GDP_ARGS:---target --profile} --results "$RESULTS"
        run_stage gdp_more 120 "$gdp" "$PY" -m bench.bench_gated_delta_product \
            ${GDP_MORE_ARGS:---target --no-fla --torch --variants half_dots,half_dots+half+save_wy,onekernel,w8,half,inv_tf32,bv32,save_wy} --results "$RESULTS"
        local probe
        probe=$(cap_for train 60)
        if wanted train && ! timeout "$((probe > 5 ? probe : 5))" "$PY" -c "import deepspeed" >/dev/null 2>&1; then
            record train "skipped" 0 "deepspeed does not import: carry its wheels (bench/RESULTS.md)"
        else
            # four runs: GDP with ours then fla (the comparison first, in case the cap hits), Mamba2, Griffin
            run_stage train 180 "$OUT/bench_train.log" "$PY" -m bench.bench_train \
                ${TRAIN_ARGS:---presets gated_deltaproduct-1.3b mamba2-1.3b griffin-1.3b --seq-len 4096 --micro-batch 1 --steps 10 --warmup 3} \
                --results "$RESULTS"
        fi
        run_stage ssd 120 "$scan" "$PY" -m bench.bench_scan_conv_ssd \
            ${SSD_ARGS:---ops ssd --tokens 32768 --seqlen 4096 --no-torch --variants half_dots,chunk16,chunk16s64,chunk32s32 --profile} --results "$RESULTS"
        run_stage scan 60 "$scan" "$PY" -m bench.bench_scan_conv_ssd \
            ${SCAN_ARGS:---ops linear_recurrence --tokens 32768 --seqlen 4096 --variants bt64,bt128,bt256,prefetch,bd16,bd16prefetch} --results "$RESULTS"
        run_stage conv 40 "$scan" "$PY" -m bench.bench_scan_conv_ssd \
            ${CONV_ARGS:---ops causal_conv1d,rms_norm,gated_activation,l2_normalize,rg_lru_gates --tokens 32768 --seqlen 4096} --results "$RESULTS"
        run_stage pytest 150 "$OUT/pytest.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs \
            --continue-on-collection-errors --junitxml="$OUT/pytest_junit.xml" "${timeout_opt[@]}" \
            "${pytest_args[@]}"
        run_stage gdp_grid 600 "$gdp" "$PY" -m bench.bench_gated_delta_product \
            ${GDP_GRID_ARGS:---tokens 32768 --heads 16 --headdim 64,128,256 --nh 1,2,3} --results "$RESULTS"
    }
}

write_summary() {
    local f hits
    {
        echo
        echo "total $((SECONDS - START))s of GPU_SESSION_BUDGET_S=${BUDGET}; stages: $STAGES;" \
            "failed:${FAILED_STAGES:- none}; files in $OUT"
        cat "$NOTES"
        if [[ -s $OUT/env.txt ]] && grep -q " FAILED " "$OUT/env.txt"; then  # warm's failed configs
            echo; echo "## warm: configurations that did not compile (their stages compile them)"
            grep " FAILED " "$OUT/env.txt" | head -n 20
        fi
        if [[ -s $OUT/pytest.log ]]; then
            echo; echo "## pytest -m gpu"
            grep -E '^(FAILED|ERROR|SKIPPED) |Interrupted|Timeout|^=* ?[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' \
                "$OUT/pytest.log" | tail -n 40
        fi
        for f in bench_gdp.log bench_scan_conv_ssd.log bench_train.log; do
            [[ -s $OUT/$f ]] || continue
            hits=$(grep -E 'failed \(|unavailable|not importable' "$OUT/$f" | sort | uniq -c | head -n 20)
            [[ -z $hits ]] || printf '\n## %s: comparators missing or failed\n%s\n' "$f" "$hits"
        done
        if [[ -s $OUT/bench_train.log ]]; then
            echo; echo "## bench_train"
            grep -E '^\{' "$OUT/bench_train.log"
        fi
        if [[ -s $RESULTS ]]; then
            echo; echo "## results.md"
            cat "$RESULTS"
        fi
    } >>"$SUMMARY" 2>&1
}

main
write_summary
echo "---- $SUMMARY"
cat "$SUMMARY"
[[ -z $FAILED_STAGES ]]
