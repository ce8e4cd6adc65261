#!/usr/bin/env bash
# The architecture benchmarks of issue #8 on one GPU, in one command: MQAR (Zoology) and the
# S3 / A5 word problems (DeltaProduct) for GatedDeltaProduct (n_h 1-3, eigenvalues in [-1,1]
# and [0,1]), Mamba2 (both ranges) and Griffin, trained from scratch with `python -m
# evals.cli`, one run per (task, model, learning rate), several runs at once on the GPU.
# Every stage and every run has a time cap, so a short lease always ends with results:
# runs start in the order given (the most telling comparisons first); each run gets
# `--time-limit` EVALS_RUN_MARGIN_S under its stage's cap, so it stops training early, is
# still scored and saved, and is marked "stopped by time limit" (converged column: "time
# limit"); a run still going at the cap itself is killed and counted as timed out (its
# seeds that finished are kept), the runs not started are listed as skipped, and the
# results are merged after every stage.
#
#   bash bench/gpu_evals.sh                 # all default stages, at most ~9 minutes
#   EVALS_STAGES=env,preflight,s3 S3_STEPS=4000 bash bench/gpu_evals.sh
#
# Stages (default order): env preflight s3 mqar a5
#   env        GPU, driver, Python, torch, triton -> evals.log
#   preflight  per model, all at once: forward+backward at the run shapes with the Triton
#              kernels and with the PyTorch reference (loss and gradients compared, ms for
#              both, timed while the other checks run); a model whose check fails or times
#              out runs its benchmarks on the reference (LINRNN_KERNEL_BACKEND=torch; the
#              run tables' "kernels" column says torch, auto meaning Triton on CUDA). Also
#              fills Triton's cache before the runs.
#   s3, a5     group word problem, 1 layer, trained at length 128, tested to 512 (4x);
#              cumulative sequence accuracy by length (the suites' defaults)
#   mqar       2 layers, vocab 8192, trained on 64x4,128x8,256x16 (seq_len x pairs), tested
#              on those and 512x16,512x32,512x64; per-query accuracy; learning-rate sweep
#
# Model tokens (<STAGE>_MODELS, comma-separated, run in this order):
#   gdp<n>:neg / gdp<n>:pos  GatedDeltaProduct (gated_deltaproduct-tiny shapes: 4 heads of
#                            head_dim 32) with n_h = n, eigenvalues in [-1,1] / [0,1]
#   mamba2:neg / mamba2:pos  Mamba2 (mamba2-tiny shapes: d_state 32, head_dim 32, no MLP)
#   griffin                  Griffin (griffin-tiny: RG-LRU width d_model, gated GeLU MLP);
#                            pattern RA (recurrent, then local MQA attention with window 256)
#                            at 2+ layers, R at 1 layer
# Every model gets n_layers=<STAGE>_LAYERS and d_model=EVALS_D_MODEL.
#
# Environment:
#   OUT                  output folder (the device tool sets it; default runs/gpu_evals)
#   EVALS_STAGES         comma-separated stages to run, in the default order
#   EVALS_BUDGET_S       all stages together, seconds (default 540); a stage's cap is cut to
#                        what is left less 15 s for the last merge, and a stage is skipped
#                        with under 20 s left
#   EVALS_CAP_<STAGE>    one stage's cap in seconds (defaults: env 60, preflight 90, s3 150,
#                        mqar 200, a5 110; they add up to more than the budget on purpose)
#   EVALS_PARALLEL       runs at once on the GPU (default 4; tiny models leave it idle)
#   EVALS_THREADS        torch CPU threads per run (default 3; MQAR draws its data on the CPU)
#   EVALS_MIN_RUN_S      do not start a run with less than this left in its stage (default 30)
#   EVALS_RUN_MARGIN_S   a run's --time-limit is this much under the time left in its stage
#                        (default 20: covers Python start-up, which --time-limit does not
#                        count, about 10 s on a loaded CPU, and a last step that runs over)
#   EVALS_DEVICE         cuda, cpu, ... (default auto: cuda when available)
#   EVALS_D_MODEL        d_model of every model (default 128)
#   EVALS_SEEDS          seeds of every run, comma-separated (default 0)
#   EVALS_PREFLIGHT_SHAPE  batch x sequence length of the preflight's step (default 64x256)
#   EVALS_KERNEL_BACKEND auto (default: the preflight picks per model; without the preflight
#                        stage, Triton on CUDA), triton or torch (forced for every run)
#   EVALS_GDP_OVERRIDES EVALS_MAMBA2_OVERRIDES EVALS_GRIFFIN_OVERRIDES
#                        extra model overrides per family, space-separated key=value
#   EVALS_WORK           keep every run's folder here (default: a temporary folder, removed)
#   EVALS_MAX_FILES      files the caller takes back from $OUT (default 8, the device tool's)
#   <STAGE>_MODELS       model tokens (S3_MODELS, MQAR_MODELS, A5_MODELS)
#   <STAGE>_STEPS        training step cap per run (default s3 2500, mqar 1000, a5 1500);
#                        a run also stops at 99% validation accuracy
#   <STAGE>_LRS          learning rates, comma-separated; runs go learning-rate-major, so every
#                        model gets the first before any gets the second (s3, a5 3e-3;
#                        mqar 3e-3,1e-3)
#   <STAGE>_BATCH        batch size (s3, a5 256; mqar 64)
#   <STAGE>_LAYERS       layers (s3, a5 1; mqar 2)
#   MQAR_TRAIN MQAR_TEST MQAR grids, e.g. 64x4,128x8
#   <STAGE>_ARGS         more evals.cli arguments for the stage's runs (word-split), e.g.
#                        "--train-lengths 3:40 --eval-size 256"
#   PYTHON               interpreter (default python3)
#
# Files under $OUT (the device tool returns at most 8): summary.txt (stage table, every
# run's status and speed, preflight, failures, then results.md; printed at the end too),
# results.md (one table per task, best learning rate per model, beside a table of runs),
# results.json (settings, per-task summaries, every run's record), evals.log (environment,
# preflight and every run's output), and one PNG per task (s3.png, mqar.png, a5.png; packed
# into plots.tar.gz instead if they would make more than 8 files).
# Exit status: 0 when every run that started finished, 1 when one failed or hit its cap,
# 2 for bad arguments.
set -u -o pipefail

