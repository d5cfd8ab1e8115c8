#!/usr/bin/env bash
# The reference experiment end to end: teacher, student alone, distilled student, then a comparison table.
#
#   bash launch/pipeline.sh                      # PRESET=smoke: synthetic data, ~1 min on a laptop CPU
#   PRESET=laptop DATA_DIR=~/data bash launch/pipeline.sh   # Imagewoof at 64 px, CIFAR ResNets, CPU-friendly
#   PRESET=reference NPROC=8 bash launch/pipeline.sh        # ResNet-101 -> ResNet-18 at 128 px, bf16, 8 GPUs
#
# Env: PRESET (smoke|laptop|reference), NPROC (processes; default 1), OUT (default runs/pipeline-$PRESET),
# DATA_DIR (dataset root or download cache). Extra arguments go to all three runs, e.g. --report-to none.
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-smoke}
NPROC=${NPROC:-1}
OUT=${OUT:-runs/pipeline-$PRESET}
case "$PRESET" in
  smoke)     data=(--dataset synthetic); teacher=resnet20; student=resnet8
             train=(--epochs 5 --batch-size 32 --workers 0 --lr 0.05) ;;
  laptop)    data=(--dataset imagewoof --image-size 64); teacher=resnet56; student=resnet20
             train=(--epochs 10 --batch-size 64 --workers 2) ;;
  reference) data=(--dataset imagewoof --image-size 128); teacher=resnet101; student=resnet18
             train=(--epochs 20 --batch-size 64 --workers 8 --mixed-precision bf16) ;;
  *) echo "pipeline.sh: unknown PRESET=$PRESET (use smoke, laptop or reference)" >&2; exit 2 ;;
esac
[ -n "${DATA_DIR:-}" ] && data+=(--data-dir "$DATA_DIR")

launcher=(accelerate launch --num_machines 1 --dynamo_backend no --num_processes "$NPROC")
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export ACCELERATE_USE_CPU=true
  [ "$NPROC" -gt 1 ] || launcher+=(--cpu)
fi
[ "$NPROC" -gt 1 ] && launcher+=(--multi_gpu)
group="pipeline-$PRESET-$(date +%Y%m%d-%H%M%S)"
common=("${data[@]}" "${train[@]}" --wandb-group "$group" --resume "$@")

"${launcher[@]}" train_teacher.py "${common[@]}" --arch "$teacher" --output-dir "$OUT/teacher"
"${launcher[@]}" distill.py "${common[@]}" --student-arch "$student" --teacher-checkpoint none \
  --output-dir "$OUT/student"
"${launcher[@]}" distill.py "${common[@]}" --student-arch "$student" --teacher-checkpoint "$OUT/teacher" \
  --output-dir "$OUT/distill"
python -m kd.compare "$OUT/teacher" "$OUT/student" "$OUT/distill"
