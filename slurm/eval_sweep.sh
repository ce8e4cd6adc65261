#!/usr/bin/env bash
# Evaluate every complete checkpoint of a run as one job array:
#   slurm/eval_sweep.sh RUN_CHECKPOINT_DIR [SUITE] [sbatch options ...] [-- linrnn-eval options ...]
# Array task i evaluates the i-th complete checkpoint (oldest first) of the list taken now
# (LINRNN_EVAL_STEPS), so checkpoints a running training job prunes meanwhile do not shift
# the others; see slurm/eval.sbatch.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: slurm/eval_sweep.sh RUN_CHECKPOINT_DIR [SUITE] [sbatch options ...] [-- linrnn-eval options ...]" >&2
    exit 2
fi
PY=${LINRNN_PYTHON:-python}
RUN=$1; shift
SUITE=${LINRNN_EVAL_SUITE:-state_tracking}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then SUITE=$1; shift; fi  # an option is not a suite
NAMES=$("$PY" -m launch.checkpoints names "$RUN")
if [ -z "$NAMES" ]; then
    echo "no complete checkpoint in $RUN" >&2
    exit 1
fi
N=$(tr ',' '\n' <<< "$NAMES" | wc -l)
export LINRNN_EVAL_STEPS=$NAMES  # sbatch passes the submitting environment to the job
SBATCH_ARGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SBATCH_ARGS+=("$1"); shift; done
if [ $# -gt 0 ]; then shift; fi  # what follows -- goes to linrnn-eval
exec sbatch --array="0-$((N - 1))" "${SBATCH_ARGS[@]}" "$(dirname "$0")/eval.sbatch" "$RUN" "$SUITE" "$@"
