#!/usr/bin/env bash
# The whole stage chain on one device, with reduced token counts, timed stage by stage:
#   NCA search -> NCA data -> NCA training -> boundaries -> data -> fullcorpus (killed right after a
#   checkpoint through the engine's KOTODAMA_FAULT_KILL_AT_STEP, then resumed) -> eval -> report.
#
#   bench/gpu_rehearsal.sh                      # proxy-108m on the GPU (bench/rehearsal/*.yaml)
#   bench/gpu_rehearsal.sh --preset tiny        # the CPU version (runs/nca-tiny, runs/fullcorpus-tiny): its CI test
#
# Options: --out DIR (default: a new temporary folder), --shared DIR (the shared data folder holding
# data/corpus-mix, data/smollm2-tokenizer and data/eval; default: ../shared beside the repository),
# --kill-at STEP (default: 20 on tiny, 40 on proxy-108m; a checkpoint step), --compile (torch.compile
# for both training runs), --python PY (default: .venv/bin/python when present, else python3),
# --set KEY=VALUE (an extra override for every stage, repeatable), --steady N (after the chain, one more
# fullcorpus training stage of N steps on the same data with checkpoints, validation and the monitor on;
# on proxy-108m at the benchmark's shape, micro-batch 8 x 4096, compiled: its steady tokens/s beside
# bench/train_throughput.py's `project` figure, and its checkpoint/validation/monitor stalls, each apart),
# --steady-only N (the data stage and that steady stage alone, from scratch weights: the stage-speed check
# without the chain).
# Prints one `[rehearsal] <stage> <seconds> s (exit N) | headline ...` line per stage, then a table;
# OUT/rehearsal.jsonl keeps the same lines as JSON. Exits non-zero when a stage fails, when the killed
# run was not killed, or when the resumed run did not resume from the kill step.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET=proxy-108m
OUT=""
SHARED="$REPO/../shared"
KILL_AT=""
COMPILE=0
STEADY=0
STEADY_ONLY=0
PY=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --shared) SHARED="$2"; shift 2 ;;
    --kill-at) KILL_AT="$2"; shift 2 ;;
    --compile) COMPILE=1; shift ;;
    --steady) STEADY="$2"; shift 2
      [[ $STEADY =~ ^[0-9]+$ ]] || { echo "gpu_rehearsal.sh: --steady takes a number of steps, got $STEADY" >&2; exit 2; } ;;
    --steady-only) STEADY="$2"; STEADY_ONLY=1; shift 2
      [[ $STEADY =~ ^[1-9][0-9]*$ ]] || { echo "gpu_rehearsal.sh: --steady-only takes a number of steps, got $STEADY" >&2; exit 2; } ;;
    --python) PY="$2"; shift 2 ;;
    --set) EXTRA+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_rehearsal.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
case "$PRESET" in
  tiny)
    NCA_CFG="$REPO/configs/runs/nca-tiny.yaml"; FC_CFG="$REPO/configs/runs/fullcorpus-tiny.yaml"
    KILL_AT="${KILL_AT:-20}" ;;
  proxy-108m)
    NCA_CFG="$REPO/bench/rehearsal/nca-proxy-108m.yaml"; FC_CFG="$REPO/bench/rehearsal/fullcorpus-proxy-108m.yaml"
    KILL_AT="${KILL_AT:-40}"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      || { echo "gpu_rehearsal.sh: --preset proxy-108m needs a CUDA device (use --preset tiny on a CPU)" >&2; exit 2; } ;;
  *) echo "gpu_rehearsal.sh: --preset must be tiny or proxy-108m, got $PRESET" >&2; exit 2 ;;
esac
SHARED="$(cd "$SHARED" 2>/dev/null && pwd)" \
  || { echo "gpu_rehearsal.sh: shared data folder not found (pass --shared DIR holding data/corpus-mix)" >&2; exit 2; }
for need in data/corpus-mix data/smollm2-tokenizer/tokenizer.json data/eval; do
  [[ -e "$SHARED/$need" ]] || { echo "gpu_rehearsal.sh: $SHARED/$need is missing (--shared DIR)" >&2; exit 2; }
done
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/kotodama-rehearsal.XXXXXX")}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/rehearsal.jsonl"
: > "$LOG"

# The configs name their files "../shared/data/...", relative to the repository: point data.files_root
# at a folder whose sibling `shared` is the shared data, so any --shared works (the device has no
# ../shared beside the copy of the repository it runs).
mkdir -p "$OUT/paths/root"
ln -sfn "$SHARED" "$OUT/paths/shared"
SETS=(--set "data.files_root=$OUT/paths/root"
      --set "eval.data_dir=$SHARED/data/eval"
      --set "eval.tokenizer=$SHARED/data/smollm2-tokenizer/tokenizer.json"
      --set "eval.val_bpb.tokenizer=$SHARED/data/smollm2-tokenizer/tokenizer.json")
if [[ -n "${EXTRA[*]:-}" ]]; then SETS+=("${EXTRA[@]}"); fi
TRAIN_SETS=()
if [[ $COMPILE == 1 ]]; then TRAIN_SETS=(--set train.compile=true); fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
cd "$REPO"
echo "[rehearsal] preset $PRESET, out $OUT, shared $SHARED, kill at step $KILL_AT, python $PY"

