# Sourced by bench/gpu_session.sh and bench/gpu_evals.sh: the start both share.
#   gpu_script_start SCRIPT STAGES_VAR "$@"
# --help prints SCRIPT's header comment (line 2 to `set -u`); any other argument is refused
# (stages are chosen through STAGES_VAR); then cd to the repo root and set REPO and PY.
gpu_script_start() {
    local script=$1 stages_var=$2
    shift 2
    case "${1:-}" in
        -h|--help) sed -n '2,/^set -u/p' "$script" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        "") ;;
        *) echo "$(basename "$script") takes no arguments (got '$1'); choose stages with $stages_var" >&2
           exit 2 ;;
    esac
    cd "$(dirname "$script")/.." || exit 2
    REPO=$PWD
    PY=${PYTHON:-python3}
}

# check_stages NAME STAGES ALL: exit 2 unless every comma-separated stage in STAGES (the value
# of the variable NAME, or its default) is one of ALL.
check_stages() {
    local var=$1 stages=$2 all=$3 s
    for s in ${stages//,/ }; do
        [[ " $all " == *" $s "* ]] && continue
        echo "unknown stage '$s' in $var; choose from: ${all// /,}" >&2
        exit 2
    done
}
