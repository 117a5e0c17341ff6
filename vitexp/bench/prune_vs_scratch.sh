#!/usr/bin/env bash
# The prune-vs-scratch comparison on two data sets, end to end: a dense digits baseline (the default recipe of
# `python -m vitexp`, 30 epochs) and a dense ViT on a 5,000-image CIFAR-10 subset (patch 8, dim 128, depth 4,
# 40 epochs, 1,000 validation images), then `python -m vitexp.bench.prune_vs_scratch` on each with budgets of 1, 3 and
# 10 epochs, 3 seeds per arm (SEEDS=1 for one), pruning by Taylor importance (the ranking global allocation is built
# on); on CIFAR-10 also the 4-block model pruned to a 2-block model's MACs against that model from scratch.
#
#   bash vitexp/bench/prune_vs_scratch.sh <out> <cifar10 root: train/<class>/*.jpg> [overrides for every run]
#   SKIP_CIFAR=1 bash vitexp/bench/prune_vs_scratch.sh <out> -     (the digits only; SKIP_DIGITS=1: CIFAR-10 only)
#
# Every arm of a comparison uses the same recipe (optim.warmup_epochs=0.5, so that a 1-epoch budget reaches its
# peak learning rate); trainer.compile=false keeps compilation time out of short budgets.
set -euo pipefail
seeds=(--seeds "${SEEDS:-3}")
out=$1
cifar=$2
shift 2
common=(logger=none trainer.compile=false trainer.progress=false "$@")
cifar_data=(data=cifar10 "data.root=$cifar" data.train_subset=5000 data.val_size=1000 data.download=false)
cifar_model=(model=patch8 model.embed_dim=128 model.depth=4)

if [[ "${SKIP_DIGITS:-0}" != 1 ]]; then
    python -m vitexp "${common[@]}" "hydra.run.dir=$out/digits/dense"
    python -m vitexp.bench.prune_vs_scratch "${common[@]}" optim.warmup_epochs=0.5 task.importance=taylor \
        "ckpt_path=$out/digits/dense/checkpoints/best.pt" --budgets 1,3,10 "${seeds[@]}" --out "$out/digits/compare"
fi

if [[ "${SKIP_CIFAR:-0}" != 1 ]]; then
    python -m vitexp "${common[@]}" "${cifar_data[@]}" "${cifar_model[@]}" trainer.max_epochs=40 optim.warmup_epochs=2 \
        "hydra.run.dir=$out/cifar/dense"
    python -m vitexp.bench.prune_vs_scratch "${common[@]}" "${cifar_data[@]}" "${cifar_model[@]}" optim.warmup_epochs=0.5 \
        task.importance=taylor "ckpt_path=$out/cifar/dense/checkpoints/best.pt" --budgets 1,3,10 "${seeds[@]}" \
        --target_model "model=patch8 model.embed_dim=128 model.depth=2" --out "$out/cifar/compare"
fi
