#!/usr/bin/env bash
# kd's speed on one GPU, every measurement BENCHMARKS.md asks for, in one command (sized to finish in ~10 min
# on an H100), plus the GPU-only tests. Writes everything under $OUT:
#
#   DATA=woof128.npz bash launch/bench_gpu.sh              # a `python -m kd.packed export` file, imported first
#   DATA=~/data/imagewoof2-160 bash launch/bench_gpu.sh     # or an image folder holding train/<class>/*
#
# Settings (environment): OUT (runs/bench-gpu-<date>), PHASES (which steps, in order; default all of
# "tests data synthetic eager optimizer"), TEACHER (resnet101), STUDENT (resnet18), IMAGE_SIZE (128),
# PACK_SIZE (128: what a 64 MiB export holds), BATCH (256), STEPS (50), WARMUP (10), VIEWS (8), ROUNDS (1),
# WORKERS (CPUs, at most 16), DEVICE (cuda; cpu only to try the script itself).
#   tests      pytest -m gpu: no host sync in the step, CPU/GPU view agreement, the scripts end to end on the GPU
#   data       every mode end to end with data loading (reference reads the JPEG folder, the rest the packs)
#   synthetic  the kd modes on one batch already on the GPU: compute only, the ceiling the data path can reach
#   eager      student and distill with --no-compile: what torch.compile buys
#   optimizer  one optimizer step, for-loop vs multi-tensor vs fused
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-}
OUT=${OUT:-runs/bench-gpu-$(date +%F)}
PHASES=${PHASES:-tests data synthetic eager optimizer}
DEVICE=${DEVICE:-cuda}
cpus=$(nproc)
common=(--teacher "${TEACHER:-resnet101}" --student "${STUDENT:-resnet18}" --image-size "${IMAGE_SIZE:-128}"
        --batch-size "${BATCH:-256}" --steps "${STEPS:-50}" --warmup "${WARMUP:-10}" --views "${VIEWS:-8}"
        --device "$DEVICE")
workers=${WORKERS:-$(( cpus < 16 ? cpus : 16 ))}

mkdir -p "$OUT"
log() { echo "[bench_gpu $(date +%T)] $*" | tee -a "$OUT/bench_gpu.log" >&2; }
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python -c "import torch; print('torch', torch.__version__)"; } \
    > "$OUT/machine.txt"

data_args=()
if [[ " $PHASES " == *" data "* || " $PHASES " == *" eager "* ]]; then
    [[ -n $DATA ]] || { echo "error: set DATA to an exported .npz or an image folder (train/<class>/*)" >&2; exit 2; }
    if [[ $DATA == *.npz ]]; then
        log "importing $DATA"
        python -m kd.packed import "$DATA" --packed-dir "$OUT/packs" --folder "$OUT/images" 2>&1 | tee -a "$OUT/bench_gpu.log"
        data_args=(--data-dir "$OUT/images" --packed-dir "$OUT/packs")
    else
        data_args=(--data-dir "$DATA" --packed-dir "$OUT/packs")
    fi
    data_args+=(--pack-size "${PACK_SIZE:-128}")
fi

bench() {  # one kd.bench call; its JSON lines go to bench.jsonl
    log "python -m kd.bench $*"
    python -m kd.bench "$@" | tee -a "$OUT/bench.jsonl"
}

for phase in $PHASES; do
    case $phase in
        tests) log "pytest -m gpu"
               python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" || log "GPU tests FAILED" ;;
        data) bench "${data_args[@]}" "${common[@]}" --workers "$workers" --rounds "${ROUNDS:-1}" ;;
        synthetic) bench --synthetic "${common[@]}" --mode student distill distill-cached teacher-train ;;
        eager) bench "${data_args[@]}" "${common[@]}" --workers "$workers" --no-compile --mode student distill ;;
        optimizer) bench --synthetic "${common[@]}" --mode optimizer ;;
        *) echo "error: unknown phase '$phase' in PHASES (tests data synthetic eager optimizer)" >&2; exit 2 ;;
    esac
done

python - "$OUT/bench.jsonl" <<'EOF' | tee "$OUT/summary.md"
import json, sys
print("| mode | data | compile | img/s | step ms |\n|---|---|---|---|---|")
for line in map(json.loads, open(sys.argv[1])):
    if "img_per_s" in line:
        print(f"| {line['mode']} | {line.get('data', '-').split(' ')[0]} | {line.get('compile', False)} | "
              f"{line['img_per_s']:.0f} | {line.get('step_ms', '')} |")
    elif line["mode"] == "optimizer" and "step_ms" in line:
        print(f"| optimizer {line['optimizer']} {line['implementation']} | | | | {line['step_ms']} |")
EOF
