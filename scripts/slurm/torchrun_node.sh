#!/usr/bin/env bash
# One srun task per node runs this: it starts torchrun for this node and relays SIGUSR1/SIGTERM to the
# training processes (torchrun's children) only.
#
# Why a relay: SIGUSR1's default action would kill torchrun, whose agent does not forward it, and on SIGTERM
# torchrun tears its workers down (SIGKILL after 30 s) and exits 1 with a traceback, as if training had
# failed. So torchrun starts with both signals ignored (a disposition exec keeps; its workers inherit it
# until train.py installs its own handlers) and told not to handle SIGTERM itself
# (--signals-to-handle), and this script sends the signals to the workers, which checkpoint at
# the next step boundary and exit 0; torchrun then exits 0 as after any run. (SLURM may also signal every
# process of the step directly; a worker asked twice still stops once.)
#
# Usage (from the sbatch scripts): srun ... torchrun_node.sh [--relay-signals] SCRIPT.py [ARGS...]
# Without --relay-signals (eval.py, which has no checkpoint to write) torchrun runs as usual.
# Environment: RDZV_NODE, RDZV_HOST, RDZV_PORT (set by the sbatch script), PYTHON, NPROC_PER_NODE (optional).
set -uo pipefail

relay_signals=0
if [[ ${1:-} == --relay-signals ]]; then
    relay_signals=1
    shift
fi
script=$1
shift

# Processes per node: explicit NPROC_PER_NODE, else this node's GPUs in the allocation, else 1 (CPU).
nproc=${NPROC_PER_NODE:-}
if [[ -z $nproc ]]; then
    if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
        nproc=$SLURM_GPUS_ON_NODE
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != "NoDevFiles" ]]; then
        IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
        nproc=${#visible[@]}
    else
        nproc=1
    fi
fi

# The node hosting the rendezvous store says so explicitly instead of torch guessing from hostnames.
is_host=0
[[ ${SLURMD_NODENAME:-} == "$RDZV_NODE" ]] && is_host=1

torchrun=("${PYTHON:-python3}" -m torch.distributed.run
    --nnodes="$SLURM_NNODES" --nproc_per_node="$nproc"
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID"
    --rdzv_conf="is_host=$is_host" --max_restarts=0 "$script" "$@")
if ((!relay_signals)); then
    exec "${torchrun[@]}"
fi

(
    trap '' USR1 TERM
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT # torchrun --signals-to-handle, minus SIGTERM
    exec "${torchrun[@]}"
) &
torchrun_pid=$!
relay() {
    pkill "-$1" -P "$torchrun_pid" 2>/dev/null || true
}
trap 'relay USR1' USR1
trap 'relay TERM' TERM

# `wait` returns early whenever a trapped signal arrives: wait again until torchrun has exited, then once
# more for its exit status, which bash keeps for a child it has reaped.
while kill -0 "$torchrun_pid" 2>/dev/null; do
    wait "$torchrun_pid"
done
wait "$torchrun_pid"
