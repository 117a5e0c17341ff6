#!/usr/bin/env bash
# Equal-budget distillation comparison on CIFAR-10 on a CPU: a ResNet-18 teacher, then the same
# patch8 ViT student trained alone and distilled (soft, hard, token), same epochs, data and seed.
#   bash vitexp/bench/distill_compare.sh [data root] [output folder]
# Prints one line per run: name, best val acc1, wall seconds.
set -euo pipefail
root=${1:-data/cifar10}
out=${2:-outputs/distill_compare}
common=(data=cifar10 "data.root=$root" data.train_subset=10000 data.num_workers=1 model=patch8
        trainer.max_epochs=15 optim.warmup_epochs=1 trainer.progress=false seed=0)
teacher=(task.teacher.model_name=resnet18 task.teacher.small_input=false task.teacher_epochs=15)
python -m vitexp task=distill task.distill_type=hard "${teacher[@]}" "${common[@]}" "hydra.run.dir=$out/hard"
for kind in soft token; do
  python -m vitexp task=distill "task.distill_type=$kind" "task.teacher_ckpt=$out/hard/teacher/checkpoints/best.pt" \
    "${common[@]}" "hydra.run.dir=$out/$kind"
done
python -m vitexp task=train "${common[@]}" "hydra.run.dir=$out/alone"
for run in hard/teacher alone soft hard token; do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:>13} best_val_acc1 {r['best_val_acc1']:.4f} wall_s {r['wall_s']:.0f}\")" \
    "$out/$run/results.json" "$run"
done
