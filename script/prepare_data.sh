#!/usr/bin/env bash
# Pre-process a public data set and generate its supervoxels.
#
#   DATASET=CHAOST2 RAW_DIR=raw/CHAOS_Train_Sets bash script/prepare_data.sh
#
# Environment (defaults): DATASET (CHAOST2; a registry data set with a raw layout: CHAOST2|SABS|CMR), RAW_DIR (required), DATA_ROOT (data),
# N_SV (the data set's default), WORKERS (2), PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-CHAOST2}
DATA_ROOT=${DATA_ROOT:-data}
WORKERS=${WORKERS:-2}
PYTHON=${PYTHON:-python}
: "${RAW_DIR:?set RAW_DIR to the folder of the downloaded $DATASET data}"

"$PYTHON" -m dataloaders.preprocess --dataset "$DATASET" --raw-dir "$RAW_DIR" --out-dir "$DATA_ROOT/$DATASET"
"$PYTHON" supervoxels/generate_supervoxels.py --data-dir "$DATA_ROOT/$DATASET" --dataset "$DATASET" \
    ${N_SV:+--n-sv "$N_SV"} --workers "$WORKERS"
