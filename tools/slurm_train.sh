#!/bin/bash
# train.py on a SLURM allocation: one torchrun per node (srun, one task each), c10d rendezvous on the first node;
# before the time limit, or on a preemption notice, every rank checkpoints and the job requeues itself and resumes.
#
#   sbatch --nodes=2 --gpus-per-node=8 --time=24:00:00 tools/slurm_train.sh device=cuda weights=R-101.pkl
#   GPUS_PER_NODE=8 OUTPUT_DIR=output/r101 CONFIG=R-101-FPN sbatch --nodes=4 --exclusive --time=2-0 \
#       tools/slurm_train.sh device=mlu weights=R-101.pkl ims_per_batch=32
#
# Submit from the repository root (or set FRCNN_DIR). The arguments go to train.py after --config; output_dir is
# OUTPUT_DIR, on a file system every node sees. Every start passes --resume: the first finds no checkpoint and
# begins at iteration 0, a requeued one continues from the newest checkpoint in OUTPUT_DIR.
#
# The stop: SLURM sends SIGTERM to this shell alone (--signal=B:TERM@180, 180 s before the time limit; a
# preemption with a GraceTime and PreemptParameters=send_user_signal sends the same); scancel --batch --signal=TERM
# JOBID does it by hand. The shell passes it on to every rank, whose train.py finishes its iteration, writes a
# checkpoint and exits 143; then the shell requeues the job (scontrol requeue), whose log appends to the same file.
# A cancel (scancel JOBID) is not requeued, nor a run that failed (train.py's exit 1 or 2), nor one that ended.
#SBATCH --job-name=frcnn
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:TERM@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

: "${SLURM_JOB_ID:?is not set: submit this script with sbatch (see its first lines)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}  # processes per node: one per card
PYTHON=${PYTHON:-python3}
FRCNN_DIR=${FRCNN_DIR:-$SLURM_SUBMIT_DIR}  # the repository: train.py's folder
CONFIG=${CONFIG:-R-101-FPN}
OUTPUT_DIR=${OUTPUT_DIR:-output/slurm-$SLURM_JOB_ID}  # the same for every start of this job
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # two jobs sharing a node do not share a port

if [ ! -f "$FRCNN_DIR/train.py" ]; then
    echo "error: $FRCNN_DIR/train.py not found: submit from the repository root or set FRCNN_DIR to it" >&2
    exit 2
fi
for arg in "$@"; do
    case $arg in output[_-]dir=* | --output[_-]dir | --output[_-]dir=*)
        echo "error: $arg: the output folder is OUTPUT_DIR (OUTPUT_DIR=... sbatch ...), so that every start of" \
            "the job, requeued ones too, writes and resumes in the same place" >&2
        exit 2 ;;
    esac
done
mkdir -p "$OUTPUT_DIR" || exit 2
# torchrun exits 1 whatever its workers did, so rank 0 leaves train.py's exit code here (output_dir is shared).
export FRCNN_RANK0_EXIT=$OUTPUT_DIR/slurm_rank0_exit_code
rm -f "$FRCNN_RANK0_EXIT"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "slurm_train.sh: job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) at $(date '+%F %T') on" \
    "$SLURM_JOB_NODELIST, $SLURM_JOB_NUM_NODES node(s) x $GPUS_PER_NODE process(es), output_dir $OUTPUT_DIR"

# SLURM signals every process of a step (proctrack), so a rank gets the TERM twice: from SLURM and from its
# torchrun, a few ms apart; train.py takes a repeat within a second as the same notice. The rank's bash outlives
# the signal (a trap, which its child does not inherit) to record train.py's exit code: 143 or 130 after the
# checkpoint, or 143 for a notice that came before train.py had its handler (the last checkpoint is then newest).
# shellcheck disable=SC2016  # expanded by the rank's bash, not this one
rank_cmd='trap : INT TERM; "$@"; rc=$?; if [ "$RANK" = 0 ]; then echo "$rc" >"$FRCNN_RANK0_EXIT"; fi; exit "$rc"'
notice=""
# shellcheck disable=SC2317  # called by the traps
pass_on() {
    notice=$1
    echo "slurm_train.sh: SIG$1 at $(date '+%F %T'): passing it to every rank" >&2
    scancel --signal="$1" "$SLURM_JOB_ID"  # the job's steps, not this shell; srun would SIGKILL them on a TERM
}
trap 'pass_on TERM' TERM
trap 'pass_on INT' INT
# --kill-on-bad-exit=0: a node whose torchrun ends first must not kill rank 0 while it writes the checkpoint.
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=0 \
    "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --no-python bash -c "$rank_cmd" rank "$PYTHON" "$FRCNN_DIR/train.py" --config "$CONFIG" "$@" \
    output_dir="$OUTPUT_DIR" --resume &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"  # returns early when a trap runs
done
wait "$srun_pid"
rc=$?
rank0=$(cat "$FRCNN_RANK0_EXIT" 2>/dev/null)
rm -f "$FRCNN_RANK0_EXIT"
state=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*')
echo "slurm_train.sh: srun exited $rc, rank 0's train.py ${rank0:-left no exit code}, $state"
[ "$rc" = 0 ] && exit 0
# 143 or 130: stopped by the signal with a checkpoint written. A cancel or the time limit has already moved the job
# out of RUNNING; exit 1 (a bug) or 2 (the user's mistake) would only fail again.
case $rank0 in
    0 | 1 | 2) requeue="" ;;
    130 | 143) requeue=yes ;;
    *) requeue=$notice ;;  # no code or killed, e.g. a notice before train.py set its handler: resuming is safe
esac
if [ -n "$requeue" ] && [ "$state" = JobState=RUNNING ]; then
    trap - INT TERM
    echo "slurm_train.sh: requeueing job $SLURM_JOB_ID; the next start resumes from the newest checkpoint in" \
        "$OUTPUT_DIR"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
case $rank0 in 1 | 2) exit "$rank0" ;; esac  # the job's ExitCode says which failure (srun's is torchrun's 1)
exit "$rc"
