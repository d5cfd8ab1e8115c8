# shellcheck shell=bash disable=SC2015  # `test && test || kd_die` is meant: kd_die only when a test fails
# Sourced by launch/*.sbatch in the batch shell (which Slurm runs on the allocation's first node).
#
# kd_run SCRIPT DEFAULT_OUTPUT_DIR [FLAGS...] runs SCRIPT (train_teacher.py or distill.py) with FLAGS:
#   - one `accelerate launch` per node through srun (launch/node_launch.sh), the first node as main process;
#   - always with --resume, so a requeued job continues from its latest checkpoint (same W&B run id,
#     same metrics.jsonl), and a fresh one starts from scratch;
#   - Slurm's warning signal (#SBATCH --signal=B:USR1@...) makes the training processes save and exit,
#     then the job requeues itself;
#   - every start and end is appended to <output-dir>/slurm_restarts.log.
# Settings (environment): see "On a Slurm cluster" in README.md.

KD_EXIT_STOPPED=3  # kd.signals.EXIT_STOPPED: training saved its state on a signal and exited
KD_RESTART_LOG=slurm_restarts.log

kd_die() { echo "kd-slurm: error: $*" >&2; exit 2; }

# The value of the last `FLAG VALUE` or `FLAG=VALUE` among the remaining arguments (empty if none).
kd_flag_value() {
    local flag=$1 value=""
    shift
    while [ $# -gt 0 ]; do
        case $1 in
            "$flag") value=${2:-}; shift ;;
            "$flag"=*) value=${1#*=} ;;
        esac
        shift
    done
    printf '%s' "$value"
}

# Appends one line to <output-dir>/slurm_restarts.log: time, event, job, restart count, array task, nodes.
kd_note() {
    local line
    line="$(date -Is) $1 job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0}"
    line+=" array_task=${SLURM_ARRAY_TASK_ID:--} nodes=$SLURM_JOB_NODELIST${2:+ $2}"
    echo "$line" >>"$KD_OUT/$KD_RESTART_LOG"
    echo "kd-slurm: $line"
}

# Training processes per node: GPUs on the node, or tasks per node in CPU mode.
kd_procs_per_node() {
    local n
    if [ -n "${KD_PROCS_PER_NODE:-}" ]; then
        n=$KD_PROCS_PER_NODE
    elif [ "$KD_CPU" = 1 ]; then
        if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
            n=$SLURM_NTASKS_PER_NODE
        else
            n=${SLURM_NTASKS:-1}
            [ $((n % KD_NUM_MACHINES)) -eq 0 ] ||
                kd_die "CPU mode: $n tasks do not split evenly over $KD_NUM_MACHINES nodes: use --ntasks-per-node"
            n=$((n / KD_NUM_MACHINES))
        fi
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        n=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    else
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || n=0
    fi
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] ||
        kd_die "no GPUs on this node (got '$n'): request them (--gpus-per-node), set KD_GPUS_PER_NODE, or run" \
               "in CPU mode (KD_CPU=1 sbatch --gpus-per-node=0 --ntasks-per-node=N ...)"
    echo "$n"
}

kd_free_port() {  # an unused TCP port on this node (the main process's node)
    "$KD_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

kd_run() {
    local script=$1 default_out=$2
    shift 2
    [ -n "${SLURM_JOB_ID:-}" ] || kd_die "submit this script with sbatch (no SLURM_JOB_ID)"
    [ -f "$KD_HOME/$script" ] || kd_die "$KD_HOME/$script not found: submit from the kd repository root or set KD_HOME"

    export KD_HOME KD_PYTHON=${KD_PYTHON:-python3} KD_CPU=${KD_CPU:-0}
    export KD_ACCELERATE_CONFIG=${KD_ACCELERATE_CONFIG:-$KD_HOME/accelerate_config.yaml}
    export KD_NUM_MACHINES=${SLURM_JOB_NUM_NODES:-1}
    export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # progress bars: a log line per 30 s, not per step
    if [ "$KD_CPU" = 1 ]; then
        export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    fi
    [ -z "${KD_GPUS_PER_NODE:-}" ] || [ "$KD_CPU" = 1 ] || KD_PROCS_PER_NODE=$KD_GPUS_PER_NODE
    local per_node
    per_node=$(kd_procs_per_node) || exit 2
    export KD_NUM_PROCESSES=$((per_node * KD_NUM_MACHINES))
    KD_MAIN_ADDR=${KD_MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export KD_MAIN_ADDR KD_MAIN_PORT=${KD_MAIN_PORT:-$(kd_free_port)}

    # Output dir: --output-dir in the flags, else $KD_OUTPUT_DIR, else the script's default for this job.
    local -a extra=(--resume)
    KD_OUT=$(kd_flag_value --output-dir "$@")
    if [ -z "$KD_OUT" ]; then
        KD_OUT=${KD_OUTPUT_DIR:-$default_out}
        extra+=(--output-dir "$KD_OUT")
    fi
    mkdir -p "$KD_OUT" || kd_die "cannot create the output dir $KD_OUT"
    [ -z "${WANDB_PROJECT:-}" ] || extra+=(--wandb-project "$WANDB_PROJECT")
    [ -z "${WANDB_ENTITY:-}" ] || extra+=(--wandb-entity "$WANDB_ENTITY")

    export KD_STOP_FILE=$KD_OUT/.slurm-stop-$SLURM_JOB_ID
    rm -f "$KD_STOP_FILE"
    kd_stop_requested=0 kd_terminated=0
    trap kd_on_warning USR1
    trap 'kd_terminated=1' TERM  # Slurm ends the job (preemption, scancel, requeue): it signals every process
    kd_note start "processes=$KD_NUM_PROCESSES cpu=$KD_CPU main=$KD_MAIN_ADDR:$KD_MAIN_PORT"

    # One task per node holding all of the node's CPUs; GPUs: all of the job's (srun's default).
    srun --nodes="$KD_NUM_MACHINES" --ntasks="$KD_NUM_MACHINES" --ntasks-per-node=1 \
         --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
         "$KD_HOME/launch/node_launch.sh" "$script" "${extra[@]}" "$@" &
    local srun_pid=$! rc
    while :; do  # `wait` returns early when a trapped signal arrives
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    rm -f "$KD_STOP_FILE"

    if [ "${KD_DRY_RUN:-0}" = 1 ]; then
        exit "$rc"
    elif [ "$rc" -eq 0 ]; then
        kd_note end "rc=0 finished"
        exit 0
    elif [ "$kd_stop_requested" = 1 ] && [ "$kd_terminated" = 0 ]; then
        kd_note end "rc=$rc stopped on the warning signal: requeueing"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        kd_note end "scontrol requeue failed: resubmit with --output-dir $KD_OUT to continue"
        exit "$KD_EXIT_STOPPED"
    fi
    kd_note end "rc=$rc$([ "$kd_terminated" = 1 ] && echo ' terminated by Slurm')"
    exit "$rc"
}

# Slurm's warning signal (B:USR1, before the time limit or preemption): the node launchers see this file and
# send SIGUSR1 to the training processes, which finish their step, save and exit.
kd_on_warning() {
    [ "$kd_stop_requested" = 1 ] && return
    kd_stop_requested=1
    touch "$KD_STOP_FILE"
    kd_note signal "USR1: saving state, then requeue"
}
