#!/usr/bin/env bash
# kd's speed on one GPU, every measurement BENCHMARKS.md asks for, plus the GPU-only tests. Results go to $OUT
# (bench.jsonl, summary.md, gpu_tests.log, bench_gpu.log, machine.txt); imported data goes to $WORK.
#
#   DATA=woof128.npz bash launch/bench_gpu.sh              # a `python -m kd.packed export` file, imported first
#   DATA=~/data/imagewoof2-160 bash launch/bench_gpu.sh     # or an image folder holding train/<class>/*
#
# PHASES picks the steps, in order (default: all). Each compiles models on first use (a minute or more each for
# ResNet-18/101 before inductor's cache is warm), so where a command has a time limit, split the work:
# PHASES="tests optimizer" (~3-5 min), then PHASES=data (the targets), then PHASES="synthetic eager".
#   tests      pytest -m gpu: no host sync in the step, CPU/GPU view agreement, the scripts end to end on the GPU
#   data       reference, student, distill and distill-cached end to end with data loading (reference reads the
#              JPEG folder, the rest the packs)
#   synthetic  student, distill, distill-cached and teacher-train on one batch already on the GPU: compute only
#   eager      student and distill with data and --no-compile: what torch.compile buys
#   optimizer  one optimizer step, for-loop vs multi-tensor vs fused
# Other settings (environment): OUT (runs/bench-gpu-<date>), WORK ($TMPDIR/kd-bench-gpu), TEACHER (resnet101),
# STUDENT (resnet18), IMAGE_SIZE (128), PACK_SIZE (128: what a 64 MiB export holds), BATCH (256), STEPS (50),
# WARMUP (10), VIEWS (8), ROUNDS (1), WORKERS (CPUs, at most 16), DEVICE (cuda; cpu only to try the script),
# PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-}
OUT=${OUT:-runs/bench-gpu-$(date +%F)}
WORK=${WORK:-${TMPDIR:-/tmp}/kd-bench-gpu}
PHASES=${PHASES:-tests data synthetic eager optimizer}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a run stopped at a time limit still leaves its lines in the logs
cpus=$(nproc)
workers=${WORKERS:-$(( cpus < 16 ? cpus : 16 ))}
common=(--teacher "${TEACHER:-resnet101}" --student "${STUDENT:-resnet18}" --image-size "${IMAGE_SIZE:-128}"
        --batch-size "${BATCH:-256}" --steps "${STEPS:-50}" --warmup "${WARMUP:-10}" --views "${VIEWS:-8}"
        --device "$DEVICE")

mkdir -p "$OUT" "$WORK"
log() { echo "[bench_gpu $(date +%T)] $*" | tee -a "$OUT/bench_gpu.log" >&2; }
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } \
    > "$OUT/machine.txt"

data_args=()
if [[ " $PHASES " == *" data "* || " $PHASES " == *" eager "* ]]; then
    [[ -n $DATA ]] || { echo "error: set DATA to an exported .npz or an image folder (train/<class>/*)" >&2; exit 2; }
    if [[ $DATA == *.npz ]]; then
        if [[ "$(cat "$WORK/imported" 2>/dev/null)" != "$DATA" ]]; then  # once per machine and export
            log "importing $DATA into $WORK"
            rm -rf "$WORK/packs" "$WORK/images" "$WORK/imported"
            "$PYTHON" -m kd.packed import "$DATA" --packed-dir "$WORK/packs" --folder "$WORK/images" 2>&1 \
                | tee -a "$OUT/bench_gpu.log"
            echo "$DATA" > "$WORK/imported"
        fi
        data_args=(--data-dir "$WORK/images" --packed-dir "$WORK/packs")
    else
        data_args=(--data-dir "$DATA" --packed-dir "$WORK/packs")
    fi
    data_args+=(--pack-size "${PACK_SIZE:-128}")
fi

bench() {  # one kd.bench call; its JSON lines go to bench.jsonl; a failure is logged and the next phase runs
    log "python -m kd.bench $*"
    "$PYTHON" -m kd.bench "$@" | tee -a "$OUT/bench.jsonl" || log "FAILED: python -m kd.bench $*"
}

for phase in $PHASES; do
    case $phase in
        tests) log "pytest -m gpu"
               "$PYTHON" -m pytest -q -rA --durations=10 -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" \
                   || log "FAILED: GPU tests (see gpu_tests.log)" ;;
        data) bench "${data_args[@]}" "${common[@]}" --workers "$workers" --rounds "${ROUNDS:-1}" \
                  --mode reference student distill distill-cached ;;
        synthetic) bench --synthetic "${common[@]}" --mode student distill distill-cached teacher-train ;;
        eager) bench "${data_args[@]}" "${common[@]}" --workers "$workers" --no-compile --mode student distill ;;
        optimizer) bench --synthetic "${common[@]}" --mode optimizer ;;
        *) echo "error: unknown phase '$phase' in PHASES (tests data synthetic eager optimizer)" >&2; exit 2 ;;
    esac
done

[[ -s $OUT/bench.jsonl ]] || exit 0
"$PYTHON" - "$OUT/bench.jsonl" <<'EOF' | tee "$OUT/summary.md"
import json, sys
print("| mode | data | compile | img/s | step ms |\n|---|---|---|---|---|")
for line in map(json.loads, open(sys.argv[1])):
    if "img_per_s" in line:
        print(f"| {line['mode']} | {line.get('data', '-').split(' ')[0]} | {line.get('compile', False)} | "
              f"{line['img_per_s']:.0f} | {line.get('step_ms', '')} |")
    elif line["mode"] == "optimizer" and "step_ms" in line:
        print(f"| optimizer {line['optimizer']} {line['implementation']} | | | | {line['step_ms']} |")
EOF
