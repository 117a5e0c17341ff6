#!/bin/bash
# The mid-epoch resume and the kill trials on a GPU in one short run (about 4 minutes of trials on one H200):
#   1. the device loader's draws and crop/flip on CUDA equal the CPU's
#   2. two uninterrupted runs with trainer.deterministic=false, and two with true: bitwise equal or not
#   3. on cuda, with trainer.deterministic=true: the default step-resume trials, VITEXP_TRIALS (default 4) random
#      ones per task (train, distill, prune; SIGKILL at a step or a signal mid-epoch, on the worker and the
#      on-device loader), and the default kill-and-resume trials of train, distill, prune and prune with distillation
#   4. (unless BENCH_S=0) the ViT-Ti/4 training step at batch 1024 beside the in-process reference loop (compiled, bf16)
#   bash vitexp/bench/step_resume_gpu.sh      (from the repository root; writes $OUT/step_resume_gpu.log if set)
set -u
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
LOG=${OUT:-/tmp}/step_resume_gpu.log
PY=${PYTHON:-python3}
START=$SECONDS
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$LOG"
$PY - <<'PY' 2>&1 | tee -a "$LOG"
import torch
from vitexp.data import CropFlip, uniform_draws
idx = torch.randint(0, 50_000, (4096,))
u_cpu, u_gpu = uniform_draws(3, 7, idx, 3), uniform_draws(3, 7, idx.cuda(), 3)
print("draws equal on cuda and cpu:", torch.equal(u_cpu, u_gpu.cpu()))
images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
aug = CropFlip(4, 0.5)
print("crop/flip equal on cuda and cpu:", torch.equal(aug(images, u_cpu), aug(images.cuda(), u_gpu).cpu()))
PY
echo "== two uninterrupted runs each, with the fastest and with deterministic kernels ($((SECONDS - START)) s)" \
  | tee -a "$LOG"
for d in false true; do
  for i in 1 2; do
    $PY -m vitexp debug=fast trainer.device=cuda logger=none trainer.max_epochs=3 trainer.deterministic=$d \
      hydra.run.dir=outputs/determinism/$d-$i >/dev/null 2>&1 &
  done
done
wait
$PY - <<'PY' 2>&1 | tee -a "$LOG"
import torch
from vitexp import checkpoint
for d in ("false", "true"):
    a, b = (checkpoint.load(f"outputs/determinism/{d}-{i}/checkpoints/last.pt")["model"] for i in (1, 2))
    same = [k for k in a if torch.equal(a[k], b[k])]
    print(f"trainer.deterministic={d}: {len(same)} of {len(a)} tensors bitwise equal between two runs")
PY
echo "== trials on cuda ($((SECONDS - START)) s)" | tee -a "$LOG"
VITEXP_RELIABILITY_DEVICE=cuda VITEXP_TRIALS=${VITEXP_TRIALS:-4} timeout -k 10 ${TRIALS_S:-330} \
  $PY -m pytest -o addopts="" -p no:cacheprovider -n ${WORKERS:-12} --dist load -q -rA \
  tests/reliability/test_step_resume.py \
  "tests/reliability/test_kill_resume.py::test_a_killed_run_resumes_to_the_uninterrupted_result" \
  -k "not distill-eval" 2>&1 | grep -E "SIG|steps completed|PASSED|FAILED|ERROR|Error|assert|passed|failed" \
  | tail -60 | tee -a "$LOG"
[ "${BENCH_S:-120}" = 0 ] && exit 0
echo "== benchmark ($((SECONDS - START)) s)" | tee -a "$LOG"
timeout -k 10 ${BENCH_S:-120} $PY -m vitexp task=benchmark model=vit_tiny data=cifar10 data.batch_size=1024 \
  trainer.progress=false logger=none task.steps=50 task.warmup_steps=10 task.repeats=2 \
  hydra.run.dir=outputs/gpu_benchmark 2>&1 | grep -E "img/s|^\{|Error" | tail -3 | tee -a "$LOG"
echo "== total $((SECONDS - START)) s" | tee -a "$LOG"
