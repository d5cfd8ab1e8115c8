#!/usr/bin/env bash
# The reference pipeline as a chain of jobs: the teacher; once it succeeded (afterok), distillation and the
# student-only baseline side by side. Prints the three job ids (teacher, distill, student).
#   launch/submit_pipeline.sh [SBATCH OPTIONS... --] COMMON FLAGS...
#   KD_TEACHER_FLAGS="--arch resnet101" KD_STUDENT_FLAGS="--student-arch resnet18" \
#       launch/submit_pipeline.sh -- --data-dir ~/data/imagewoof2-160 --image-size 128 --epochs 20
# COMMON FLAGS go to all three jobs; KD_TEACHER_FLAGS to the teacher, KD_STUDENT_FLAGS to distillation and the
# baseline, KD_DISTILL_FLAGS to distillation only (e.g. "--alpha 0.5 --temperature 4"); split on spaces.
# Output: $KD_OUTPUT_DIR/{teacher,distill,student} (default KD_OUTPUT_DIR: runs/pipeline-<date-time>);
# W&B group: $KD_WANDB_GROUP (default: that folder's name). SBATCH OPTIONS (and SBATCH_* variables) apply to all.
set -euo pipefail
KD_HOME=${KD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export KD_HOME
# shellcheck source=launch/slurm_common.sh
source "$KD_HOME/launch/slurm_common.sh"
kd_split_args "$@"
root=${KD_OUTPUT_DIR:-runs/pipeline-$(date +%Y%m%d-%H%M%S)}
group=${KD_WANDB_GROUP:-$(basename "$root")}
# shellcheck disable=SC2206  # the KD_*_FLAGS are split on spaces on purpose
teacher_flags=(${KD_TEACHER_FLAGS:-}) student_flags=(${KD_STUDENT_FLAGS:-}) distill_flags=(${KD_DISTILL_FLAGS:-})
submit() { sbatch --parsable "${KD_SBATCH_ARGS[@]}" "$@"; }

teacher=$(submit "$KD_HOME/launch/teacher.sbatch" --output-dir "$root/teacher" --wandb-group "$group" \
    --run-name teacher "${KD_SCRIPT_ARGS[@]}" "${teacher_flags[@]}")
after=(--dependency="afterok:$teacher" --kill-on-invalid-dep=yes)
distill=$(submit "${after[@]}" "$KD_HOME/launch/distill.sbatch" --output-dir "$root/distill" \
    --teacher-checkpoint "$root/teacher" --wandb-group "$group" --run-name distill "${KD_SCRIPT_ARGS[@]}" \
    "${student_flags[@]}" "${distill_flags[@]}")
student=$(submit "${after[@]}" --job-name=kd-student "$KD_HOME/launch/distill.sbatch" --output-dir "$root/student" \
    --teacher-checkpoint none --wandb-group "$group" --run-name student "${KD_SCRIPT_ARGS[@]}" "${student_flags[@]}")
echo "kd-slurm: pipeline in $root: teacher $teacher, then distill $distill and student $student (afterok)" >&2
echo "$teacher $distill $student"
