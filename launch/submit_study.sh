#!/bin/bash
# The reproduction study (launch/study.sh) as Slurm jobs: the teacher; once it succeeded (afterok), ONE job array
# over every student run, student-only for each seed and distilled for each alpha x T x seed; then the report
# (python -m kd.report). Prints the three job ids (teacher, array, report).
#   launch/submit_study.sh [SBATCH OPTIONS... --] COMMON FLAGS...
#   KD_TEACHER_FLAGS="--arch resnet101" KD_STUDENT_FLAGS="--student-arch resnet18" launch/submit_study.sh \
#       --gpus-per-node=1 -c 8 -- --dataset imagewoof --data-dir ~/data/imagewoof2-160 --image-size 128 \
#       --data-format packed --mixed-precision bf16 --batch-size 128 --lr 0.2 --epochs 20 --workers 8
# Grid: KD_STUDY_SEEDS (default "0 1 2"), KD_STUDY_ALPHAS ("0.05 0.1"), KD_STUDY_TEMPERATURES ("7"), space-separated;
# KD_STUDY_PARALLEL=N runs at most N array tasks at once. COMMON FLAGS go to every run; KD_TEACHER_FLAGS to the
# teacher, KD_STUDENT_FLAGS to the students (split on spaces). No preset: model, image size, epochs... are flags.
# Output: as study.sh, $KD_OUTPUT_DIR/{teacher,student-s<seed>,distill-a<alpha>-T<T>-s<seed>,report} (default
# KD_OUTPUT_DIR: runs/study-<date-time>); W&B group: $KD_WANDB_GROUP (default: that folder's name), tags as study.sh.
# The report job waits for the teacher (afterok) and for the whole array with afterany: a failed or cancelled
# run leaves the others' report (kd.report reads what finished; its table shows the seeds behind each row).
# Resubmitting with the same KD_OUTPUT_DIR continues unfinished runs (--resume); finished ones have nothing left.
# The report job (one task, no GPU, 1 h) publishes to W&B unless WANDB_MODE is offline or disabled (--no-publish).
# SBATCH OPTIONS (and SBATCH_* variables) apply to all three jobs. This file is also the array's batch script
# (sbatch runs it with --kd-study-task): the #SBATCH defaults below are the array's, as in launch/sweep.sbatch.
#SBATCH --job-name=kd-study        # -J
#SBATCH --nodes=1                  # -N: nodes per run, one launcher each
#SBATCH --gpus-per-node=8          # --gpus-per-node, SBATCH_GPUS_PER_NODE: one process per GPU (0 in CPU mode)
#SBATCH --cpus-per-task=32         # -c: CPUs per node for the processes and their data loaders (GPU mode: 1 task/node)
#SBATCH --time=24:00:00            # -t, SBATCH_TIMELIMIT: per run; a requeued run gets the full limit again
#SBATCH --signal=B:USR1@300        # --signal, SBATCH_SIGNAL: warn the batch shell 300 s before the limit: save + requeue
#SBATCH --requeue                  # requeue after preemption or node failure (and after the warning)
#SBATCH --open-mode=append         # --open-mode, SBATCH_OPEN_MODE: one log across requeues
#SBATCH --output=slurm-%x-%A_%a.out  # -o, SBATCH_OUTPUT: one log per array task
set -euo pipefail

case ${1:-} in
    --kd-study-task | --kd-study-report) KD_HOME=${KD_HOME:-${SLURM_SUBMIT_DIR:-}} ;;  # in a job: a copy of this file
    *) KD_HOME=${KD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)} ;;
esac
export KD_HOME
# shellcheck source=launch/slurm_common.sh
source "$KD_HOME/launch/slurm_common.sh" || { echo "set KD_HOME to the kd repository" >&2; exit 2; }

# The student runs, one "NAME ALPHA TEMPERATURE SEED" line each (alpha and T "-" for student-only), in array-task
# order: study_runs SEEDS ALPHAS TEMPERATURES.
study_runs() {
    local seed alpha temp
    for seed in $1; do echo "student-s$seed - - $seed"; done
    KD_SWEEP_SEEDS=$1 KD_SWEEP_ALPHAS=$2 KD_SWEEP_TEMPERATURES=$3 kd_sweep_points |
        while read -r alpha temp seed; do echo "distill-a$alpha-T$temp-s$seed $alpha $temp $seed"; done
}

