#!/usr/bin/env bash
# Evaluate every complete checkpoint of a run as one job array:
#   slurm/eval_sweep.sh RUN_CHECKPOINT_DIR [SUITE] [sbatch options ...] [-- linrnn-eval options ...]
# Array task i evaluates the i-th complete checkpoint (oldest first) of the list taken now
# (LINRNN_EVAL_STEPS), so checkpoints a running training job prunes meanwhile do not shift
# the others; see slurm/eval.sbatch. SUITE defaults to $LINRNN_EVAL_SUITE or checkpoint. A
# second job, run once the array has ended, writes every checkpoint's scores side by side
# (python -m evals.sweep: <RUN>/exports/sweep-<SUITE>.md, .json and .png).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: slurm/eval_sweep.sh RUN_CHECKPOINT_DIR [SUITE] [sbatch options ...] [-- linrnn-eval options ...]" >&2
    exit 2
fi
PY=${LINRNN_PYTHON:-python}
RUN=$1; shift
SUITE=${LINRNN_EVAL_SUITE:-checkpoint}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then SUITE=$1; shift; fi  # an option is not a suite
NAMES=$("$PY" -m launch.checkpoints names "$RUN")
if [ -z "$NAMES" ]; then
    echo "no complete checkpoint in $RUN" >&2
    exit 1
fi
N=$(tr ',' '\n' <<< "$NAMES" | wc -l)
export LINRNN_EVAL_STEPS=$NAMES  # sbatch passes the submitting environment to the job
if [ -n "${LINRNN_EVAL_OUT:-}" ]; then  # one folder for every task: they would overwrite each other
    echo "eval_sweep.sh: ignoring LINRNN_EVAL_OUT=$LINRNN_EVAL_OUT: each checkpoint's results go beside its export" \
         "(<RUN>/exports/step_*/eval/<suite>), where the summary reads them" >&2
    unset LINRNN_EVAL_OUT
fi
SBATCH_ARGS=()  # may stay empty: expanded with the [@]+ guard, as bash < 4.4 calls it unbound under set -u
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SBATCH_ARGS+=("$1"); shift; done
if [ $# -gt 0 ]; then shift; fi  # what follows -- goes to linrnn-eval
JOB=$(sbatch --parsable --array="0-$((N - 1))" ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"} "$(dirname "$0")/eval.sbatch" "$RUN" "$SUITE" "$@")
JOB=${JOB%%;*}
echo "Submitted batch job $JOB: $N array task(s), one per checkpoint ($NAMES)"
# once every task has ended (whatever its outcome), the scores of all checkpoints side by side
SUMMARY=$(sbatch --parsable --dependency="afterany:$JOB" ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"} --job-name=linrnn-eval-sweep \
          --nodes=1 --ntasks=1 --gpus-per-node=0 --cpus-per-task=1 --time=00:30:00 --output=%x-%j.log \
          --wrap "$(printf '%q ' "$PY" -m evals.sweep "$RUN" --suite "$SUITE")")
echo "Submitted batch job ${SUMMARY%%;*}: the summary, $RUN/exports/sweep-${SUITE//,/+}.md (.json, .png), after job $JOB"
