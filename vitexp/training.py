"""The epoch loop every training recipe shares (a model trained, a teacher, a student, a pruned model's
fine-tuning): plain settings in; checkpoints, metrics.csv, plots and results.json out. No config."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitexp import VitexpError, __version__, checkpoint, distributed, engine, plots, stop, tracking
from vitexp.data import LoaderSettings, Splits, set_epoch
from vitexp.files import printable
from vitexp.hardware import precision_name, seed_everything
from vitexp.models import (
    arch_of,
    build_from_arch,
    count_macs,
    count_params,
    inference_img_per_s,
    train_only_head,
    without_weights_source,
)
from vitexp.records import EpochLog, completed, read_metrics, write_results

log = logging.getLogger("vitexp")


@dataclass(frozen=True)
class Loop:
    """How the epochs run: the `trainer.*` settings, with `auto` choices already made for this machine."""

    max_epochs: int
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None: fp32
    fp16_scaler: bool  # a GradScaler (precision 16)
    compile: bool
    compile_mode: str | None
    accumulate: int
    clip_norm: float | None
    skip_nonfinite: bool
    limit_train_batches: int | None
    limit_val_batches: int | None
    ckpt_every: int  # also keep epoch_NNNN.pt every N epochs (0: never)
    ckpt_every_steps: int  # also write last.pt every N optimizer steps, mid-epoch (0: epoch ends only)
    ckpt_every_minutes: float | None  # also write last.pt when this much wall clock passed since the last one
    ema_decay: float | None
    progress: bool
    log_every: int  # per-step figures to W&B every N optimizer steps


@dataclass(frozen=True)
class Recipe:
    """Everything `fit` needs, read from the config once at the top of a task. A sub-run (a teacher, a model to
    prune, the pruned model's fine-tuning) is the same recipe with a few fields replaced."""

    task: str  # labels results.json and the plots
    seed: int
    arch: dict[str, Any]  # the model to build (vitexp.models.BUILDERS)
    init_weights: str | None  # a checkpoint whose weights the model starts from (ckpt_path)
    data_name: str
    data: LoaderSettings
    splits: Splits | None  # None: a benchmark of the step alone
    loaders: tuple[Iterable | None, Iterable | None]  # train, val, built once from `splits` and `data`
    num_classes: int
    optimizer: Callable[..., torch.optim.Optimizer]  # (param groups) -> optimizer
    scheduler: Callable[..., Any]  # (optimizer, t_initial, warmup_t) -> timm scheduler, stepped per optimizer step
    weight_decay: float
    warmup_epochs: float
    mixup: Callable | None
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    loop: Loop
    config: dict[str, Any]  # the resolved config, kept in every checkpoint
    log_checkpoints: bool = False  # best.pt as a W&B artifact at the end
    layer_decay: float | None = None  # lr of layer i scaled by layer_decay ** (layers - i) (timm's groups); None: off
    head_only_epochs: int = 0  # the first N epochs train only the classifier (a linear probe when N >= max_epochs)
    wrap: Callable[[nn.Module], nn.Module] | None = None  # what the step calls, e.g. student + frozen teacher
    views: Callable[[nn.Module], dict[str, nn.Module]] = lambda model: {}  # extra val accuracies by name
    model_key: str = "model"  # the config node the model comes from, named in its errors (task.teacher: a teacher)


@dataclass
class RunState:
    """Where a run stands after an epoch: what a resume restores besides the modules' own states."""

    epoch: int = 0
    step: int = 0
    best_acc1: float = -1.0
    val_images: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    position: dict[str, Any] | None = None  # a mid-epoch checkpoint's place: epoch, batch, each rank's sums


def fit(recipe: Recipe, out: Path, last: dict[str, Any] | None = None, *, prefix: str = "",
        extra_results: dict[str, Any] | None = None, root: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train `recipe` in `out`, from `last` (a loaded last.pt) when given; returns the figures of results.json.
    A sub-run logs to the job's W&B run under `prefix`; `extra_results` join its results.json; `root`: the job's
    run folder that holds `out` (no symlinked folder from it down is written through)."""
    started, loop, root = time.perf_counter(), recipe.loop, root or out
    if last is not None:
        check_resume_fields(last, out / "checkpoints" / "last.pt")
        where = f", mid-epoch at batch {last['position']['batch']}" if last.get("position") else ""
        log.info(f"resuming {out} from epoch {last['epoch']} (step {last['step']}{where})")
    seed_everything(recipe.seed)
    # pretrained weights are read only when nothing else brings them (a resumed run's last.pt, ckpt_path)
    fresh = last is None and not recipe.init_weights
    arch = recipe.arch if fresh else without_weights_source(recipe.arch)
    model = build_from_arch(arch, where=recipe.model_key).to(loop.device)
    if recipe.init_weights and last is None:
        checkpoint.load_weights(model, checkpoint.load(recipe.init_weights)["model"], recipe.init_weights)
    train_loader, val_loader = recipe.loaders
    set_epoch(train_loader, recipe.seed, 0)  # whole epochs: a sub-run before this one may have left it mid-epoch
    opt = optimization(recipe, model, min(len(train_loader), loop.limit_train_batches or len(train_loader)))
    state = restore(last, model, opt, out) if last is not None else RunState()
    _set_trainable(recipe, model, state.epoch + 1)  # before DDP, which records the parameters that train
    train_model, eval_model = _step_models(recipe, model)
    records = EpochLog(out, state.epoch, prefix, root)
    settings = engine.StepSettings(loop.device, loop.amp, loop.accumulate, loop.clip_norm, loop.skip_nonfinite,
                                   distributed.sum_all if distributed.world_size() > 1 else None)  # fmt: skip
    _announce(recipe, model, out)
    saver = StepCheckpoints(loop.ckpt_every_steps, loop.ckpt_every_minutes, out, model, opt, state, recipe.config, root)
    with stop.deferred():  # a signal is honoured after the optimizer step it arrives in (or at the epoch's end)
        for epoch in range(state.epoch + 1, loop.max_epochs + 1):
            epoch_start, start = time.perf_counter(), _epoch_start(state, epoch)
            _set_trainable(recipe, model, epoch)
            set_epoch(train_loader, recipe.seed, epoch, start.batch)
            monitor = engine.Monitor(loop.progress, f"epoch {epoch}", records.step if tracking.active() else None,
                                     loop.log_every)  # fmt: skip
            train, state.step = engine.train_one_epoch(train_model, train_loader, recipe.loss, opt, state.step,
                                                       settings, limit_batches=loop.limit_train_batches,
                                                       monitor=monitor, start=start, after_step=saver.at(epoch))  # fmt: skip
            if skipped := train.pop("skipped_steps", 0):
                log.warning(f"epoch {epoch}: skipped {skipped} optimizer steps with a non-finite loss or gradient")
            metrics = {"epoch": epoch, **train, **validate(recipe, eval_model, model, opt.ema, settings.reduce)}
            state.val_images = metrics.pop("val/images")
            # logged before the checkpoints: a run killed in between repeats this epoch on resume, never loses its row
            metrics["time/epoch_s"] = time.perf_counter() - epoch_start
            records.epoch(metrics, loop.max_epochs)
            is_best = metrics["val/acc1"] > state.best_acc1
            state.epoch, state.best_acc1 = epoch, max(state.best_acc1, metrics["val/acc1"])
            state.metrics = {**metrics, "best_val_acc1": state.best_acc1}
            save_checkpoints(checkpoint_state(model, opt, state, recipe.config), out, is_best, loop.ckpt_every, root)
            saver.saved()
            stop.check_stop()
    distributed.barrier()  # rank 0's metrics.csv and checkpoints are complete before anyone reads them
    return finish(recipe, model, out, state, started, prefix, extra_results or {}, root)


def optimization(recipe: Recipe, model: nn.Module, batches_per_epoch: int) -> engine.Optimization:
    """The optimizer (no weight decay on norms, biases, position embeddings and tokens; with layer decay, timm's
    groups by layer, each with its `lr_scale`), its per-step schedule (timm's schedulers multiply each group's rate
    by its `lr_scale`), the GradScaler (fp16), the weight EMA and mixup/cutmix: what `engine.train_one_epoch`
    updates."""
    skip = getattr(model, "no_weight_decay", set)()
    params = (
        param_groups_weight_decay(model, recipe.weight_decay, no_weight_decay_list=skip)
        if recipe.layer_decay is None
        else param_groups_layer_decay(
            model, recipe.weight_decay, no_weight_decay_list=skip, layer_decay=recipe.layer_decay
        )  # fmt: skip
    )
    optimizer = recipe.optimizer(params)
    steps_per_epoch = math.ceil(batches_per_epoch / recipe.loop.accumulate)
    scheduler = recipe.scheduler(optimizer, t_initial=recipe.loop.max_epochs * steps_per_epoch,
                                 warmup_t=round(recipe.warmup_epochs * steps_per_epoch))  # fmt: skip
    scaler = torch.amp.GradScaler(recipe.loop.device.type) if recipe.loop.fp16_scaler else None
    ema = ModelEmaV3(model, decay=recipe.loop.ema_decay) if recipe.loop.ema_decay else None
    return engine.Optimization(optimizer, scheduler, scaler, ema, recipe.mixup)


def _set_trainable(recipe: Recipe, model: nn.Module, epoch: int) -> None:
    """Only the classifier trains in the first `head_only_epochs` epochs, everything after them."""
    if recipe.head_only_epochs == 0:
        return
    if distributed.world_size() > 1 and recipe.head_only_epochs < recipe.loop.max_epochs:
        raise VitexpError("optim.head_only_epochs with unfreezing needs one process (DDP fixes the parameters that "
                          "train when it starts); set it to 0 or >= trainer.max_epochs, or train on one device")  # fmt: skip
    train_only_head(model, epoch <= recipe.head_only_epochs)


def _step_models(recipe: Recipe, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """What the training step calls (wrapped, under DDP, compiled) and what evaluation calls (compiled)."""
    loop = recipe.loop
    train_model = recipe.wrap(model) if recipe.wrap else model
    if distributed.world_size() > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[loop.device.index] if loop.device.type == "cuda"
                                              else None)  # fmt: skip
    if not loop.compile:
        return train_model, model
    # static shapes: without dynamic=False, torch.compile turns a dimension symbolic once it has seen a second size
    # of it in the process (a pruned model after its unpruned one, the last smaller evaluation batch), and those
    # kernels sum in another order than the static ones a resumed process compiles: a resume would not be exact
    compile = functools.partial(torch.compile, mode=loop.compile_mode, dynamic=False)
    return compile(train_model), compile(model)


def restore(last: dict[str, Any], model: nn.Module, opt: engine.Optimization, out: Path) -> RunState:
    """Put the model, optimizer, schedule, GradScaler, EMA and every random generator back as `last` holds them."""
    source = out / "checkpoints" / "last.pt"
    checkpoint.load_weights(model, last["model"], str(source))
    parts = {"optimizer": opt.optimizer, "scheduler": opt.scheduler, "scaler": opt.scaler, "ema": opt.ema}
    for name, part in parts.items():
        if part is not None:
            _load_part(source, name, lambda p=part, n=name: p.load_state_dict(last[n]))
    _load_part(source, "rng", lambda: checkpoint.set_rng_state(last["rng"]))
    best = last["metrics"]["best_val_acc1"] if last["metrics"] else -1.0  # {}: stopped inside the first epoch
    return RunState(last["epoch"], last["step"], best, last.get("val_images"), last["metrics"], last.get("position"))


def _load_part(source: Path, name: str, load: Callable[[], Any]) -> None:
    """`load()` one state of a checkpoint; torch's loaders meet a state of the wrong shape (a file someone edited,
    or one from another setup) as KeyError, TypeError, ... deep inside: one line instead."""
    try:
        load()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise VitexpError(
            f"{printable(source)}: its {name} state does not fit this run ({type(e).__name__}); resume with the "
            f"settings it was saved with, or start a new run with ckpt_path=<it>"
        ) from None


# The top-level fields of last.pt that a resume reads, and the types vitexp writes them with: a file is data, and a
# tensor or a string where a number belongs is refused here rather than met later as a traceback (`checkpoint.load`
# checks the weights and the arch for every reader).
_OPTIONAL = type(None)
RESUME_FIELDS: dict[str, tuple[type, ...]] = dict(
    epoch=(int,),
    step=(int,),
    config=(dict,),
    metrics=(dict,),
    rng=(dict,),
    optimizer=(dict,),
    scheduler=(dict,),
    scaler=(dict, _OPTIONAL),
    ema=(dict, _OPTIONAL),
    val_images=(int, _OPTIONAL),
    position=(dict, _OPTIONAL),
)


def check_resume_fields(ckpt: dict[str, Any], source: str | Path, fields: Iterable[str] = tuple(RESUME_FIELDS)) -> None:
    """Refuse, with one line, a loaded checkpoint whose top-level `fields` do not have the types vitexp writes
    (numbers not negative; metrics numbers; a mid-epoch position as `StepCheckpoints` writes it)."""
    for key in fields:
        value, kinds = ckpt.get(key), RESUME_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, kinds) or isinstance(value, int) and value < 0:
            expected = " or ".join("None" if kind is _OPTIONAL else kind.__name__ for kind in kinds)
            what = str(value) if isinstance(value, int) else f"a {type(value).__name__}"
            raise _mistyped(source, key, f"is {what}, not {expected}{' >= 0' if int in kinds else ''}")
    metrics = ckpt.get("metrics") if "metrics" in fields else {}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()) or (
        metrics and "best_val_acc1" not in metrics
    ):
        raise _mistyped(source, "metrics", "holds values that are not numbers (or no best_val_acc1)")
    if "position" in fields and ckpt.get("position") is not None and not _valid_position(ckpt["position"]):
        raise _mistyped(source, "position", "is not a mid-epoch place (epoch, batch and each rank's running sums)")


def _mistyped(source: str | Path, key: str, why: str) -> VitexpError:
    return VitexpError(
        f"{printable(source)} is not a checkpoint vitexp wrote: its {key} {why}; start a new run (ckpt_path=<it> "
        f"keeps its weights)"
    )


def _valid_position(position: dict[str, Any]) -> bool:
    """A mid-epoch place as `StepCheckpoints.save` writes it, each rank's sums shaped as `engine._Sums` holds them."""
    template = engine._Sums(torch.device("cpu"), skip_nonfinite=False).state_dict()
    sums = position.get("sums")

    def same(value: Any, like: Any) -> bool:
        if torch.is_tensor(like):
            return torch.is_tensor(value) and value.shape == like.shape
        return isinstance(value, int) and not isinstance(value, bool)

    def fits(state: Any) -> bool:
        return (
            isinstance(state, dict)
            and state.keys() == template.keys()
            and all(same(state[k], v) for k, v in template.items())
        )

    numbers = [position.get("epoch"), position.get("batch")]
    whole = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
    return whole and isinstance(sums, list) and bool(sums) and all(fits(state) for state in sums)


def _epoch_start(state: RunState, epoch: int) -> engine.EpochStart:
    """Where `epoch` begins: at its first batch, or where the mid-epoch checkpoint resumed from left it."""
    at = state.position
    if at is None or at["epoch"] != epoch:
        return engine.EpochStart()
    return engine.EpochStart(at["batch"], engine.sums_for_rank(at["sums"], distributed.rank()))


class StepCheckpoints:
    """Mid-epoch last.pt: every `every` optimizer steps, when `minutes` of wall clock passed since the last
    checkpoint, and when a stop is asked for (a signal), after which the run stops there.

    The file holds what the epoch-end one does (weights, optimizer, schedule, scaler, EMA, every generator),
    with the step count, and `position`: the epoch, the batches done in it and each rank's running sums."""

    def __init__(self, every: int, minutes: float | None, out: Path, model: nn.Module, opt: engine.Optimization,
                 state: RunState, config: dict[str, Any], root: Path | None = None) -> None:  # fmt: skip
        self.every, self.minutes, self.out, self.root = every, minutes, out, root or out
        self.model, self.opt, self.state, self.config = model, opt, state, config
        self.last = time.monotonic()

    def saved(self) -> None:
        """An epoch-end checkpoint was written: the wall-clock interval starts again."""
        self.last = time.monotonic()

    def at(self, epoch: int) -> engine.AfterStep:
        """The engine's `after_step` for `epoch`."""

        def after_step(step: int, batch: int, sums: engine._Sums) -> None:
            timed = self.minutes is not None and time.monotonic() - self.last >= 60 * self.minutes
            stopping, timed = distributed.any_rank([stop.requested() is not None, timed])
            if stopping or timed or (self.every and step % self.every == 0):
                self.save(epoch, step, batch, sums)
            if stopping:
                log.warning(f"stop asked ({stop.requested() or 'by another process'}): saved step {step} (epoch "
                            f"{epoch}, batch {batch}) to {self.out / 'checkpoints' / 'last.pt'}")  # fmt: skip
                stop.check_stop()

        return after_step

    def save(self, epoch: int, step: int, batch: int, sums: engine._Sums) -> None:
        """Write last.pt at this step (rank 0; every rank's sums gathered)."""
        ckpt = checkpoint_state(self.model, self.opt, replace(self.state, step=step), self.config)
        ckpt["position"] = {"epoch": epoch, "batch": batch, "sums": distributed.gather(sums.state_dict())}
        if distributed.is_main():
            checkpoint.save(ckpt, self.out / "checkpoints" / "last.pt", self.root)
        distributed.barrier()
        self.last = time.monotonic()


def _announce(recipe: Recipe, model: nn.Module, out: Path) -> None:
    loop, splits = recipe.loop, recipe.splits
    log.info(
        f"{recipe.arch['name']}: {count_params(model) / 1e6:.2f}M params, {count_macs(model) / 1e6:.1f}M MACs/img | "
        f"{recipe.data_name}: {len(splits.train)} train, {len(splits.val)} val | {loop.device}, "
        f"{precision_name(loop.amp)}{', compiled' if loop.compile else ''}{', data on device' if recipe.data.on_device else ''}"
        f" | {out}"
    )


def validate(recipe: Recipe, eval_model: nn.Module, model: nn.Module, ema: Any, reduce: Any) -> dict[str, Any]:
    """Val loss and accuracies of the model, and the val top-1 of its EMA and of the recipe's extra views."""
    loop, val_loader = recipe.loop, recipe.loaders[1]

    def score(module: nn.Module) -> dict[str, float]:
        return engine.evaluate(module, val_loader, loop.device, recipe.num_classes, autocast_dtype=loop.amp,
                               limit_batches=loop.limit_val_batches, progress=module is eval_model and loop.progress,
                               reduce=reduce)[0]  # fmt: skip

    val = score(eval_model)
    figures = {"val/loss": val["loss"], "val/acc1": val["acc1"], "val/acc5": val["acc5"], "val/images": val["images"]}
    views = {"val_ema/acc1": ema.module} if ema is not None else {}
    for name, view in {**views, **recipe.views(model)}.items():
        figures[name] = score(view)["acc1"]
    return figures


def checkpoint_state(model: nn.Module, opt: engine.Optimization, state: RunState, config: dict) -> dict[str, Any]:
    """The checkpoint dict: everything an exact resume needs, and the `arch` a fresh process rebuilds from."""
    return {
        "model": model.state_dict(),
        "arch": arch_of(model),
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": opt.scaler.state_dict() if opt.scaler is not None else None,
        "ema": opt.ema.state_dict() if opt.ema is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "rng": checkpoint.rng_state(),
        "config": config,
        "metrics": state.metrics,
        "val_images": state.val_images,
        "position": None,  # a mid-epoch checkpoint's place in its epoch (StepCheckpoints)
        "wandb_run_id": tracking.wandb_run_id(),
        "version": __version__,
        "format": checkpoint.FORMAT_VERSION,
    }


def save_checkpoints(state: dict[str, Any], out: Path, is_best: bool, every: int, root: Path | None = None) -> None:
    """best.pt when the epoch is the best so far, epoch_NNNN.pt every `every` epochs, last.pt always; rank 0 only.
    `root`: the job's run folder that holds `out`."""
    if not distributed.is_main():
        return
    folder, epoch, root = out / "checkpoints", state["epoch"], root or out
    if is_best:
        checkpoint.save(state, folder / "best.pt", root)
    if every and epoch % every == 0:
        checkpoint.save(state, folder / f"epoch_{epoch:04d}.pt", root)
    checkpoint.save(state, folder / "last.pt", root)


def finish(recipe: Recipe, model: nn.Module, out: Path, state: RunState, started: float, prefix: str,
           extra: dict[str, Any], root: Path) -> dict[str, Any]:  # fmt: skip
    """The learning-curve plot, results.json (and the W&B summary and artifact) once the last epoch is done."""
    rows = read_metrics(out / "metrics.csv", root)
    if distributed.is_main():
        plots.learning_curves(rows, out / "plots" / "learning_curves.png",
                              f"{recipe.task} {recipe.arch['name']} {out.name}", root=root)  # fmt: skip
    last_row = rows[-1] if rows else {}
    results = {
        "task": recipe.task,
        "model": recipe.arch["name"],
        "data": recipe.data_name,
        "epochs": last_row.get("epoch", 0),
        "best_val_acc1": state.best_acc1,
        "val_acc1": last_row.get("val/acc1"),
        "val_acc5": last_row.get("val/acc5"),
        "val_images": state.val_images,  # a run killed after its last checkpoint has it from there
        "processes": distributed.world_size(),
        "params": count_params(model),
        "macs": count_macs(model),
        "infer_img_per_s": inference_img_per_s(model, recipe.data.eval_batch_size, recipe.loop.amp),
        "train_img_per_s": last_row.get("throughput/img_s"),
        "device": str(recipe.loop.device),
        "precision": precision_name(recipe.loop.amp),
        "wall_s": time.perf_counter() - started,
        **extra,
        "status": "completed",
    }
    write_results(out, results, prefix, root)
    best = out / "checkpoints" / "best.pt"
    if recipe.log_checkpoints and not prefix and distributed.is_main():
        epoch = checkpoint.load(best)["epoch"]
        tracking.log_checkpoint(best, ["best", f"epoch-{epoch}"], {"epoch": epoch, "val_acc1": state.best_acc1,
                                                                   "arch": arch_of(model)})  # fmt: skip
    log.info(f"done: best val/acc1 {state.best_acc1:.4f}, {results['infer_img_per_s']:.0f} img/s inference, "
             f"{results['wall_s']:.0f} s | checkpoints in {out / 'checkpoints'}")  # fmt: skip
    return results


def sub_run(recipe: Recipe, arch: dict[str, Any], epochs: int, model_key: str = "model") -> Recipe:
    """The recipe of a model trained on the side (a teacher to distil, a model to prune): this run's data, optimizer,
    loss and loop, for `arch` from scratch and `epochs`, as task=train."""
    config = {**recipe.config, "task": {"name": "train", "loss": recipe.config["task"].get("loss")},
              "model": {"builder": arch["builder"], "name": arch["name"], **arch["kwargs"]},
              "trainer": {**recipe.config["trainer"], "max_epochs": epochs}, "ckpt_path": None}  # fmt: skip
    return replace(recipe, task="train", arch=arch, init_weights=None, loop=replace(recipe.loop, max_epochs=epochs),
                   config=config, wrap=None, views=lambda model: {}, model_key=model_key)  # fmt: skip


def train_in(recipe: Recipe, folder: Path, arch: dict[str, Any], epochs: int, model_key: str = "model") -> Path:
    """Train `arch` with this recipe for `epochs` in `folder` (a sub-run); resumes or skips it when an earlier
    attempt got that far. Returns its best.pt. `folder` lies in the job's run folder (its parent)."""
    best, last = folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt"
    if completed(folder):
        return best
    log.info(f"training {arch['name']} for {epochs} epochs in {folder}")
    fit(sub_run(recipe, arch, epochs, model_key), folder, checkpoint.load(last) if last.exists() else None,
        prefix=f"{folder.name}/", root=folder.parent)  # fmt: skip
    return best
