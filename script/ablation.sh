#!/usr/bin/env bash
# A seeded sweep of arms -- DMAP modes and other methods -- under one protocol: train every (fold, arm, seed)
# at the same budget, evaluate each (its final weights and each step snapshot, for Dice against training
# step), then write the tables (per run; per arm mean +- std over folds and seeds, parameters and training
# time; paired differences between arms with 95 % bootstrap intervals) and the training-curve pictures
# (script/ablation_report.py).
#
# An arm is a DMAP mode (learned, learned_st, fixed, off: model.method=dmap model.dmap_mode=<mode>) or another
# method (adnet, qnet, alpnet: model.method=<method>, each with its own components; docs/methods.md). With
# model.method given among the arguments, the arms can only be modes: that method's model.dmap_mode is swept
# (e.g. bash script/ablation.sh cpu model.method=adnet model.pooling=dmap).
#
#   DATASET=CHAOST2 DATA_ROOT=data SV_DIR=runs/chaos_sv/supervoxels_5000 FOLDS="0" \
#       bash script/ablation.sh cpu               # arguments: named configs / Sacred overrides
#   ARMS="0:learned 0:fixed 0:off 1:learned 0:adnet" PARALLEL=2 bash script/ablation.sh cpu
#   FOLDS="0 1" MODES="learned off" SEEDS="1 2 3" PARALLEL=2 bash script/ablation.sh cpu
#   METHODS="dmap:learned dmap:off adnet qnet alpnet" FOLDS="0 1 2" SEEDS="1 2 3" bash script/ablation.sh cpu
#   DRY_RUN=1 METHODS="dmap:learned adnet" bash script/ablation.sh cpu    # print the commands only
#
# Environment (defaults): DATASET (CHAOST2), SETTING (1), DATA_ROOT (data), SV_DIR (unset: the data
# folder's supervoxels_<n_sv>), FOLDS ("0"), MODES ("learned fixed off"), METHODS (unset: the arms are MODES;
# else the arms, each dmap:<mode>, dmap (= dmap:learned), a DMAP mode or adnet|qnet|alpnet), SEEDS (unset:
# the config's seed, run folders without a seed suffix; else each arm once per seed, in folders ending
# _seed<k>; a - among them is the config's seed: SEEDS="- 1 2"), ARMS (every FOLDS x arms pair as
# fold:arm, or fold:arm:seed triples; arm as in METHODS but without the dmap: prefix), LOG_DIR
# (runs/ablation), PARALLEL (1: arms one after another with all cores;
# N: N lanes of arms side by side, lane k pinned to core k with nproc/N threads; THREADS overrides the
# thread count), RAW_TOO (1: also score the raw weights of runs that keep averaged ones), EVAL_LAST (N:
# evaluate only the N latest step snapshots beside the final weights; 2 gives the last-three mean),
# TIME_LIMIT_MIN (minutes for the whole sweep, decimals allowed: each arm trains with what is left as
# time_limit_min and saves its step; an arm stopped by it is not evaluated, and arms after the budget is
# spent do not start; the same command later continues them), EARLIER (an earlier report's ablation.csv
# whose runs join the tables: ablation_report.py --earlier), DRY_RUN (1: print
# each arm's training and evaluation command, run nothing, write no report), PYTHON (python).
# Run folders are named by config.experiment_name: ..._fold<f>_<mode> for DMAP, ..._fold<f>_<method> else.
# Finished arms are not retrained (resume=True) and evaluated snapshots are not re-evaluated, so the script
# can be re-run after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-CHAOST2}
SETTING=${SETTING:-1}
DATA_ROOT=${DATA_ROOT:-data}
FOLDS=${FOLDS:-0}
MODES=${MODES:-"learned fixed off"}
METHODS=${METHODS:-}
LOG_DIR=${LOG_DIR:-runs/ablation}
PARALLEL=${PARALLEL:-1}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
DMAP_MODES="learned learned_st fixed off"
OTHER_METHODS="adnet qnet alpnet"

