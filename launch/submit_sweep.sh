#!/usr/bin/env bash
# Submits launch/sweep.sbatch as a job array with one task per sweep point; prints the array job id.
#   launch/submit_sweep.sh [SBATCH OPTIONS... --] DISTILL FLAGS...
#   KD_SWEEP_ALPHAS="0.1 0.5" KD_SWEEP_TEMPERATURES="4 8" KD_SWEEP_SEEDS="0 1" launch/submit_sweep.sh \
#       -- --teacher-checkpoint runs/teacher --data-dir ~/data/imagewoof2-160 --image-size 128
# KD_SWEEP_PARALLEL=N runs at most N points at once. Points and outputs: see launch/sweep.sbatch.
set -euo pipefail
KD_HOME=${KD_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export KD_HOME
# shellcheck source=launch/slurm_common.sh
source "$KD_HOME/launch/slurm_common.sh"
points=$(kd_sweep_points)
[ -n "$points" ] || kd_die "the sweep has no points"
n=$(wc -l <<<"$points")
kd_split_args "$@"
echo "kd-slurm: $n sweep points (alpha temperature seed):" >&2
# shellcheck disable=SC2001
sed 's/^/  /' <<<"$points" >&2
sbatch --parsable --array="0-$((n - 1))${KD_SWEEP_PARALLEL:+%$KD_SWEEP_PARALLEL}" "${KD_SBATCH_ARGS[@]}" \
    "$KD_HOME/launch/sweep.sbatch" "${KD_SCRIPT_ARGS[@]}"
