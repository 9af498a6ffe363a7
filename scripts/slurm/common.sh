# Sourced by train.sbatch and eval.sbatch, inside the batch shell (the process `--signal=B:USR1` reaches):
# picks the Python and the rendezvous, and runs a script on every node of the allocation under torchrun.
# shellcheck shell=bash disable=SC2034,SC2154 # $repo comes from the caller, which reads $run_status

slurm_log() {
    echo "[slurm $(date '+%F %T')] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): $*"
}

# The Python that has torch: $PYTHON if set, else the repository's .venv, else python3 on PATH.
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then
        PYTHON=$repo/.venv/bin/python
    else
        PYTHON=python3
    fi
fi
export PYTHON PYTHONUNBUFFERED=1

# c10d rendezvous on the first node of the allocation, at the address SLURM itself reaches it by (NodeAddr,
# which is the node name unless the site set another), on a port derived from the job id: the same after
# a requeue, different for jobs sharing a node (override with RDZV_PORT).
RDZV_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_HOST=$(scontrol show node "$RDZV_NODE" -o | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2-)
RDZV_HOST=${RDZV_HOST:-$RDZV_NODE}
RDZV_PORT=${RDZV_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
export RDZV_NODE RDZV_HOST RDZV_PORT

# USR1 or TERM reaching this shell before the training runs is noted here (by default either would kill
# the shell) and passed on as soon as it does.
got_usr1=0
got_term=0
trap 'got_usr1=1' USR1
trap 'got_term=1' TERM

# run_on_nodes [--relay-signals] SCRIPT [ARGS...]: one srun task per node starts torchrun
# (torchrun_node.sh). USR1 and TERM sent to this shell are passed on through srun to every node, and again
# every 15 s while the step runs, since a process still starting up has no handler yet and ignores them.
# The step's exit status lands in $run_status; the signals seen in $got_usr1 / $got_term.
run_on_nodes() {
    local -a cpus=()
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 "${cpus[@]}" \
        --kill-on-bad-exit=1 bash "$repo/scripts/slurm/torchrun_node.sh" "$@" &
    srun_pid=$!
    resender=""
    trap 'pass_on USR1' USR1
    trap 'pass_on TERM' TERM
    if ((got_usr1)); then pass_on USR1; fi
    if ((got_term)); then pass_on TERM; fi
    while kill -0 "$srun_pid" 2>/dev/null; do
        wait "$srun_pid"
    done
    wait "$srun_pid"
    run_status=$?
    if [[ -n $resender ]]; then kill "$resender" 2>/dev/null; fi
    trap 'got_usr1=1' USR1
    trap 'got_term=1' TERM
}

pass_on() {
    local sig=$1
    if [[ $sig == USR1 ]]; then
        got_usr1=1
        slurm_log "SIGUSR1 (time limit or pre-emption near): asking training to checkpoint"
    else
        got_term=1
        slurm_log "SIGTERM (scancel): asking training to checkpoint and stop"
    fi
    kill "-$sig" "$srun_pid" 2>/dev/null
    if [[ -z $resender ]]; then
        (while sleep 15 && kill "-$sig" "$srun_pid" 2>/dev/null; do :; done) &
        resender=$!
    fi
}