ALL_STAGES="env preflight s3 mqar a5"
DEFAULT_STAGES="env,preflight,s3,mqar,a5"
BENCH_STAGES="s3 mqar a5"
MAX_FILES=${EVALS_MAX_FILES:-8}  # the device tool returns at most 8

source "$(dirname "$0")/gpu_common.sh" || exit 2
gpu_script_start "$0" EVALS_STAGES "$@"
OUT=${OUT:-$REPO/runs/gpu_evals}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
BUDGET=${EVALS_BUDGET_S:-540}
STAGES=${EVALS_STAGES:-$DEFAULT_STAGES}
PARALLEL=${EVALS_PARALLEL:-4}
PREFLIGHT_SHAPE=${EVALS_PREFLIGHT_SHAPE:-64x256}
THREADS=${EVALS_THREADS:-3}
MIN_RUN_S=${EVALS_MIN_RUN_S:-30}
RUN_MARGIN_S=${EVALS_RUN_MARGIN_S:-20}
DEVICE=${EVALS_DEVICE:-auto}
D_MODEL=${EVALS_D_MODEL:-128}
SEEDS=${EVALS_SEEDS:-0}
BACKEND=${EVALS_KERNEL_BACKEND:-auto}
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# per-stage settings: <STAGE>_<KEY> from the environment, else these defaults
declare -A DEF=(
    [S3_MODELS]="gdp2:neg,gdp1:neg,gdp2:pos,mamba2:neg,gdp3:neg,gdp1:pos,mamba2:pos,gdp3:pos,griffin"
    [S3_STEPS]=2500 [S3_LRS]=3e-3 [S3_BATCH]=256 [S3_LAYERS]=1 [S3_ARGS]=""
    [MQAR_MODELS]="gdp1:neg,mamba2:pos,griffin,gdp2:neg,gdp3:neg,gdp1:pos,mamba2:neg,gdp2:pos,gdp3:pos"
    [MQAR_STEPS]=1000 [MQAR_LRS]="3e-3,1e-3" [MQAR_BATCH]=64 [MQAR_LAYERS]=2 [MQAR_ARGS]=""
    [MQAR_TRAIN]="64x4,128x8,256x16" [MQAR_TEST]="64x4,128x8,256x16,512x16,512x32,512x64"
    [A5_MODELS]="gdp3:neg,gdp2:neg,gdp1:neg,mamba2:neg,gdp3:pos,gdp2:pos,gdp1:pos,mamba2:pos,griffin"
    [A5_STEPS]=1500 [A5_LRS]=3e-3 [A5_BATCH]=256 [A5_LAYERS]=1 [A5_ARGS]=""
)
setting() {  # setting STAGE KEY -> $<STAGE>_<KEY> or its default
    local var="${1^^}_$2"
    echo "${!var-${DEF[$var]-}}"
}

