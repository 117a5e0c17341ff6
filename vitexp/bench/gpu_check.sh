#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run: the step of ViT-Ti/4@32 at batch 1024 beside the reference
# loop (bf16 + compile), the real-data and device-resident paths, CUDA graphs, and the CIFAR-10 speed run.
# Usage (repository root, ../shared beside it): bash vitexp/bench/gpu_check.sh [anchor_step.py]
set -euo pipefail
ANCHOR=${1:-../shared/bench/anchor_step.py}
if [ ! -d data/cifar10/train ]; then
  mkdir -p data/cifar10 && tar -xzf ../shared/data/cifar10/train.tar.gz -C data/cifar10
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() { echo "$*: $("$@" 2>/dev/null | tail -1)"; }
run python "$ANCHOR" --device cuda --batch-size 1024 --bf16 --compile
run python "$ANCHOR" --device cuda --batch-size 1024 --bf16 --compile --fused
B="task=benchmark model=vit_tiny data=cifar10 data.batch_size=1024 task.steps=50 task.warmup_steps=10 task.repeats=3"
run python -m vitexp $B
run python -m vitexp $B trainer.compile_mode=max-autotune-no-cudagraphs
run python -m vitexp $B trainer.compile_mode=reduce-overhead
run python -m vitexp $B task.mode=real data.on_device=true
run python -m vitexp $B task.mode=real data.num_workers=12
run python -m vitexp task=benchmark model=baseline data=cifar10 data.batch_size=1024 task.steps=50 task.warmup_steps=10
/usr/bin/time -f "speedrun wall %e s" python -m vitexp experiment=cifar10_speedrun 2>&1 | grep -E "epoch [0-9]+/|done|wall"
