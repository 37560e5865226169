#!/usr/bin/env bash
# A seeded sweep of DMAP arms: train every (fold, arm, seed) at the same budget, evaluate each (its final
# weights and each step snapshot, for Dice against training step), then write the tables (per run, per arm
# mean +- std over folds and seeds, paired differences between arms with 95 % bootstrap intervals) and the
# training-curve pictures (script/ablation_report.py).
#
#   DATASET=CHAOST2 DATA_ROOT=data SV_DIR=runs/chaos_sv/supervoxels_5000 FOLDS="0" \
#       bash script/ablation.sh cpu               # arguments: named configs / Sacred overrides
#   ARMS="0:learned 0:fixed 0:off 1:learned" PARALLEL=2 bash script/ablation.sh cpu
#   FOLDS="0 1" MODES="learned off" SEEDS="1 2 3" PARALLEL=2 bash script/ablation.sh cpu
#
# Environment (defaults): DATASET (CHAOST2), SETTING (1), DATA_ROOT (data), SV_DIR (unset: the data
# folder's supervoxels_<n_sv>), FOLDS ("0"), MODES ("learned fixed off"), SEEDS (unset: the config's seed,
# run folders without a seed suffix; else each arm once per seed, in folders ending _seed<k>), ARMS (every
# FOLDS x MODES pair as fold:mode, or fold:mode:seed triples), LOG_DIR (runs/ablation), PARALLEL (1: arms
# one after another with all cores; N: N lanes of arms side by side, lane k pinned to core k with nproc/N
# threads; THREADS overrides the thread count), RAW_TOO (1: also score the raw weights of runs that keep averaged ones), PYTHON (python).
# Finished arms are not retrained (resume=True) and evaluated snapshots are not re-evaluated, so the script
# can be re-run after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-CHAOST2}
SETTING=${SETTING:-1}
DATA_ROOT=${DATA_ROOT:-data}
FOLDS=${FOLDS:-0}
MODES=${MODES:-"learned fixed off"}
LOG_DIR=${LOG_DIR:-runs/ablation}
PARALLEL=${PARALLEL:-1}
PYTHON=${PYTHON:-python}
if [ -z "${ARMS:-}" ]; then
  ARMS=""
  for seed in ${SEEDS:--}; do for fold in $FOLDS; do for mode in $MODES; do
    if [ "$seed" = "-" ]; then ARMS="$ARMS $fold:$mode"; else ARMS="$ARMS $fold:$mode:$seed"; fi
  done; done; done
fi
read -r -a arms <<< "$ARMS"
cores=$(nproc)
threads=${THREADS:-$(( cores / PARALLEL > 0 ? cores / PARALLEL : 1 ))}
common=(dataset="$DATASET" setting="$SETTING" data_root="$DATA_ROOT" path.log_dir="$LOG_DIR" num_threads="$threads")
if [ -n "${SV_DIR:-}" ]; then common+=(supervoxel_dir="$SV_DIR"); fi

run_arm() {  # fold mode seed(- for the config's) log_prefix; then named configs / overrides
  local fold=$1 mode=$2 seed=$3 log=$4; shift 4
  local pin=() arm=(eval_fold="$fold" model.dmap_mode="$mode") eval_opts=()
  if [ "$PARALLEL" -gt 1 ] && command -v taskset >/dev/null; then pin=(taskset -c "$PIN_CORE"); fi
  local name="${DATASET}_setting${SETTING}_fold${fold}_${mode}"
  if [ "$seed" != "-" ]; then arm+=(seed="$seed" tag="seed$seed"); name="${name}_seed$seed"; fi
  if [ "${RAW_TOO:-0}" = 1 ]; then eval_opts+=(--raw-too); fi
  echo "== $name: training (log $log.train.log)"
  "${pin[@]}" "$PYTHON" training.py with "$@" "${common[@]}" "${arm[@]}" resume=True > "$log.train.log" 2>&1
  echo "== $name: evaluating the final weights and every snapshot"
  "${pin[@]}" "$PYTHON" script/evaluate_snapshots.py "${eval_opts[@]}" -- "$@" "${common[@]}" "${arm[@]}" \
    > "$log.test.log" 2>&1
}

mkdir -p "$LOG_DIR/logs"
start=$(date +%s)
pids=()
for (( lane = 0; lane < PARALLEL; lane++ )); do
  (
    export PIN_CORE=$(( lane % cores ))
    for (( i = lane; i < ${#arms[@]}; i += PARALLEL )); do
      IFS=: read -r fold mode seed <<< "${arms[$i]}"
      seed=${seed:--}
      suffix=$([ "$seed" = "-" ] && echo "" || echo "_seed$seed")
      run_arm "$fold" "$mode" "$seed" "$LOG_DIR/logs/fold${fold}_${mode}${suffix}" "$@"
    done
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || { echo "an arm failed: see $LOG_DIR/logs/*.log" >&2; exit 1; }
"$PYTHON" script/ablation_report.py "$LOG_DIR"
echo "ablation finished in $(( $(date +%s) - start )) s; table and pictures in $LOG_DIR"