# run_stage STEP_NAME KIND ARTIFACT EXPECT -- command...: runs, times and reports one stage.
# EXPECT is "ok" (exit 0 required) or "killed" (a non-zero exit required).
STATUS=0
run_stage() {
  local name="$1" kind="$2" artifact="$3" expect="$4"; shift 5
  local start ms code=0
  start=$(date +%s%N)
  "$@" || code=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  "$PY" "$REPO/bench/rehearsal_headline.py" "$name" "$artifact" "$((ms / 1000)).$(printf %03d $((ms % 1000)))" \
    --kind "$kind" --exit "$code" --json-out "$LOG"
  if [[ $expect == ok && $code != 0 ]]; then
    echo "[rehearsal] FAILED: $name exited $code" >&2; STATUS=1; summary; exit 1
  fi
  if [[ $expect == killed && $code == 0 ]]; then
    echo "[rehearsal] FAILED: $name was to be killed after step $KILL_AT but finished" >&2; STATUS=1; summary; exit 1
  fi
}
summary() {
  echo "[rehearsal] summary ($PRESET)"
  "$PY" "$REPO/bench/rehearsal_headline.py" --summary "$LOG"
}
stage() { "$PY" -m "stages.$1" "${@:2}"; }

STEADY_INIT=(--input "init=$OUT/nca")
if [[ $STEADY_ONLY == 1 ]]; then
  run_stage data data "$OUT/data" ok -- \
    stage data --config "$FC_CFG" --out "$OUT/data" "${SETS[@]}"
  STEADY_INIT=(--set train.init.mode=scratch)
else
  run_stage nca_search nca_search "$OUT/rules" ok -- \
    stage nca_search --config "$NCA_CFG" --out "$OUT/rules" "${SETS[@]}"
  run_stage nca_data nca_data "$OUT/nca-data" ok -- \
    stage nca_data --config "$NCA_CFG" --out "$OUT/nca-data" --input "rules=$OUT/rules" "${SETS[@]}"
  run_stage nca_train train "$OUT/nca" ok -- \
    stage train --config "$NCA_CFG" --out "$OUT/nca" --input "data=$OUT/nca-data" "${SETS[@]}" "${TRAIN_SETS[@]}"
  run_stage boundaries boundaries "$OUT/bounds" ok -- \
    stage boundaries --config "$NCA_CFG" --out "$OUT/bounds" --input "checkpoint=$OUT/nca" --input "data=$OUT/nca-data" "${SETS[@]}"
  run_stage data data "$OUT/data" ok -- \
    stage data --config "$FC_CFG" --out "$OUT/data" "${SETS[@]}"
  FC_ARGS=(--config "$FC_CFG" --out "$OUT/fc" --input "data=$OUT/data" --input "init=$OUT/nca" "${SETS[@]}" "${TRAIN_SETS[@]}")
  KOTODAMA_FAULT_KILL_AT_STEP="$KILL_AT" run_stage fullcorpus_killed train "$OUT/fc" killed -- stage train "${FC_ARGS[@]}"
  run_stage fullcorpus_resumed train "$OUT/fc" ok -- stage train "${FC_ARGS[@]}"
  "$PY" - "$OUT/fc/manifest.json" "$KILL_AT" <<'EOF'
import json, sys
manifest, kill_at = json.load(open(sys.argv[1])), int(sys.argv[2])
if manifest.get("resumed_from") != kill_at or manifest.get("status") != "completed_after_resume":
    sys.exit(f"[rehearsal] FAILED: the resumed run reports resumed_from={manifest.get('resumed_from')} "
             f"status={manifest.get('status')}, expected resumed_from={kill_at}, completed_after_resume")
print(f"[rehearsal] fullcorpus resumed from step {kill_at}: status {manifest['status']}")
EOF
  run_stage eval eval "$OUT/eval" ok -- \
    stage eval --config "$FC_CFG" --out "$OUT/eval" --input "checkpoint=$OUT/fc" --input "data=$OUT/data" "${SETS[@]}"
  run_stage report report "$OUT/report" ok -- \
    stage report --config "$FC_CFG" --out "$OUT/report" --input "train=$OUT/fc" --input "eval=$OUT/eval" "${SETS[@]}"
fi
if [[ $STEADY -gt 0 ]]; then
  # Steady-state figures: the small data repeats (max_epochs off), and every kind of stall happens at
  # least twice in the run.
  EVERY=$(( STEADY / 3 > 1 ? STEADY / 3 : 1 ))
  STEADY_SETS=(--set "train.steps=$STEADY" --set train.max_epochs=null
               --set "train.log_every=$(( EVERY / 4 > 1 ? EVERY / 4 : 1 ))"
               --set "train.checkpoint.every_steps=$EVERY" --set "train.val_every=$EVERY"
               --set train.monitor.enabled=true --set "train.monitor.every_steps=$EVERY")
  if [[ $PRESET == proxy-108m ]]; then
    STEADY_SETS+=(--set train.micro_batch=8 --set train.global_batch_tokens=32768 --set train.compile=true)
  fi
  run_stage fullcorpus_steady train "$OUT/steady" ok -- \
    stage train --config "$FC_CFG" --out "$OUT/steady" --input "data=$OUT/data" "${STEADY_INIT[@]}" \
      "${SETS[@]}" "${STEADY_SETS[@]}"
fi
summary