arm_name() {  # a METHODS / MODES word -> the arm's name (a DMAP mode or a method); exit 2 on an unknown word
  local word=$1
  case "$word" in
    dmap) echo learned; return ;;
    dmap:*) word=${word#dmap:} ;;
  esac
  for known in $DMAP_MODES $OTHER_METHODS; do
    if [ "$word" = "$known" ]; then echo "$word"; return; fi
  done
  echo "ablation.sh: unknown arm '$1'; expected a DMAP mode ($DMAP_MODES), dmap:<mode> or a method" \
       "($OTHER_METHODS)" >&2
  exit 2
}

is_method() { case " $OTHER_METHODS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

given_method=""  # model.method among the arguments: the arms sweep that method's dmap_mode
for word in "$@"; do case "$word" in model.method=*) given_method=$word ;; esac; done

arm_overrides() {  # arm -> the model overrides that select it
  if is_method "$1"; then echo "model.method=$1"
  elif [ -n "$given_method" ]; then echo "model.dmap_mode=$1"
  else echo "model.method=dmap model.dmap_mode=$1"
  fi
}

if [ -z "${ARMS:-}" ]; then
  names=""
  for word in ${METHODS:-$MODES}; do names="$names $(arm_name "$word")"; done
  ARMS=""
  for seed in ${SEEDS:--}; do for fold in $FOLDS; do for arm in $names; do
    if [ "$seed" = "-" ]; then ARMS="$ARMS $fold:$arm"; else ARMS="$ARMS $fold:$arm:$seed"; fi
  done; done; done
fi
read -r -d '' -a arms <<< "$ARMS" || true  # -d '': every line of a multi-line ARMS, not the first only
for entry in "${arms[@]}"; do  # refuse a misspelt arm, or a method given twice, before anything starts
  IFS=: read -r fold arm seed <<< "$entry"
  checked=$(arm_name "$arm")
  [ "$checked" = "$arm" ] || { echo "ablation.sh: arm '$entry': write the arm as $checked" >&2; exit 2; }
  if [ -n "$given_method" ] && { is_method "$arm" || [ -n "$METHODS" ]; }; then
    echo "ablation.sh: $given_method among the arguments and the method arms of METHODS/ARMS: name the" \
         "methods in one place" >&2
    exit 2
  fi
done
cores=$(nproc)
threads=${THREADS:-$(( cores / PARALLEL > 0 ? cores / PARALLEL : 1 ))}
common=(dataset="$DATASET" setting="$SETTING" data_root="$DATA_ROOT" path.log_dir="$LOG_DIR" num_threads="$threads")
if [ -n "${SV_DIR:-}" ]; then common+=(supervoxel_dir="$SV_DIR"); fi

