#!/usr/bin/env bash
# The whole pipeline on the embedded synthetic data set, on CPU in minutes:
# generate phantoms -> supervoxels -> self-supervised training -> EP1 evaluation -> summary.
#
# Environment (defaults): OUT_DIR (runs/demo) holds everything written; PYTHON (python).
# Arguments are Sacred overrides for both training and testing, e.g. n_steps=300.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-runs/demo}
PYTHON=${PYTHON:-python}
DATA_DIR="$OUT_DIR/data/SYNTH"

start=$(date +%s)
"$PYTHON" -m dataloaders.synthetic --out-dir "$DATA_DIR" --n-volumes 10 --size 128 --seed 0
"$PYTHON" supervoxels/generate_supervoxels.py --data-dir "$DATA_DIR" --dataset SYNTH --workers 2
"$PYTHON" training.py with demo data_root="$OUT_DIR/data" path.log_dir="$OUT_DIR" "$@"
"$PYTHON" test.py with demo data_root="$OUT_DIR/data" path.log_dir="$OUT_DIR" "$@"
"$PYTHON" script/summarize.py "$OUT_DIR"
echo "demo finished in $(( $(date +%s) - start )) s; everything is under $OUT_DIR"