die() { echo "gpu_evals.sh: $*" >&2; exit 2; }
check_stages EVALS_STAGES "$STAGES" "$ALL_STAGES"
for v in BUDGET PARALLEL THREADS MIN_RUN_S RUN_MARGIN_S D_MODEL MAX_FILES; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive whole number, got '${!v}'"
done
[[ $PREFLIGHT_SHAPE =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] || die "EVALS_PREFLIGHT_SHAPE must be BATCHxSEQ_LEN, e.g. 64x256, got '$PREFLIGHT_SHAPE'"
[[ $BACKEND =~ ^(auto|triton|torch)$ ]] || die "EVALS_KERNEL_BACKEND must be auto, triton or torch, got '$BACKEND'"
[[ $SEEDS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "EVALS_SEEDS must be comma-separated whole numbers, got '$SEEDS'"

for s in $ALL_STAGES; do
    var="EVALS_CAP_${s^^}"
    [[ ${!var:-0} =~ ^[0-9]+$ ]] || die "$var must be whole seconds, got '${!var}'"
done
[[ -n ${EPOCHSECONDS:-} ]] || die "needs bash 5 or newer (EPOCHSECONDS), this is $BASH_VERSION"

wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

# variant_args TOKEN LAYERS: sets VARGS to the model and its overrides for evals.cli
variant_args() {
    local tok=$1 layers=$2 extra="" o
    case $tok in
        gdp[1-9]:neg|gdp[1-9]:pos)
            VARGS=(gated_deltaproduct-tiny --n-h "${tok:3:1}" --neg-eigval "$([[ $tok == *:neg ]] && echo true || echo false)")
            extra=${EVALS_GDP_OVERRIDES:-} ;;
        mamba2:neg|mamba2:pos)
            VARGS=(mamba2-tiny --neg-eigval "$([[ $tok == *:neg ]] && echo true || echo false)")
            extra=${EVALS_MAMBA2_OVERRIDES:-} ;;
        griffin)
            VARGS=(griffin-tiny -o "pattern=$( ((layers >= 2)) && echo RA || echo R)"
                   -o "rglru.lru_width=$D_MODEL" -o "attention.head_dim=$((D_MODEL / 4))")
            extra=${EVALS_GRIFFIN_OVERRIDES:-} ;;
        *) return 1 ;;
    esac
    VARGS+=(-o "n_layers=$layers" -o "d_model=$D_MODEL")
    for o in $extra; do VARGS+=(-o "$o"); done
}

