#!/usr/bin/env bash
# The reproduction study: one teacher, then student-only and distilled students over alpha x T x seeds, every run
# grouped and tagged for W&B, then the report (python -m kd.report).
#
#   PRESET=gpu DATA_DIR=~/data/imagewoof2-160 bash launch/study.sh        # ResNet-101 -> ResNet-18, 128 px, bf16
#   PRESET=cpu DATA_DIR=../shared/data/imagewoof2-160 bash launch/study.sh   # reduced: CIFAR ResNets, 32 px
#   JOBS=4 NPROC=2 ... bash launch/study.sh      # 4 student runs at a time, each on 2 processes
#
# Env: PRESET (gpu|cpu), DATA_DIR, OUT (default runs/study-$PRESET), SEEDS (default "0 1 2"), ALPHAS ("0.05 0.1"),
# TEMPS ("7"), NPROC (processes per run, default 1), JOBS (student runs at once, default 1), GROUP (W&B group).
# Extra arguments go to every run. Re-running resumes: finished runs are kept, interrupted ones continue.
# On Slurm: launch/submit_study.sh (teacher, one job array, report; GPU example in README.md "On a Slurm cluster").
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-gpu}
OUT=${OUT:-runs/study-$PRESET}
SEEDS=${SEEDS:-0 1 2}
ALPHAS=${ALPHAS:-0.05 0.1}
TEMPS=${TEMPS:-7}
NPROC=${NPROC:-1}
JOBS=${JOBS:-1}
GROUP=${GROUP:-study-$PRESET}
case "$PRESET" in
  gpu) common=(--image-size 128 --data-format packed --mixed-precision bf16 --batch-size 128 --lr 0.2 --epochs 20
               --workers 8); teacher=resnet101; student=resnet18 ;;
  cpu) common=(--image-size 32 --data-format packed --batch-size 64 --lr 0.05 --epochs 20
               --workers 0); teacher=resnet20; student=resnet8 ;;
  *) echo "study.sh: unknown PRESET=$PRESET (use gpu or cpu)" >&2; exit 2 ;;
esac
common=(--dataset imagewoof ${DATA_DIR:+--data-dir "$DATA_DIR"} "${common[@]}" --wandb-group "$GROUP" --resume "$@")

launcher=(accelerate launch --num_machines 1 --dynamo_backend no --num_processes "$NPROC")
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export ACCELERATE_USE_CPU=true
  [ "$NPROC" -gt 1 ] || launcher+=(--cpu)
  # share the cores: more OpenMP threads than cores makes every run many times slower
  threads=$(( $(nproc) / (JOBS * NPROC) )); launcher+=(--num_cpu_threads_per_process $(( threads > 0 ? threads : 1 )))
fi
[ "$NPROC" -gt 1 ] && launcher+=(--multi_gpu)

finished() { [ -f "$1/model_final.pt" ]; }
run() {  # run <output dir> <script> <args...>; logs to <output dir>.log
  local out=$1; shift
  finished "$out" && { echo "done already: $out"; return; }
  echo "running: $out"
  # a port of its own, so that parallel multi-process runs do not collide
  "${launcher[@]}" --main_process_port $((20000 + RANDOM % 20000)) "$@" --output-dir "$out" > "$out.log" 2>&1 \
    || { echo "FAILED: $out (see $out.log)" >&2; return 1; }
}

mkdir -p "$OUT"
run "$OUT/teacher" train_teacher.py "${common[@]}" --arch "$teacher" --seed 0 --run-name teacher \
  --wandb-tags study teacher
pids=(); failed=0
reap() { wait "${pids[0]}" || failed=1; pids=("${pids[@]:1}"); }
for seed in $SEEDS; do
  run "$OUT/student-s$seed" distill.py "${common[@]}" --student-arch "$student" --teacher-checkpoint none \
    --seed "$seed" --run-name "student-s$seed" --wandb-tags study student &
  pids+=($!); [ ${#pids[@]} -lt "$JOBS" ] || reap
  for alpha in $ALPHAS; do for temp in $TEMPS; do
    name="distill-a$alpha-T$temp-s$seed"
    run "$OUT/$name" distill.py "${common[@]}" --student-arch "$student" --teacher-checkpoint "$OUT/teacher" \
      --alpha "$alpha" --temperature "$temp" --seed "$seed" --run-name "$name" --wandb-tags study distill &
    pids+=($!); [ ${#pids[@]} -lt "$JOBS" ] || reap
  done; done
done
while [ ${#pids[@]} -gt 0 ]; do reap; done
python -m kd.report "$OUT"
exit $failed
