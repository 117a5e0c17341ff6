"""task=evaluate: score a checkpoint on the test split (or the run's own validation split)."""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig

from vitexp import VitexpError, checkpoint, engine, plots
from vitexp.config import build, run_dir
from vitexp.data import make_loader
from vitexp.files import printable
from vitexp.hardware import autocast_dtype, resolve_device, seed_everything, show_progress
from vitexp.models import count_macs, count_params, inference_img_per_s, input_shape
from vitexp.records import write_results
from vitexp.tasks.recipe import start_tracking
from vitexp.training import check_resume_fields

log = logging.getLogger("vitexp")

SWEEP_METRIC = "test_acc1"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the model from `ckpt_path` alone and report accuracy, per-class accuracy, params, MACs, img/s."""
    started, out, data = time.perf_counter(), run_dir(), cfg.data
    if not cfg.ckpt_path:
        raise VitexpError("task=evaluate needs a checkpoint: pass ckpt_path=<run>/checkpoints/best.pt")
    model, saved = checkpoint.load_model(cfg.ckpt_path)
    check_resume_fields(saved, cfg.ckpt_path, ["epoch"])  # a number, reported as the checkpoint's epoch
    start_tracking(cfg, out)
    chans, size, _ = input_shape(model)
    if (chans, model.num_classes) != (data.in_chans, data.num_classes):
        raise VitexpError(
            f"{cfg.ckpt_path} expects {chans}-channel images and {model.num_classes} classes but data={data.name} "
            f"has {data.in_chans} and {data.num_classes}; pass data={printable(_trained_on(saved).get('name'))} "
            f"(and data.root)"
        )
    seed, val_size, train_subset = _own_split(saved, cfg.seed, data)
    seed_everything(seed)
    device = resolve_device(cfg.trainer.device)
    amp = autocast_dtype(cfg.trainer.precision, device)
    model.to(device)
    transform = build(data.splits.eval_transform, img_size=size)  # the size the model was trained at
    splits = build(data.splits, seed=seed, val_size=val_size, train_subset=train_subset, train_transform=transform,
                   eval_transform=transform)  # fmt: skip
    split, dataset = ("test", splits.test) if splits.test is not None else ("val", splits.val)
    loader = make_loader(dataset, data.eval_batch_size, data.num_workers, False, False, device.type == "cuda")
    metrics, confusion = engine.evaluate(model, loader, device, data.num_classes, autocast_dtype=amp,
                                         limit_batches=cfg.trainer.limit_val_batches,
                                         progress=show_progress(cfg.trainer.progress))  # fmt: skip
    per_class = (confusion.diag().float() / confusion.sum(dim=1).clamp(min=1)).tolist()
    name = saved["arch"]["name"]
    title = f"{name} on {split}"
    plots.confusion_matrix(confusion, splits.classes, out / "plots" / "confusion_matrix.png", title, root=out)
    results = {
        "task": cfg.task.name, "model": name, "data": data.name, "split": split, "ckpt_path": str(cfg.ckpt_path),
        "ckpt_epoch": saved["epoch"], f"{split}_loss": metrics["loss"], f"{split}_acc1": metrics["acc1"],
        f"{split}_acc5": metrics["acc5"], "images": int(confusion.sum()),
        **{f"{split}_acc1/{c}": a for c, a in zip(splits.classes, per_class)},
        "params": count_params(model), "macs": count_macs(model),
        "infer_img_per_s": inference_img_per_s(model, data.eval_batch_size, amp), "device": str(device),
        "wall_s": time.perf_counter() - started, "status": "completed",
    }  # fmt: skip
    write_results(out, results)
    worst = ", ".join(f"{c} {a:.3f}" for a, c in sorted(zip(per_class, splits.classes))[:3])
    log.info(f"{name} epoch {saved['epoch']} on {data.name} {split} ({results['images']} images): loss "
             f"{metrics['loss']:.4f} | acc1 {metrics['acc1']:.4f} | acc5 {metrics['acc5']:.4f} | {results['params'] / 1e6:.2f}M "
             f"params | {results['macs'] / 1e6:.1f}M MACs | {results['infer_img_per_s']:.0f} img/s | weakest: {worst}")  # fmt: skip
    return results


def _trained_on(saved: dict[str, Any]) -> dict[str, Any]:
    config = saved.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def _own_split(saved: dict[str, Any], seed: int, data: DictConfig) -> tuple[int, int | float, int | None]:
    """The seed and split sizes of the training run's own held-out split when the checkpoint was trained on this
    data set (so that no image it trained on is scored), else this config's; the file's values are checked."""
    trained = _trained_on(saved)
    if trained.get("name") != data.name:
        return seed, data.val_size, data.train_subset
    values = saved["config"].get("seed"), trained.get("val_size"), trained.get("train_subset")
    ok = (isinstance(values[0], int) and isinstance(values[1], (int, float)) and not isinstance(values[1], bool)
          and (values[2] is None or isinstance(values[2], int)))  # fmt: skip
    if not ok:
        raise VitexpError(f"{data.name} split settings in the checkpoint are not plain numbers; pass a checkpoint "
                          f"vitexp wrote")  # fmt: skip
    return values
