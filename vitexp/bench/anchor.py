"""The reference loop of ../shared/bench/anchor_step.py, callable in this process so that `task=benchmark` can
time it right beside vitexp's own step: a plain timm VisionTransformer, AdamW (lr 1e-3, weight decay 0.05),
cross-entropy, one synthetic batch that stays on the device, optional bf16 autocast and torch.compile."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


def anchor_img_per_s(
    vit_kwargs: dict[str, Any],
    batch_size: int,
    device: torch.device,
    *,
    bf16: bool = False,
    compile: bool = False,
    warmup: int = 5,
    steps: int = 20,
    fused: bool = False,
) -> float:
    """Training images/s of the reference loop for a VisionTransformer(**vit_kwargs), warm-up excluded."""
    torch.manual_seed(0)
    model = VisionTransformer(**vit_kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=fused or None)
    step_model = torch.compile(model) if compile else model
    size = vit_kwargs["img_size"]
    x = torch.randn(batch_size, vit_kwargs["in_chans"], size, size, device=device)
    y = torch.randint(0, vit_kwargs["num_classes"], (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch_size * steps / (time.perf_counter() - start)
