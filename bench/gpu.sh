#!/usr/bin/env bash
# Every measurement of the speed issue on a GPU machine, in one run: inference (model and pipeline), one training
# step per method, and the batch command against the model alone. Tables go to stdout and $OUT/*.md, rows to
# $OUT/*.json. On the GPU machine:  bash bench/gpu.sh
# Its logic on a CPU, in seconds:   DEVICE=cpu TINY=1 IMAGES=4 BATCH=2 PHOTOS=2 TRAIN_BATCH=4 STEPS=1 \
#     LOADER_WORKERS=1 LOADER_ROWS=16 PREDICT_PHOTOS=4 PREDICT_BATCH=2 WORKERS=1 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench-results}
DEVICE=${DEVICE:-cuda}
TINY_FLAG=$( [ -n "${TINY:-}" ] && echo --tiny || true )
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; fi

# Inference: naive fp32 batch 1 against ours (bf16, SDPA) at a large batch, plain and compiled; the pipeline.
# SPEED_FLAGS: more options, e.g. "--no-compile".
"$PYTHON" -m bench.speed --device "$DEVICE" $TINY_FLAG --images "${IMAGES:-1024}" --batch-size "${BATCH:-256}" \
  --photos "${PHOTOS:-64}" ${SPEED_FLAGS:-} --json "$OUT/speed.json" | tee "$OUT/speed.md"
# Training: one optimizer step per method through train.train's own step, batch 64, with the speed switches.
# TRAIN_FLAGS: more options, e.g. "--methods lora mtlora --no-compile".
# The data loader (prepared rows to augmented batches) is timed with LOADER_WORKERS workers against the LoRA step.
"$PYTHON" -m bench.train --device "$DEVICE" $TINY_FLAG --batch-size "${TRAIN_BATCH:-64}" --steps "${STEPS:-10}" \
  --loader-workers "${LOADER_WORKERS:-14}" --loader-rows "${LOADER_ROWS:-2048}" ${TRAIN_FLAGS:-} \
  --json "$OUT/train.json" | tee "$OUT/train.md"
# The batch command (decode, detect, crop, preprocess in workers) against the model alone.
"$PYTHON" -m bench.predict --device "$DEVICE" $TINY_FLAG --photos "${PREDICT_PHOTOS:-512}" \
  --batch-size "${PREDICT_BATCH:-64}" --num-workers "${WORKERS:-8}" --json "$OUT/predict.json" | tee "$OUT/predict.md"
echo "results in $OUT"
