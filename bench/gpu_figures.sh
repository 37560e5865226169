#!/usr/bin/env bash
# GPU figures of docs/performance.md, in one go (about 5 minutes on an H100): fp32 eager vs bf16 + channels-last
# at batch 1 and 8, 256 x 256, ResNet-101, plus evaluation slices/s. Prints one JSON line per setting.
#   bash bench/gpu_figures.sh [DEVICE]        (default cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda}
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for setting in "--amp off --batch-size 1" "--amp bf16 --channels-last --batch-size 1" \
               "--amp off --batch-size 8" "--amp bf16 --channels-last --batch-size 8"; do
  echo "== $setting"
  # shellcheck disable=SC2086
  "$PYTHON" bench/train_step.py --device "$DEVICE" --size 256 --n 20 --eval-batch 32 $setting | tail -n 1
done
