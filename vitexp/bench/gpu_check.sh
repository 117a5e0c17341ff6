#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one bounded run (about 10 minutes): a clear error when a batch does not
# fit, a plain run beside a torchrun run, the step of ViT-Ti/4@32 at batch 1024 beside the reference loop
# (bf16 + compile), and the CIFAR-10 speed run with whatever time is left.
# Usage (repository root): bash vitexp/bench/gpu_check.sh [anchor_step.py] [cifar10 train.tar.gz] [seconds]
set -uo pipefail
ANCHOR=${1:-../shared/bench/anchor_step.py}
TARBALL=${2:-../shared/data/cifar10/train.tar.gz}
BUDGET=${3:-570}
PY=${PYTHON:-python3}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
step() {  # step <max seconds> <label> <command...>: run with a deadline, print its last lines and the wall time
  local cap=$1 label=$2; shift 2
  local t=$(left); ((t > cap)) && t=$cap
  if ((t < 20)); then echo "== $label: skipped, no time left"; return; fi
  echo "== $label (limit ${t}s): $*"
  local s=$SECONDS
  timeout "$t" "$@" >"/tmp/$label.log" 2>&1; local rc=$?
  grep -E "error|Error|epoch +[0-9]+/|done:|img_per_s|resuming|params" "/tmp/$label.log" | tail -n 120
  echo "== $label: exit $rc, $((SECONDS - s)) s"
}
if [ ! -d data/cifar10/train ]; then
  mkdir -p data/cifar10 && tar -xzf "$TARBALL" -C data/cifar10
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)"
T="data=cifar10 data.num_workers=12 trainer.progress=false"
# a batch that cannot fit: one line naming the fix, exit 2
step 90 oom $PY -m vitexp $T model=vit_tiny data.batch_size=40000 trainer.max_epochs=1 trainer.compile=false
# the same two epochs, plain and under torchrun with one process
step 80 plain $PY -m vitexp $T trainer.max_epochs=2 trainer.compile=false hydra.run.dir=outputs/plain
step 80 torchrun $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m vitexp $T trainer.max_epochs=2 \
  trainer.compile=false hydra.run.dir=outputs/torchrun
for r in plain torchrun; do echo "$r: $(grep -o '"train_img_per_s": [0-9.]*' outputs/$r/results.json)"; done
# the step: reference loop (its own process) and task=benchmark (which also times the reference in-process)
step 100 anchor $PY "$ANCHOR" --device cuda --batch-size 1024 --bf16 --compile --fused --steps 50
cat /tmp/anchor.log | tail -1
step 170 benchmark $PY -m vitexp task=benchmark model=vit_tiny $T data.batch_size=1024 task.steps=50 \
  task.warmup_steps=10 task.repeats=2
# the speed run, with what is left
step 600 speedrun $PY -m vitexp experiment=cifar10_speedrun hydra.run.dir=outputs/speedrun
grep -E "wall|best_val_acc1" outputs/speedrun/results.json 2>/dev/null
echo "total $((SECONDS - START)) s"