# check every stage's settings before anything runs (a typo should cost no GPU time)
for st in $BENCH_STAGES; do
    wanted "$st" || continue
    for key in STEPS BATCH LAYERS; do
        val=$(setting "$st" "$key")
        [[ $val =~ ^[0-9]+$ && $val -gt 0 ]] || die "${st^^}_$key must be a positive whole number, got '$val'"
    done
    [[ $(setting "$st" LRS) =~ ^[0-9.eE+-]+(,[0-9.eE+-]+)*$ ]] || die "${st^^}_LRS must be comma-separated numbers, got '$(setting "$st" LRS)'"
    models=$(setting "$st" MODELS)
    [[ -n ${models//[, ]/} ]] || die "${st^^}_MODELS is empty"
    for tok in ${models//,/ }; do
        variant_args "$tok" 1 || die "unknown model '$tok' in ${st^^}_MODELS; use gdp<n>:neg, gdp<n>:pos, mamba2:neg, mamba2:pos or griffin"
    done
done
if wanted mqar; then
    for key in TRAIN TEST; do
        [[ $(setting mqar "$key") =~ ^[0-9]+x[0-9]+(,[0-9]+x[0-9]+)*$ ]] || die "MQAR_$key must look like 64x4,128x8, got '$(setting mqar "$key")'"
    done
fi

if [[ -n ${EVALS_WORK:-} ]]; then
    WORK=$EVALS_WORK
    mkdir -p "$WORK" || exit 2
    rm -rf "${WORK:?}"/{env.txt,jobs.tsv,merge.log,preflight,s3,mqar,a5,plots}  # our own names only
else
    WORK=$(mktemp -d /tmp/gpu_evals.XXXXXX) || exit 2
fi
NOTES=$(mktemp)  # the end of each failed run's output, for the summary
cleanup() { rm -f "$NOTES"; [[ -n ${EVALS_WORK:-} ]] || rm -rf "$WORK"; }
trap cleanup EXIT
for f in summary.txt results.md results.json evals.log plots.tar.gz s3.png mqar.png a5.png; do
    rm -f "${OUT:?}/$f"  # a rerun into the same folder starts clean
done
: >"$SUMMARY"
: >"$WORK/jobs.tsv"

# A command started in the background inherits SIGINT as ignored, and then Python installs
# no KeyboardInterrupt handler: reset it so the caps' SIGINT reaches the runs.
SIGRESET=()
env --default-signal=INT true 2>/dev/null && SIGRESET=(env --default-signal=INT)

START=$EPOCHSECONDS
FAILED=0

# cap_for STAGE DEFAULT -> the stage's cap: EVALS_CAP_<STAGE> or DEFAULT, cut to the budget
# left less the reserve for the final merge
cap_for() {
    local var="EVALS_CAP_${1^^}" cap left
    cap=${!var:-$2}
    left=$((BUDGET - (EPOCHSECONDS - START) - 15))
    ((cap > left)) && cap=$left
    echo $((cap < 0 ? 0 : cap))
}

# left_s DEADLINE -> whole seconds until DEADLINE, at least 1 (timeout 0 would mean no limit)
left_s() { local l=$(($1 - EPOCHSECONDS)); echo $((l < 1 ? 1 : l)); }

record() {  # record STAGE STATUS SECONDS NOTE
    printf '%-9s %-28s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

stage_env() {
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
        if command -v nvidia-smi >/dev/null; then
            timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
                | sed 's/^/gpu: /'
        else
            echo "gpu: none (no nvidia-smi)"
        fi
        timeout 60 "$PY" - <<'EOF'
import platform, sys
print("python:", sys.version.split()[0], sys.executable, platform.machine())
import torch
print("torch:", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.1f} GiB")
try:
    import triton
    print("triton:", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
import os
print("cpus:", os.cpu_count())
EOF
    } >"$WORK/env.txt" 2>&1
}

# the models of every wanted benchmark stage, each once, in first-use order
all_tokens() {
    local st tok seen=" "
    for st in $BENCH_STAGES; do
        wanted "$st" || continue
        for tok in $(setting "$st" MODELS | tr ',' ' '); do
            [[ $seen == *" $tok "* ]] || { seen+="$tok "; echo "$tok"; }
        done
    done
}

# preflight_one TOKEN DEADLINE: forward+backward with auto and torch backends, compared
preflight_one() {
    local tok=$1 deadline=$2 f
    f=$WORK/preflight/${tok//:/_}.txt
    variant_args "$tok" 2
    EVALS_PREFLIGHT_SHAPE=$PREFLIGHT_SHAPE timeout -s INT -k 10 "$(left_s "$deadline")" "${SIGRESET[@]}" \
        "$PY" - "$tok" "$DEVICE" "${VARGS[@]}" >"$f" 2>&1 <<'EOF'
"""Kernel check for one model: the Triton path (backend auto) against the PyTorch reference."""
import math, os, sys, time
import torch
from evals.bench import expand_variants, model_config
from evals.cli import _bools, build_parser
from pretrain.models import build_model

tok, device = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)  # every model's check runs at once
args = build_parser().parse_args([*sys.argv[3:], "--suite", "s3", "--out", "unused"])
[variant] = expand_variants(args.model, args.override, _bools(args.neg_eigval), args.n_h)
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
B, T = (int(x) for x in os.environ["EVALS_PREFLIGHT_SHAPE"].split("x"))
vocab = 64
torch.manual_seed(0)
model = build_model(model_config(variant.model, [*variant.overrides, f"vocab_size={vocab}"])).to(device)
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)
labels = torch.randint(0, vocab, (B, T), generator=gen).to(device)


def step(backend: str) -> tuple[float, torch.Tensor, float]:
    if backend == "auto":
        os.environ.pop("LINRNN_KERNEL_BACKEND", None)
    else:
        os.environ["LINRNN_KERNEL_BACKEND"] = backend
    times = []
    for _ in range(4):  # the first compiles and warms up
        model.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model.loss(ids, labels)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss), grads.double(), 1e3 * min(times[1:])


try:
    la, ga, ta = step("auto")
    lt, gt, tt = step("torch")
    cos = float(torch.nn.functional.cosine_similarity(ga, gt, dim=0))
    rel = float((ga - gt).norm() / gt.norm().clamp_min(1e-30))
    good = math.isfinite(la) and bool(torch.isfinite(ga).all()) and abs(la - lt) <= 1e-2 * max(1.0, abs(lt)) \
        and cos >= 0.99 and rel <= 0.1
    where = device if device.startswith("cuda") else f"{device} (no Triton path: both are the reference)"
    print(f"{'ok' if good else 'mismatch'} {tok} on {where}: loss {la:.5f} vs reference {lt:.5f}, "
          f"grad cosine {cos:.5f}, grad rel diff {rel:.2e}; fwd+bwd B{B} T{T} {ta:.1f} ms vs reference {tt:.1f} ms")
except Exception as e:  # any failure of the fast path sends this model to the reference
    print(f"error {tok}: {type(e).__name__}: {e}")
    raise
EOF
}

stage_preflight() {
    local cap=$1 deadline tok f first ok=1
    deadline=$((EPOCHSECONDS + cap))
    mkdir -p "$WORK/preflight"
    local toks
    mapfile -t toks < <(all_tokens)
    for tok in "${toks[@]}"; do
        preflight_one "$tok" "$deadline" &
    done
    wait
    for tok in "${toks[@]}"; do
        f=$WORK/preflight/${tok//:/_}.txt
        first=$(grep -m1 -E '^(ok|mismatch|error) ' "$f" 2>/dev/null || true)
        [[ -n $first ]] || first="error $tok: no verdict (timed out or crashed; see evals.log)"
        echo "$first" >"$WORK/preflight/${tok//:/_}.verdict"
        [[ $first == ok* ]] || ok=0
        echo "preflight: $first" >>"$SUMMARY"
    done
    ((ok))
}

# backend_for TOKEN -> auto, triton or torch
backend_for() {
    local v=$WORK/preflight/${1//:/_}.verdict
    if [[ $BACKEND != auto ]]; then echo "$BACKEND"
    elif [[ ! -f $v ]] || grep -q '^ok' "$v"; then echo auto
    else echo torch
    fi
}

# run_job STAGE ID TOKEN LR DEADLINE: one evals.cli run (in the background), its status -> jobs.tsv
run_job() {
    local st=$1 id=$2 tok=$3 lr=$4 deadline=$5 layers backend dir t0 rc status limit
    local -a args envs extra
    layers=$(setting "$st" LAYERS)
    variant_args "$tok" "$layers"
    backend=$(backend_for "$tok")
    dir=$WORK/$st/$id
    limit=$(($(left_s "$deadline") - RUN_MARGIN_S))
    args=("${VARGS[@]}" --suite "$st" --out "$dir" --steps "$(setting "$st" STEPS)"
          --batch-size "$(setting "$st" BATCH)" --lr "$lr" --seeds "$SEEDS" --device "$DEVICE"
          --threads "$THREADS" --time-limit "$((limit < 1 ? 1 : limit))" --no-progress)
    if [[ $st == mqar ]]; then
        args+=(--mqar-train "$(setting mqar TRAIN)" --mqar-test "$(setting mqar TEST)")
    fi
    read -r -a extra <<<"$(setting "$st" ARGS)"
    args+=("${extra[@]}")
    if [[ $backend == auto ]]; then envs=(-u LINRNN_KERNEL_BACKEND); else envs=("LINRNN_KERNEL_BACKEND=$backend"); fi
    echo "== $st/$id backend=$backend: $PY -m evals.cli ${args[*]}" >"$dir.log"
    t0=$EPOCHSECONDS
    timeout -s INT -k 10 "$(left_s "$deadline")" env "${envs[@]}" "${SIGRESET[@]}" \
        "$PY" -m evals.cli "${args[@]}" >>"$dir.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status="failed rc=$rc" ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$st" "$id" "$tok" "$lr" "$backend" "$status" \
        "$((EPOCHSECONDS - t0))" >>"$WORK/jobs.tsv"
}

# stage_bench STAGE CAP: every (lr, model) run of the stage, PARALLEL at once, until the cap
stage_bench() {
    local st=$1 cap=$2 deadline lr tok i=0 id n_ok=0 n_run=0 n_skip=0 line
    deadline=$((EPOCHSECONDS + cap))
    mkdir -p "$WORK/$st"
    {
        echo "models: $(setting "$st" MODELS)"
        echo "n_layers: $(setting "$st" LAYERS); d_model: $D_MODEL; batch: $(setting "$st" BATCH);" \
            "max steps: $(setting "$st" STEPS) (stop at 99% validation accuracy); learning rates: $(setting "$st" LRS);" \
            "seeds: $SEEDS"
        [[ $st == mqar ]] && echo "train: $(setting mqar TRAIN); test: $(setting mqar TEST)"
        [[ -n $(setting "$st" ARGS) ]] && echo "extra evals.cli arguments: $(setting "$st" ARGS)"
        for tok in $(setting "$st" MODELS | tr ',' ' '); do
            variant_args "$tok" "$(setting "$st" LAYERS)"
            echo "model $tok: ${VARGS[*]} (kernels: $(backend_for "$tok"))"
        done
    } >"$WORK/$st/settings.txt"
    for lr in $(setting "$st" LRS | tr ',' ' '); do
        for tok in $(setting "$st" MODELS | tr ',' ' '); do
            i=$((i + 1))
            id=$(printf '%02d_%s_lr%s' "$i" "${tok//:/_}" "$lr")
            while (($(jobs -rp | wc -l) >= PARALLEL)); do wait -n; done
            if ((deadline - EPOCHSECONDS < MIN_RUN_S)); then
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$st" "$id" "$tok" "$lr" "-" "skipped" 0 >>"$WORK/jobs.tsv"
                continue
            fi
            run_job "$st" "$id" "$tok" "$lr" "$deadline" &
        done
    done
    wait
    while IFS=$'\t' read -r -a line; do
        [[ ${line[0]} == "$st" ]] || continue
        if [[ ${line[5]} == skipped ]]; then n_skip=$((n_skip + 1)); continue; fi
        n_run=$((n_run + 1))
        if [[ ${line[5]} == ok ]]; then
            n_ok=$((n_ok + 1))
        else
            { echo; echo "## $st/${line[1]}: ${line[5]}, last lines of its output"
              tail -n 12 "$WORK/$st/${line[1]}.log"; } >>"$NOTES"
        fi
    done <"$WORK/jobs.tsv"
    STAGE_NOTE="$n_ok of $n_run started runs finished, $n_skip not started"
    ((n_ok == n_run))
}

# jobs.tsv (written as runs end) in stage order, then run order
sorted_jobs() {
    local st
    for st in $BENCH_STAGES; do
        awk -F '\t' -v st="$st" '$1 == st' "$WORK/jobs.tsv" | sort -t $'\t' -k2,2
    done
}

# merge every finished run into $OUT: results.md, results.json, PNGs, evals.log
merge() {
    local rc
    timeout 120 "$PY" - "$WORK" "$OUT" "$MAX_FILES" "$BENCH_STAGES" >>"$WORK/merge.log" 2>&1 <<'EOF'
"""Combine the per-run results.json files into one report (the stage order, then run order)."""
import json, shutil, sys, tarfile
from pathlib import Path

from evals.bench import RunRecord, summarise
from evals.report import benchmark_markdown, benchmark_plots, write_json

work, out, max_files, stages = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
jobs = [dict(zip(["stage", "id", "model", "lr", "kernels", "status", "wall_s"], ln.split("\t")))
        for ln in (work / "jobs.tsv").read_text().splitlines() if ln.strip()]
jobs.sort(key=lambda j: (stages.index(j["stage"]), j["id"]))
env = (work / "env.txt").read_text() if (work / "env.txt").exists() else ""
info = dict(ln.split(": ", 1) for ln in env.splitlines() if ": " in ln)
preflight = [p.read_text().strip() for p in sorted((work / "preflight").glob("*.verdict"))]
md = ["# GPU evals (`bench/gpu_evals.sh`)", ""]
md += [f"- {k}: {info[k]}" for k in ("date", "commit", "gpu", "torch", "triton") if k in info]
md += [f"- preflight: {p}" for p in preflight]
result = {"kind": "gpu_evals", "env": info, "preflight": preflight, "tasks": {}, "jobs": jobs, "runs": []}
plot_dir = work / "plots"
shutil.rmtree(plot_dir, ignore_errors=True)
plot_dir.mkdir()
for st in stages:
    sjobs = [j for j in jobs if j["stage"] == st]
    if not sjobs:
        continue
    settings = (work / st / "settings.txt").read_text().splitlines()
    records, headers = [], {}
    for j in sjobs:
        j["steps"] = j["converged"] = j["train_s"] = j["ms_per_step"] = ""
        f = work / st / j["id"] / "results.json"
        if not f.exists():  # a run killed at the cap keeps its finished seeds (written after each)
            continue
        res = json.loads(f.read_text())
        if not res["runs"]:
            continue
        headers[j["id"]] = res["header"]
        for r in res["runs"]:
            r["job"] = j["id"]
            records.append(r)
        tr = [r["train"] for r in res["runs"]]
        j["steps"] = "/".join(str(t["steps"]) for t in tr)
        j["converged"] = "/".join("yes" if t["converged"] else "time limit" if t.get("stopped_by_time_limit")
                                  else "no" for t in tr)
        j["train_s"] = "/".join(f"{t['seconds']:.0f}" for t in tr)
        j["ms_per_step"] = "/".join(f"{1e3 * t['seconds'] / max(t['steps'], 1):.1f}" for t in tr)
    md += ["", f"## {st}", ""] + [f"- {s}" for s in settings]
    md += ["", "| run | model | lr | kernels | status | steps | converged | train s | ms/step (with validation) | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {j['id']} | {j['model']} | {j['lr']} | {j['kernels']} | {j['status']} | {j['steps']} | "
           f"{j['converged']} | {j['train_s']} | {j['ms_per_step']} | {j['wall_s']} |" for j in sjobs]
    rows = summarise([RunRecord(**{k: v for k, v in r.items() if k != "job"}) for r in records]) if records else []
    if rows:
        tried = {}
        for r in records:
            tried.setdefault(r["variant"], set()).add(r["lr"])
        body = benchmark_markdown(rows, {}).split("\n")
        md += ["", *[ln.replace("## ", "### ", 1) if ln.startswith("## ") else ln for ln in body[2:]]]
        md += ["Learning rates tried: " + "; ".join(f"{v}: {', '.join(f'{x:g}' for x in sorted(lrs))}"
                                                  for v, lrs in tried.items())]
        benchmark_plots(rows, plot_dir)
    else:
        md += ["", "No run of this stage finished."]
    result["tasks"][st] = {"settings": settings, "headers": headers, "summary": rows}
    result["runs"] += records
(out / "results.md").write_text("\n".join(md) + "\n")
write_json(out / "results.json", result)
# the device tool returns at most max_files files: PNGs one by one while they fit, else one tarball
pngs = sorted(plot_dir.glob("*.png"))
for p in list(out.glob("*.png")) + [out / "plots.tar.gz"]:
    p.unlink(missing_ok=True)
fixed = ["summary.txt", "results.md", "results.json", "evals.log"]
if len(fixed) + len(pngs) <= max_files:
    for p in pngs:
        shutil.copy(p, out / p.name)
elif pngs:
    with tarfile.open(out / "plots.tar.gz", "w:gz") as tf:
        for p in pngs:
            tf.add(p, arcname=p.name)
print(f"merged {len(result['runs'])} runs of {len(jobs)} jobs; {len(pngs)} plots")
EOF
    rc=$?
    ((rc == 0)) || echo "merge failed (rc=$rc): see the end of evals.log" >>"$SUMMARY"
    # evals.log: environment, preflight, then every run's output in run order
    {
        echo "#### environment"; cat "$WORK/env.txt" 2>/dev/null
        local f st id
        for f in "$WORK"/preflight/*.txt; do
            [[ -e $f ]] && { echo; echo "#### preflight $(basename "$f" .txt)"; cat "$f"; }
        done
        while IFS=$'\t' read -r st id _; do
            [[ -f $WORK/$st/$id.log ]] && { echo; echo "#### $st/$id"; cat "$WORK/$st/$id.log"; }
        done < <(sorted_jobs)
        echo; echo "#### merge"; cat "$WORK/merge.log" 2>/dev/null
    } >"$OUT/evals.log"
}

main() {
    local cap t0 st
    if wanted env; then
        cap=$(cap_for env 60)
        t0=$EPOCHSECONDS
        if ((cap < 20)); then record env skipped 0 "under 20 s left"
        elif stage_env; then
            record env ok $((EPOCHSECONDS - t0)) "$(grep -m1 '^device:' "$WORK/env.txt" || grep -m1 '^gpu:' "$WORK/env.txt")"
        else
            record env failed $((EPOCHSECONDS - t0)) "see evals.log"
        fi
    fi
    if wanted preflight; then
        cap=$(cap_for preflight 90)
        t0=$EPOCHSECONDS
        if ((cap < 20)); then record preflight skipped 0 "under 20 s left: Triton kernels unchecked"
        elif stage_preflight "$cap"; then record preflight ok $((EPOCHSECONDS - t0)) "every model's kernels agree"
        else record preflight "some models on reference" $((EPOCHSECONDS - t0)) "see preflight lines below"
        fi
    fi
    declare -A caps=([s3]=150 [mqar]=200 [a5]=110)
    for st in $BENCH_STAGES; do
        wanted "$st" || continue
        cap=$(cap_for "$st" "${caps[$st]}")
        t0=$EPOCHSECONDS
        if ((cap < 20)); then
            record "$st" skipped 0 "only ${cap}s of EVALS_BUDGET_S=$BUDGET left"
            continue
        fi
        STAGE_NOTE=""
        if stage_bench "$st" "$cap"; then
            record "$st" ok $((EPOCHSECONDS - t0)) "$STAGE_NOTE (cap ${cap}s)"
        else
            FAILED=1
            record "$st" "incomplete" $((EPOCHSECONDS - t0)) "$STAGE_NOTE (cap ${cap}s)"
        fi
        merge
    done
    [[ -f $OUT/results.md ]] || merge
}

write_summary() {
    {
        echo
        echo "total $((EPOCHSECONDS - START))s of EVALS_BUDGET_S=$BUDGET; stages: $STAGES; parallel $PARALLEL;" \
            "files in $OUT: $(find "$OUT" -maxdepth 1 -type f | wc -l) (at most $MAX_FILES come back)"
        echo
        echo "## runs (stage, run, model, lr, kernels, status, wall s)"
        if command -v column >/dev/null; then sorted_jobs | column -t -s $'\t'; else sorted_jobs; fi
        cat "$NOTES"
        if [[ -s $OUT/results.md ]]; then
            echo; echo "## results.md"; cat "$OUT/results.md"
        fi
    } >>"$SUMMARY" 2>&1
}

main
write_summary
echo "---- $SUMMARY"
cat "$SUMMARY"
((FAILED == 0))
