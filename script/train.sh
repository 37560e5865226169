#!/usr/bin/env bash
# Train DMAP on each fold of a data set (Sacred overrides given as arguments are passed through).
#
#   DATASET=CHAOST2 SETTING=2 DATA_ROOT=data bash script/train.sh 'model.weights_path=weights/r101.pth'
#   NPROC=4 GPU=0,1,2,3 bash script/train.sh          # one process per GPU with torchrun
#
# Environment (defaults): DATASET (CHAOST2), SETTING (1), DATA_ROOT (data), FOLDS ("0 1 2 3 4"),
# N_STEPS (33000), MODE (learned: learned|fixed|off), LOG_DIR (runs), GPU (unset: all visible),
# NPROC (1), PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."
. script/run_env.sh  # DATASET SETTING DATA_ROOT FOLDS MODE LOG_DIR PYTHON GPU

N_STEPS=${N_STEPS:-33000}
NPROC=${NPROC:-1}

if [ "$NPROC" -gt 1 ]; then
  launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
else
  launcher=("$PYTHON")
fi

for fold in $FOLDS; do
  echo "== training $DATASET setting $SETTING fold $fold ($MODE, $N_STEPS steps)"
  "${launcher[@]}" training.py with dataset="$DATASET" setting="$SETTING" eval_fold="$fold" \
    data_root="$DATA_ROOT" n_steps="$N_STEPS" model.dmap_mode="$MODE" path.log_dir="$LOG_DIR" "$@"
done