case ${1:-} in
--kd-study-task)  # array task: --kd-study-task ROOT GROUP SEEDS ALPHAS TEMPERATURES FLAGS...
    root=$2 group=$3
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || kd_die "--kd-study-task runs as a task of the array submit_study.sh submits"
    runs=$(study_runs "$4" "$5" "$6") || exit 2
    shift 6
    read -r name alpha temp seed < <(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" <<<"$runs") ||
        kd_die "array task $SLURM_ARRAY_TASK_ID: the study has only $(wc -l <<<"$runs") student runs"
    if [ "$alpha" = - ]; then
        kd_run distill.py "$root/$name" --wandb-tags study student "$@" --teacher-checkpoint none --seed "$seed" \
            --wandb-group "$group" --run-name "$name" --output-dir "$root/$name"
    else
        kd_run distill.py "$root/$name" --wandb-tags study distill "$@" --teacher-checkpoint "$root/teacher" \
            --alpha "$alpha" --temperature "$temp" --seed "$seed" --wandb-group "$group" --run-name "$name" \
            --output-dir "$root/$name"
    fi
    ;;
--kd-study-report)  # report job: --kd-study-report KD.REPORT ARGS...
    shift
    cd "$KD_HOME"
    exec "${KD_PYTHON:-python3}" -m kd.report "$@"
    ;;
esac

kd_split_args "$@"
seeds=${KD_STUDY_SEEDS:-0 1 2} alphas=${KD_STUDY_ALPHAS:-0.05 0.1} temps=${KD_STUDY_TEMPERATURES:-7}
runs=$(study_runs "$seeds" "$alphas" "$temps")
n=$(grep -c . <<<"$runs") || kd_die "the study has no student runs: set KD_STUDY_SEEDS"
root=${KD_OUTPUT_DIR:-runs/study-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$root"
root=$(cd "$root" && pwd)  # absolute: the same folder for every job, whatever its working dir
group=${KD_WANDB_GROUP:-$(basename "$root")}
# shellcheck disable=SC2206  # the KD_*_FLAGS are split on spaces on purpose
teacher_flags=(${KD_TEACHER_FLAGS:-}) student_flags=(${KD_STUDENT_FLAGS:-})
submit() { sbatch --parsable "$@" | cut -d';' -f1; }
self=$KD_HOME/launch/submit_study.sh

teacher=$(submit "${KD_SBATCH_ARGS[@]}" "$KD_HOME/launch/teacher.sbatch" --seed 0 --wandb-tags study teacher \
    "${KD_SCRIPT_ARGS[@]}" "${teacher_flags[@]}" --wandb-group "$group" --run-name teacher --output-dir "$root/teacher")
array=$(submit --array="0-$((n - 1))${KD_STUDY_PARALLEL:+%$KD_STUDY_PARALLEL}" --dependency="afterok:$teacher" \
    --kill-on-invalid-dep=yes "${KD_SBATCH_ARGS[@]}" "$self" --kd-study-task "$root" "$group" "$seeds" "$alphas" \
    "$temps" "${KD_SCRIPT_ARGS[@]}" "${student_flags[@]}")

report_args=("$root" --wandb-group "$group")
[ -z "${WANDB_PROJECT:-}" ] || report_args+=(--wandb-project "$WANDB_PROJECT")
[ -z "${WANDB_ENTITY:-}" ] || report_args+=(--wandb-entity "$WANDB_ENTITY")
case ${WANDB_MODE:-} in offline | disabled) report_args+=(--no-publish) ;; esac
# Small: an hour (your -t applies if given), then one task on one node, no GPU, whatever the options ask for runs.
report=$(submit --job-name=kd-study-report --time=01:00:00 --cpus-per-task=2 --output=slurm-%x-%j.out \
    --no-requeue "${KD_SBATCH_ARGS[@]}" --nodes=1 --ntasks=1 --gpus-per-node=0 \
    --dependency="afterok:$teacher,afterany:$array" --kill-on-invalid-dep=yes \
    "$self" --kd-study-report "${report_args[@]}")

echo "kd-slurm: study in $root (W&B group $group): teacher $teacher, then $n student runs as array $array" \
     "(afterok), then the report $report (afterany):" >&2
# shellcheck disable=SC2001
sed 's/ .*//; s/^/  /' <<<"$runs" >&2
echo "$teacher $array $report"
