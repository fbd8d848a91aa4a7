#!/bin/bash
# sbatch scripts/slurm_train.sh configs/experiment/my_run.yaml [key=value ...]
#
# Multi-node training under SLURM that survives preemption and time limits (docs/cluster.md).
# On the SIGTERM that --signal sends before the time limit, the ranks checkpoint and exit, then this
# job is requeued (SLURM does not requeue a job that hit its limit) and its next start resumes
# exactly (train.resume=latest). A preempted job is requeued by SLURM itself (--requeue): then the
# trap does not requeue it a second time. Tested with stand-ins for srun/scontrol/torchrun
# (tests/test_slurm_script.py), not on a SLURM cluster.
#SBATCH --job-name=clip-ft
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=logs/%x-%j.out
set -u
CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml [key=value ...]}
shift
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
STATUS=

# SLURM is requeueing this job itself (a preemption with --requeue): the job's state says so. Best effort:
# in a preemption's grace time the state may still read RUNNING; a second requeue request is harmless.
slurm_requeueing() {
    scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -Eq 'JobState=(PREEMPTED|REQUEUE[A-Z_]*)'
}

on_term() {
    trap '' TERM  # once: a second signal while the ranks save must not requeue twice
    kill -TERM "$PID" 2>/dev/null
    wait "$PID"
    STATUS=$?
    if slurm_requeueing; then
        echo "slurm_train.sh: SLURM is requeueing job $SLURM_JOB_ID (preempted); not requeueing it again"
    else
        echo "slurm_train.sh: ranks stopped (status $STATUS); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
}
trap on_term TERM

srun --kill-on-bad-exit=1 bash -c 'exec "$TORCHRUN" --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
    --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER" --master_port 29500 \
    -m mmpretrain.cli train "$@" train.resume=latest' bash "$CONFIG" "$@" &
PID=$!
wait "$PID"
STATUS=${STATUS:-$?}
exit "$STATUS"
