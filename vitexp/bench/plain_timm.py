"""The plain loop that vitexp.bench.whole_run times against `python -m vitexp`: timm's train.py on an ImageFolder tree
written out by hand (torchvision ImageFolder, timm's transforms, DataLoader with persistent workers, timm's
VisionTransformer, AdamW without decay on norms and biases, timm's cosine schedule per step, autocast, a validation
pass each epoch). Nothing of vitexp is used here but the bench's recipe constants."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from timm.data import create_transform
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from vitexp.bench import whole_run as recipe


def _loaders(tree: Path) -> tuple[DataLoader, DataLoader]:
    """timm's create_loader without the prefetcher: shuffled, drop_last training batches; validation batches of the
    training batch size; persistent workers for both."""
    common = {"input_size": recipe.IMG, "interpolation": "bicubic"}
    train_tf = create_transform(
        **common, is_training=True, scale=recipe.SCALE, hflip=0.5, color_jitter=recipe.JITTER, auto_augment=None
    )
    eval_tf = create_transform(**common, is_training=False, crop_pct=recipe.CROP_PCT)
    workers = {"num_workers": recipe.WORKERS, "persistent_workers": True}
    train = DataLoader(ImageFolder(tree / "train", train_tf), recipe.BATCH, shuffle=True, drop_last=True, **workers)
    val = DataLoader(ImageFolder(tree / "val", eval_tf), recipe.BATCH, **workers)
    return train, val


def _validate(model: torch.nn.Module, loader: DataLoader, dtype: torch.dtype | None) -> float:
    """Top-1 accuracy over `loader`."""
    model.eval()
    correct = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for images, targets in loader:
            correct += (model(images).argmax(-1) == targets).sum().item()
            total += len(targets)
    return correct / total


def train(tree: Path, epochs: int, precision: str) -> list[dict]:
    """Train ViT-Lite-7/4 on `tree` for `epochs`; per epoch: seconds, training images/s, validation seconds, top-1."""
    torch.manual_seed(0)
    train_loader, val_loader = _loaders(tree)
    model = VisionTransformer(img_size=recipe.IMG, num_classes=10, **recipe.VIT)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, recipe.WD), lr=recipe.LR)
    steps = len(train_loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=epochs * steps,
        lr_min=recipe.LR_MIN,
        warmup_t=recipe.WARMUP_EPOCHS * steps,
        warmup_lr_init=recipe.WARMUP_LR,
        t_in_epochs=False,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.SMOOTHING)
    dtype = torch.bfloat16 if precision == "bf16" else None
    figures, update = [], 0
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        seen = 0
        for images, targets in train_loader:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update += 1
            scheduler.step_update(update)
            seen += len(targets)
        train_s = time.perf_counter() - started
        acc1 = _validate(model, val_loader, dtype)
        epoch_s = time.perf_counter() - started
        figures.append({"epoch_s": epoch_s, "img_s": seen / train_s, "val_s": epoch_s - train_s, "acc1": acc1})
        print(f"epoch {len(figures)}: {figures[-1]}", flush=True)
    return figures
