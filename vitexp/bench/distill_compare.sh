#!/usr/bin/env bash
# Equal-budget distillation comparison on CIFAR-10 on a CPU: the same patch8 ViT student trained alone
# and distilled (soft, hard, token) from a ResNet-18 teacher, same epochs, data subset and seed.
#   bash vitexp/bench/distill_compare.sh [data root] [output folder] [student epochs] [teacher best.pt]
# Without a teacher checkpoint the hard run trains one first (15 epochs, in <out>/hard/teacher).
# Prints one line per run: name, best val acc1, wall seconds.
set -euo pipefail
root=${1:-data/cifar10}
out=${2:-outputs/distill_compare}
epochs=${3:-15}
teacher_ckpt=${4:-}
common=(data=cifar10 "data.root=$root" data.train_subset=10000 data.num_workers=1 model=patch8
        "trainer.max_epochs=$epochs" optim.warmup_epochs=1 trainer.progress=false seed=0)
if [ -z "$teacher_ckpt" ]; then
  python -m vitexp task=distill task.distill_type=hard task.teacher.model_name=resnet18 \
    task.teacher.small_input=false task.teacher_epochs=15 "${common[@]}" "hydra.run.dir=$out/hard"
  teacher_ckpt=$out/hard/teacher/checkpoints/best.pt
  kinds=(soft token)
else
  kinds=(hard soft token)
fi
for kind in "${kinds[@]}"; do
  python -m vitexp task=distill "task.distill_type=$kind" "task.teacher_ckpt=$teacher_ckpt" "${common[@]}" \
    "hydra.run.dir=$out/$kind"
done
python -m vitexp task=train "${common[@]}" "hydra.run.dir=$out/alone"
for run in alone soft hard token; do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:>6} best_val_acc1 {r['best_val_acc1']:.4f} teacher {r.get('teacher_val_acc1')} wall_s {r['wall_s']:.0f}\")" \
    "$out/$run/results.json" "$run"
done
