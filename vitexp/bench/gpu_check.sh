#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one bounded run (default 560 s), in this order so that nothing else uses
# the GPU while a timed part runs:
#   1. experiment=cifar10_speedrun, alone: wall, epochs, img/s, accuracy per epoch with the time since start
#   2. task=benchmark: the ViT-Ti/4 step at batch 1024 beside the in-process reference loop (ratio, MFU)
#   3. experiment=cifar10_baseline with the time left (capped; how far it got is printed), and AT THE SAME TIME
#      the kill-and-resume trials on cuda (train, distill, prune once each), which share the GPU with it
#   4. with time left: the device augmentation alone (ms per batch, eager and compiled) and the standalone anchor
# SPEEDRUN_ARGS and BASELINE_ARGS add overrides to those two runs (e.g. SPEEDRUN_ARGS=trainer.compile_mode=reduce-overhead).
# SMOKE=1 runs every part for a few steps (about 2 minutes, most of it compiling and decoding) to check the script
# and the machine first.
# Usage (repository root): [SMOKE=1] bash vitexp/bench/gpu_check.sh [anchor_step.py] [cifar10 train.tar.gz] [seconds]
# Copies results.json, metrics.csv and the log of the speed run and the baseline, and every part's log, to $OUT.
set -uo pipefail
ANCHOR=${1:-../shared/bench/anchor_step.py}
TARBALL=${2:-../shared/data/cifar10/train.tar.gz}
BUDGET=${3:-560}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
START=$SECONDS
RUNS=outputs/gpu_check_$(date +%Y%m%d_%H%M%S)
LOGS=$RUNS/logs
mkdir -p "$LOGS"
left() { echo $((BUDGET - (SECONDS - START))); }
cap() { local t; t=$(left); ((t > $1)) && t=$1; echo "$t"; }  # cap <max seconds>: that, or the time left
step() {  # step <max seconds> <label> <command...>: run with a deadline, print its key lines and the wall time
  local t label=$2; t=$(cap "$1"); shift 2
  if ((t < 20)); then echo "== $label: skipped, ${t}s left"; return; fi
  echo "== $label (limit ${t}s): $*"
  local s=$SECONDS
  timeout -k 20 "$t" "$@" >"$LOGS/$label.log" 2>&1; local rc=$?
  grep -E "error|Error|Traceback|epoch +[0-9]+/|done:|img_per_s|ms/batch|passed|failed" "$LOGS/$label.log" | tail -n 25
  echo "== $label: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (stopped at its time limit)'), $((SECONDS - s)) s"
  WALL[$label]=$((SECONDS - s))
}
declare -A WALL
if [ ! -d data/cifar10/train ]; then
  mkdir -p data/cifar10 && tar -xzf "$TARBALL" -C data/cifar10
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)"
$PY -c "import pytest" 2>/dev/null || echo "!! pytest is not installed: the kill-and-resume trials (part 3) cannot run"
echo "setup: $((SECONDS - START)) s; smoke=$SMOKE; runs in $RUNS"
if [ "$SMOKE" = 1 ]; then
  # the speed run compiled as the real one is (model and augmentation), on a 2-block model to compile faster
  SPEED=(trainer.max_epochs=2 trainer.limit_train_batches=5 data.train_subset=5120 model.depth=2)
  BASE=(trainer.max_epochs=1 trainer.limit_train_batches=5 trainer.compile=false data.train_subset=1280)
  BENCH=(task.steps=3 task.warmup_steps=1 task.repeats=1 trainer.compile=false)
  TRIALS="train-save-3"
  SPEED_CAP=90 BENCH_CAP=60
else
  SPEED=() BASE=() BENCH=(task.steps=50 task.warmup_steps=10 task.repeats=2)
  TRIALS="train-save-3 or distill-step-6 or prune-save-6"
  SPEED_CAP=240 BENCH_CAP=110
fi

