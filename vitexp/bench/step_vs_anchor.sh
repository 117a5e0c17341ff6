#!/usr/bin/env bash
# vitexp's training step (task=benchmark) beside ../shared/bench/anchor_step.py, back to back on this machine,
# for ViT-Ti/4@32 and the baseline at one batch size, fp32 and bf16; then one end-to-end CIFAR-10 epoch.
# Usage: bash vitexp/bench/step_vs_anchor.sh [anchor_step.py] [batch] [device]   (prints JSON lines)
set -euo pipefail
ANCHOR=${1:-../shared/bench/anchor_step.py}
BATCH=${2:-128}
DEVICE=${3:-cpu}
declare -A SHAPE=(
  [vit_tiny]="--embed-dim 192 --depth 12 --num-heads 3 --mlp-ratio 4"
  [baseline]="--embed-dim 256 --depth 7 --num-heads 4 --mlp-ratio 2"
)
for model in vit_tiny baseline; do
  for precision in 32 bf16; do
    flag=$([ "$precision" = bf16 ] && echo --bf16 || true)
    echo "anchor_step.py $model $precision: $(python "$ANCHOR" --device "$DEVICE" --batch-size "$BATCH" ${SHAPE[$model]} $flag)"
    echo "task=benchmark $model $precision: $(python -m vitexp task=benchmark model=$model data=cifar10 \
      data.batch_size="$BATCH" trainer.device="$DEVICE" trainer.precision=$precision 2>/dev/null | tail -1)"
  done
done
