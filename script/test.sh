#!/usr/bin/env bash
# Evaluate trained DMAP models on each fold (EP1, 1-way 1-shot), then summarise over folds.
#
#   DATASET=CHAOST2 SETTING=1 DATA_ROOT=data bash script/test.sh
#   ROTATE=1 bash script/test.sh        # every fold member serves as support in turn
#
# Environment (defaults): DATASET (CHAOST2), SETTING (1), DATA_ROOT (data), FOLDS ("0 1 2 3 4"),
# SUPP_IDX (2), ROTATE (0), MODE (learned), N_STEPS (33000), LOG_DIR (runs), GPU (unset), PYTHON (python).
# Arguments are passed to test.py as Sacred overrides: give the named configs and training overrides given
# to train.sh, so that the run folder of that recipe is found (the model is rebuilt from its checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
. script/run_env.sh  # DATASET SETTING DATA_ROOT FOLDS MODE N_STEPS LOG_DIR PYTHON GPU

SUPP_IDX=${SUPP_IDX:-2}
ROTATE=${ROTATE:-0}
rotate=False; [ "$ROTATE" = "1" ] && rotate=True

for fold in $FOLDS; do
  echo "== testing $DATASET setting $SETTING fold $fold (support position $SUPP_IDX, rotate $rotate)"
  "$PYTHON" test.py with dataset="$DATASET" setting="$SETTING" eval_fold="$fold" data_root="$DATA_ROOT" \
    n_steps="$N_STEPS" supp_idx="$SUPP_IDX" rotate_support="$rotate" model.dmap_mode="$MODE" \
    path.log_dir="$LOG_DIR" "$@"
done
"$PYTHON" script/summarize.py "$LOG_DIR"