# 1. the speed run, alone on the GPU; its start time anchors the time-to-accuracy figures
SPEED_T0=$(date +%s.%N)
# shellcheck disable=SC2086  # SPEEDRUN_ARGS / BASELINE_ARGS: extra overrides, word-split on purpose
step "$SPEED_CAP" speedrun $PY -m vitexp experiment=cifar10_speedrun "${SPEED[@]}" ${SPEEDRUN_ARGS:-} \
  hydra.run.dir=$RUNS/speedrun

# 2. the step at batch 1024 beside the in-process reference loop
step "$BENCH_CAP" benchmark $PY -m vitexp task=benchmark model=vit_tiny data=cifar10 data.batch_size=1024 \
  trainer.progress=false "${BENCH[@]}" hydra.run.dir=$RUNS/benchmark

# 3. the baseline with what is left (less a margin for the summary), the kill trials beside it
BASE_T0=$(date +%s.%N)
T=$(($(left) - 15))
if $PY -c "import pytest" 2>/dev/null; then
  echo "== kill trials (beside the baseline, sharing the GPU): $TRIALS"
  (VITEXP_RELIABILITY_DEVICE=cuda timeout -k 10 "$((T > 30 ? T : 30))" $PY -m pytest -o addopts="" \
    -p no:cacheprovider -q -ra tests/reliability/test_kill_resume.py -k "$TRIALS" >"$LOGS/kill_trials.log" 2>&1
   echo "kill trials: exit $?" >>"$LOGS/kill_trials.log") &
  TRIALS_PID=$!
fi
step "$T" baseline $PY -m vitexp experiment=cifar10_baseline trainer.progress=false "${BASE[@]}" \
  ${BASELINE_ARGS:-} hydra.run.dir=$RUNS/baseline
[ -n "${TRIALS_PID:-}" ] && wait "$TRIALS_PID"
[ -f "$LOGS/kill_trials.log" ] && tail -n 8 "$LOGS/kill_trials.log"

# 4. with time left (not in SMOKE): the augmentation's own cost, then the standalone reference loop
[ "$SMOKE" = 1 ] || step 60 augment $PY - <<'EOF'
import time, torch
from vitexp.augment import DeviceAugment
for batch in (128, 1024):
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device="cuda")
    for compile in (False, True):
        aug = DeviceAugment("rand", 2, 9, 0.5, 0.5, 0.0, [0.49, 0.48, 0.45], compile=compile)
        u = torch.rand(batch, aug.n_draws, device="cuda")
        for _ in range(3): aug(x, u)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(50): aug(x, u)
        torch.cuda.synchronize()
        print(f"augment batch {batch} compiled={compile}: {(time.perf_counter() - t) / 50 * 1e3:.2f} ms/batch")
EOF
[ "$SMOKE" = 1 ] || [ ! -f "$ANCHOR" ] || step 100 anchor $PY "$ANCHOR" --device cuda --batch-size 1024 --bf16 --compile --fused --steps 50

# the figures
echo "=================== summary ($((SECONDS - START)) s in all) ==================="
echo "-- speedrun: whole command ${WALL[speedrun]:-?} s (figures below: time since the command started; budget 180 s)"
$PY -m vitexp.bench.run_summary $RUNS/speedrun "$SPEED_T0" --budget 180
echo "-- baseline: ${WALL[baseline]:-?} s, capped at ${T} s; shared the GPU with the kill trials"
$PY -m vitexp.bench.run_summary $RUNS/baseline "$BASE_T0" --budget 100000
echo "-- benchmark"; grep '^{' "$LOGS/benchmark.log" | tail -1
echo "-- kill trials"; grep -E "passed|failed|error|exit" "$LOGS/kill_trials.log" 2>/dev/null | tail -3
if [ -n "${OUT:-}" ]; then
  for r in speedrun baseline benchmark; do
    mkdir -p "$OUT/$r" && cp $RUNS/$r/{results.json,metrics.csv,*.log} "$OUT/$r/" 2>/dev/null
  done
  cp -r "$LOGS" "$OUT/logs"
  echo "copied to $OUT"
fi
echo "total $((SECONDS - START)) s"
