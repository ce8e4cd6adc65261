#!/usr/bin/env bash
# Evaluate every complete checkpoint of a run as one job array:
#   slurm/eval_sweep.sh RUN_CHECKPOINT_DIR [SUITE] [extra sbatch options ...]
# Array task i evaluates the i-th complete checkpoint (oldest first); see slurm/eval.sbatch.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: slurm/eval_sweep.sh RUN_CHECKPOINT_DIR [SUITE] [sbatch options ...]" >&2
    exit 2
fi
PY=${LINRNN_PYTHON:-python}
RUN=$1; shift
SUITE=${LINRNN_EVAL_SUITE:-state_tracking}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then SUITE=$1; shift; fi  # an option is not a suite
N=$("$PY" -m launch.checkpoints count "$RUN")
if [ "$N" -eq 0 ]; then
    echo "no complete checkpoint in $RUN" >&2
    exit 1
fi
exec sbatch --array="0-$((N - 1))" "$@" "$(dirname "$0")/eval.sbatch" "$RUN" "$SUITE"
