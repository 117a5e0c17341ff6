"""task=evaluate: score a checkpoint on the test split (or the run's own validation split)."""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig, open_dict

from vitexp import VitexpError, checkpoint, engine, plots
from vitexp.data import make_loader
from vitexp.logging import RunLogger
from vitexp.models import build_from_arch, count_macs, count_params, inference_img_per_s, input_shape
from vitexp.runtime import (
    autocast_dtype,
    build,
    load_weights,
    resolve_device,
    run_dir,
    seed_everything,
    show_progress,
    start_tracking,
)

log = logging.getLogger("vitexp")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the model from `cfg.ckpt_path` alone and report accuracy, per-class accuracy, params, MACs, img/s."""
    started = time.perf_counter()
    out = run_dir()
    if not cfg.ckpt_path:
        raise VitexpError("task=evaluate needs a checkpoint: pass ckpt_path=<run>/checkpoints/best.pt")
    ckpt = checkpoint.load(cfg.ckpt_path)
    start_tracking(cfg, out)
    model = build_from_arch(ckpt["arch"])
    load_weights(model, ckpt["model"], cfg.ckpt_path)
    chans, size, _ = input_shape(model)
    trained = ckpt["config"]
    with open_dict(cfg):
        cfg.data.img_size = size
        if trained["data"]["name"] == cfg.data.name:
            # The run's own held-out split: same seed, same size, never an image it trained on.
            cfg.seed = trained["seed"]
            cfg.data.val_size = trained["data"]["val_size"]
            cfg.data.train_subset = trained["data"]["train_subset"]
    if (chans, model.num_classes) != (cfg.data.in_chans, cfg.data.num_classes):
        raise VitexpError(
            f"{cfg.ckpt_path} expects {chans}-channel images and {model.num_classes} classes but data={cfg.data.name} "
            f"has {cfg.data.in_chans} and {cfg.data.num_classes}; pass data={trained['data']['name']} (and data.root)"
        )
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    amp = autocast_dtype(cfg.trainer.precision, device)
    model.to(device)

    splits = build(cfg.data.splits)
    split, dataset = ("test", splits.test) if splits.test is not None else ("val", splits.val)
    loader = make_loader(dataset, cfg.data.eval_batch_size, cfg.data.num_workers, False, False, device.type == "cuda")
    metrics, confusion = engine.evaluate(
        model, loader, device, cfg.data.num_classes,
        autocast_dtype=amp, limit_batches=cfg.trainer.limit_val_batches, progress=show_progress(cfg.trainer.progress),
    )  # fmt: skip
    per_class = (confusion.diag().float() / confusion.sum(dim=1).clamp(min=1)).tolist()
    name = ckpt["arch"]["name"]
    plots.confusion_matrix(confusion, splits.classes, out / "plots" / "confusion_matrix.png", f"{name} on {split}")
    results = {
        "task": cfg.task.name,
        "model": name,
        "data": cfg.data.name,
        "split": split,
        "ckpt_path": str(cfg.ckpt_path),
        "ckpt_epoch": ckpt["epoch"],
        f"{split}_loss": metrics["loss"],
        f"{split}_acc1": metrics["acc1"],
        f"{split}_acc5": metrics["acc5"],
        "images": int(confusion.sum()),
        **{f"{split}_acc1/{c}": a for c, a in zip(splits.classes, per_class)},
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": inference_img_per_s(model, cfg.data.eval_batch_size, amp),
        "device": str(device),
        "wall_s": time.perf_counter() - started,
        "status": "completed",
    }
    RunLogger(out).log_results(results)
    worst = sorted(zip(per_class, splits.classes))[:3]
    log.info(
        f"{name} epoch {ckpt['epoch']} on {cfg.data.name} {split} ({results['images']} images): "
        f"loss {metrics['loss']:.4f} | acc1 {metrics['acc1']:.4f} | acc5 {metrics['acc5']:.4f} | "
        f"{results['params'] / 1e6:.2f}M params | {results['macs'] / 1e6:.1f}M MACs | "
        f"{results['infer_img_per_s']:.0f} img/s | weakest: " + ", ".join(f"{c} {a:.3f}" for a, c in worst)
    )
    return results