run_arm() {  # fold arm seed(- for the config's) log_prefix; then named configs / overrides
  local fold=$1 arm_word=$2 seed=$3 log=$4; shift 4
  local pin=() arm=(eval_fold="$fold") eval_opts=()
  read -r -a selection <<< "$(arm_overrides "$arm_word")"
  arm+=("${selection[@]}")
  if [ "$PARALLEL" -gt 1 ] && command -v taskset >/dev/null; then pin=(taskset -c "$PIN_CORE"); fi
  local name="${DATASET}_setting${SETTING}_fold${fold}_${arm_word}"
  if [ "$seed" != "-" ]; then arm+=(seed="$seed" tag="seed$seed"); name="${name}_seed$seed"; fi
  if [ "${RAW_TOO:-0}" = 1 ]; then eval_opts+=(--raw-too); fi
  if [ -n "${EVAL_LAST:-}" ]; then eval_opts+=(--last "$EVAL_LAST"); fi
  local train=("$PYTHON" training.py with "$@" "${common[@]}" "${arm[@]}" resume=True)
  local evaluate=("$PYTHON" script/evaluate_snapshots.py "${eval_opts[@]}" -- "$@" "${common[@]}" "${arm[@]}")
  if [ "$DRY_RUN" = 1 ]; then  # one write per arm, so that parallel lanes do not interleave lines
    local t e
    t=$(printf '%q ' "${pin[@]}" "${train[@]}") e=$(printf '%q ' "${pin[@]}" "${evaluate[@]}")
    printf '== %s\ntrain: %s\nevaluate: %s\n' "$name" "${t% }" "${e% }"
    return
  fi
  if [ -n "${TIME_LIMIT_MIN:-}" ]; then
    local left
    left=$(awk -v end="$DEADLINE" -v now="$(date +%s.%N)" 'BEGIN { m = (end - now) / 60; if (m > 0) printf "%.4f", m }')
    if [ -z "$left" ]; then echo "== $name: not started, TIME_LIMIT_MIN is spent"; echo "$name" >> "$LOG_DIR/logs/unfinished"; return; fi
    train+=(time_limit_min="$left")
  fi
  echo "== $name: training (log $log.train.log)"
  "${pin[@]}" "${train[@]}" > "$log.train.log" 2>&1
  if grep -q "time_limit_min=.* reached after" "$log.train.log"; then
    echo "== $name: stopped by TIME_LIMIT_MIN (saved; run the same command again to continue), not evaluated"
    echo "$name" >> "$LOG_DIR/logs/unfinished"
    return
  fi
  echo "== $name: evaluating the final weights and every snapshot"
  "${pin[@]}" "${evaluate[@]}" > "$log.test.log" 2>&1
}

[ "$DRY_RUN" = 1 ] || { mkdir -p "$LOG_DIR/logs"; rm -f "$LOG_DIR/logs/unfinished"; }
start=$(date +%s)
if [ -n "${TIME_LIMIT_MIN:-}" ]; then
  DEADLINE=$(awk -v start="$start" -v m="$TIME_LIMIT_MIN" 'BEGIN { if (m + 0 <= 0) exit 1; printf "%.3f", start + 60 * m }') \
    || { echo "ablation.sh: TIME_LIMIT_MIN is '$TIME_LIMIT_MIN'; expected a positive number of minutes" >&2; exit 2; }
  export DEADLINE
fi
pids=()
for (( lane = 0; lane < PARALLEL; lane++ )); do
  (
    export PIN_CORE=$(( lane % cores ))
    for (( i = lane; i < ${#arms[@]}; i += PARALLEL )); do
      IFS=: read -r fold arm seed <<< "${arms[$i]}"
      seed=${seed:--}
      suffix=$([ "$seed" = "-" ] && echo "" || echo "_seed$seed")
      run_arm "$fold" "$arm" "$seed" "$LOG_DIR/logs/fold${fold}_${arm}${suffix}" "$@"
    done
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || { echo "an arm failed: see $LOG_DIR/logs/*.log" >&2; exit 1; }
[ "$DRY_RUN" = 1 ] && exit 0
if [ -s "$LOG_DIR/logs/unfinished" ]; then
  echo "$(wc -l < "$LOG_DIR/logs/unfinished") arm(s) unfinished when TIME_LIMIT_MIN was spent; run the same" \
       "command again to continue them"
  # the report covers the arms evaluated so far; exit 2 means none is yet
  report_status=0
  "$PYTHON" script/ablation_report.py "$LOG_DIR" ${EARLIER:+--earlier "$EARLIER"} || report_status=$?
  [ "$report_status" -eq 0 ] || [ "$report_status" -eq 2 ] || exit "$report_status"
  exit 0
fi
"$PYTHON" script/ablation_report.py "$LOG_DIR" ${EARLIER:+--earlier "$EARLIER"}
echo "ablation finished in $(( $(date +%s) - start )) s; table and pictures in $LOG_DIR"
