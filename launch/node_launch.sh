#!/usr/bin/env bash
# One per node, started by srun from launch/slurm_common.sh: `accelerate launch` of this node's training
# processes, machine rank = the node's index in the allocation.
#   node_launch.sh SCRIPT [FLAGS...]
# Reads KD_HOME, KD_PYTHON, KD_CPU, KD_ACCELERATE_CONFIG, KD_NUM_PROCESSES (all nodes), KD_NUM_MACHINES,
# KD_MAIN_ADDR, KD_MAIN_PORT and KD_STOP_FILE from the batch shell; KD_DRY_RUN=1 prints the command instead.
#
# Stop: when the batch shell creates KD_STOP_FILE (it got Slurm's warning signal), SIGUSR1 goes to the
# launcher's children, the training processes, once each. Not through srun: a signal to a step reaches every
# process in it (the torchrun agent and DataLoader workers too, which USR1 would kill).
set -uo pipefail

script=$1
shift
rank=${SLURM_NODEID:-0}
cmd=("$KD_PYTHON" -m accelerate.commands.launch)
if [ "$KD_CPU" = 1 ]; then
    cmd+=(--mixed_precision no --dynamo_backend no)
    if [ "$KD_NUM_PROCESSES" -gt 1 ]; then cmd+=(--multi_gpu); else cmd+=(--cpu); fi
else
    cmd+=(--config_file "$KD_ACCELERATE_CONFIG")
fi
cmd+=(--num_processes "$KD_NUM_PROCESSES" --num_machines "$KD_NUM_MACHINES" --machine_rank "$rank")
# One node: the processes meet on localhost. Either way a port of this job's own: jobs may share a node.
[ "$KD_NUM_MACHINES" -eq 1 ] || cmd+=(--main_process_ip "$KD_MAIN_ADDR")
cmd+=(--main_process_port "$KD_MAIN_PORT" "$KD_HOME/$script" "$@")

if [ "${KD_DRY_RUN:-0}" = 1 ]; then
    printf 'kd-launch node=%s machine_rank=%s:' "${SLURMD_NODENAME:-$(hostname -s)}" "$rank"
    printf ' %q' "${cmd[@]}"
    echo
    exit 0
fi

# USR1 ignored here is ignored by the launcher too (a stray USR1 cannot kill it); the training processes install
# their own handler. TERM comes from Slurm to every process of the step: keep waiting while training saves.
trap '' USR1
trap ':' TERM
"${cmd[@]}" &
launcher=$!

catches_usr1() {  # PID: has the process installed a SIGUSR1 handler yet? (signal 10: bit 9 of SigCgt)
    local mask
    mask=$(awk '/^SigCgt:/ { print $2 }' "/proc/$1/status" 2>/dev/null)
    [ -n "$mask" ] && (((16#$mask >> 9) & 1))
}
(   # On the stop request: one SIGUSR1 to each training process, once it can take it (not mid-startup).
    trap - TERM
    while [ ! -e "$KD_STOP_FILE" ]; do sleep 0.5; done
    echo "kd-slurm: node $rank: stop requested: SIGUSR1 to the training processes" >&2
    sent=" "
    while :; do
        for pid in $(pgrep -P "$launcher"); do
            [[ $sent == *" $pid "* ]] && continue
            if catches_usr1 "$pid" && kill -USR1 "$pid" 2>/dev/null; then sent+="$pid "; fi
        done
        sleep 0.5
    done
) &
watcher=$!
while :; do
    wait "$launcher"
    rc=$?
    kill -0 "$launcher" 2>/dev/null || break
done
kill "$watcher" 2>/dev/null
exit "$rc"
