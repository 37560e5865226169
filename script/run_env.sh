# Sourced (not run) by script/train.sh and script/test.sh from the repository root: the environment their
# per-fold runs share, with its defaults, so that training and testing read the same values.
# DATASET (CHAOST2), SETTING (1), DATA_ROOT (data), FOLDS ("0 1 2 3 4"), MODE (learned), N_STEPS (33000),
# LOG_DIR (runs), PYTHON (python), GPU (unset: all visible; else exported as CUDA_VISIBLE_DEVICES).
# Both scripts pass the same training keys, so test.sh finds the run folder train.sh wrote (config.run_dir).
DATASET=${DATASET:-CHAOST2}
SETTING=${SETTING:-1}
DATA_ROOT=${DATA_ROOT:-data}
FOLDS=${FOLDS:-"0 1 2 3 4"}
MODE=${MODE:-learned}
N_STEPS=${N_STEPS:-33000}
LOG_DIR=${LOG_DIR:-runs}
PYTHON=${PYTHON:-python}
if [ -n "${GPU:-}" ]; then export CUDA_VISIBLE_DEVICES="$GPU"; fi
