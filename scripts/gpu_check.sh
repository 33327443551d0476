#!/usr/bin/env bash
# The GPU checks in one command, on a machine with CUDA and this project installed:
#
#     bash scripts/gpu_check.sh [OUT_DIR [STEP ...]]    # default: gpu_check/, every step
#
# 1. tests/test_gpu.py: fp32 on the GPU equals the CPU, bf16/fp16 track fp32, activation
#    checkpointing replays CUDA's random draws, torchrun with NCCL on every visible GPU,
#    re-evaluation to the same confusion matrix, predict.py's map equal to the CPU's.
# 2. Training throughput and MFU, bf16 and fp32, Prithvi-100M (ViT-B/16, 6 HLS bands, random
#    weights) + UperNet-512 at 224 px, for frozen, DEFLECT, LoRA and full fine-tuning.
# 3. Evaluation (512 px images, sliding window) and prediction (a 4096 px GeoTIFF) throughput.
# 4. With TerraTorch installed (pip install -e .[bench]): the same job side by side, bf16.
#
# Each step's output goes to OUT_DIR/<step>.txt; a failing step is reported and the rest run.
# STEPs, to run only some: tests train_bf16 train_fp32 eval_bf16 predict_bf16 vs_terratorch_bf16.
# BATCH (32), STEPS (timed steps, 20), SCENE (4096), ENCODER (prithvi_100m), IMG (224) and
# DEVICE (cuda) override the defaults, ROUNDS (3) the side-by-side rounds; e.g. a quick try
# on a CPU:
#     DEVICE=cpu ENCODER=tiny_vit IMG=32 BATCH=2 STEPS=1 SCENE=96 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
shift $(( $# > 0 ? 1 : 0 ))
ONLY=" $* "
PY=${PYTHON:-python}
ROUNDS=${ROUNDS:-3}
BATCH=${BATCH:-32}
STEPS=${STEPS:-20}
SCENE=${SCENE:-4096}
DEVICE=${DEVICE:-cuda}
ENCODER=${ENCODER:-prithvi_100m}
IMG=${IMG:-224}
WARMUP=$(( STEPS / 4 > 1 ? STEPS / 4 : 1 ))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME COMMAND...: run, keep its output, remember a failure
    local name=$1; shift
    [[ $ONLY == "  " || $ONLY == *" $name "* ]] || return 0
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$OUT/$name.txt"; then failed+=("$name"); fi
}
COMMON=(--encoder "$ENCODER" --img-size "$IMG" --bands B2,B3,B4,B8A,B11,B12 --device "$DEVICE")

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
[[ $DEVICE == cuda ]] || export DEFLECT_TEST_GPU_DEVICE=$DEVICE
step tests "$PY" -m pytest -q -m gpu tests/test_gpu.py
step train_bf16 "$PY" scripts/benchmark.py "${COMMON[@]}" --precision bf16 \
    --finetune frozen deflect lora full --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP"
step train_fp32 "$PY" scripts/benchmark.py "${COMMON[@]}" --precision fp32 \
    --finetune frozen deflect --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP"
EVAL_SIZE=$((IMG * 16 / 7))  # 512 px images at the 224 px window: 4 x 4 windows each
step eval_bf16 "$PY" scripts/benchmark.py "${COMMON[@]}" --mode eval --precision bf16 \
    --finetune deflect --batch-size "$BATCH" --eval-size "$EVAL_SIZE" --steps "$STEPS" \
    --warmup "$WARMUP"
step predict_bf16 "$PY" scripts/benchmark.py "${COMMON[@]}" --mode predict --precision bf16 \
    --finetune deflect --batch-size "$BATCH" --scene-size "$SCENE"
if "$PY" -c "import terratorch" 2>/dev/null; then
    step vs_terratorch_bf16 "$PY" scripts/benchmark.py --vs-terratorch --device "$DEVICE" \
        --precision bf16 --finetune frozen deflect full --batch-size "$BATCH" --steps "$STEPS" \
        --warmup "$WARMUP" --rounds "$ROUNDS"
else
    echo "== vs_terratorch: skipped (TerraTorch is not installed: pip install -e .[bench])"
fi
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (see $OUT/)"
    exit 1
fi
echo "all GPU checks passed; outputs in $OUT/"
