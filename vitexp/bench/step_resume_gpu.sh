#!/bin/bash
# The mid-epoch resume on a GPU, in one short run: the device loader's draws and crop/flip on CUDA equal the CPU's,
# and two signal trials (distill on the on-device loader, train on workers) resume to the uninterrupted run.
#   bash vitexp/bench/step_resume_gpu.sh      (from the repository root; writes $OUT/step_resume_gpu.log if set)
set -u
export PYTHONPATH=$PWD
LOG=${OUT:-/tmp}/step_resume_gpu.log
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$LOG"
python - <<'PY' 2>&1 | tee -a "$LOG"
import torch
from vitexp.data import CropFlip, uniform_draws
idx = torch.randint(0, 50_000, (4096,))
u_cpu, u_gpu = uniform_draws(3, 7, idx, 3), uniform_draws(3, 7, idx.cuda(), 3)
print("draws equal on cuda and cpu:", torch.equal(u_cpu, u_gpu.cpu()))
images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
aug = CropFlip(4, 0.5)
print("crop/flip equal on cuda and cpu:", torch.equal(aug(images, u_cpu), aug(images.cuda(), u_gpu).cpu()))
PY
VITEXP_RELIABILITY_DEVICE=cuda timeout 200 python -m pytest -p no:cacheprovider -n 0 -q -s \
  tests/reliability/test_step_resume.py -k "distill-device or train-workers" 2>&1 | tail -25 | tee -a "$LOG"
