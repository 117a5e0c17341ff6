"""The epoch loop every training recipe shares (a model trained, a teacher, a student, a pruned model's
fine-tuning): the typed settings and the objects built from them in; checkpoints, metrics.csv, plots and
results.json out."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitexp import VitexpError, checkpoint, distributed, early_stopping, engine, plots, stop, tracking
from vitexp.data import Splits, set_epoch
from vitexp.hardware import Machine, precision_name, seed_everything
from vitexp.models import (
    Arch,
    arch_of,
    build_from_arch,
    count_macs,
    count_params,
    inference_img_per_s,
    train_only_head,
)
from vitexp.records import EpochLog, completed, read_metrics, write_results
from vitexp.schema import Config, EarlyStopping, Train, Trainer

log = logging.getLogger("vitexp")
INFER = "val/forward_img_per_s"  # a figure of the validation pass that results.json keeps, not metrics.csv


@dataclass(frozen=True)
class Recipe:
    """Everything `fit` needs: the typed settings, read from the config once at the top of a task, and what was
    built from them. A sub-run (a teacher, a model to prune, the pruned model's fine-tuning) is the same recipe with
    a few settings replaced."""

    settings: Config  # the loop reads its settings here; checkpoints keep them as plain data (`config`)
    machine: Machine  # the `auto` choices of settings.trainer made for this machine
    arch: Arch  # the model to build
    splits: Splits | None  # None: a benchmark of the step alone
    loaders: tuple[Iterable | None, Iterable | None]  # train, val, built once from `splits` and `data`
    optimizer: Callable[..., torch.optim.Optimizer]  # (param groups) -> optimizer
    scheduler: Callable[..., Any]  # (optimizer, t_initial, warmup_t) -> timm scheduler, stepped per optimizer step
    mixup: Callable | None
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    wrap: Callable[[nn.Module], nn.Module] | None = None  # what the step calls, e.g. student + frozen teacher
    views: Callable[[nn.Module], dict[str, nn.Module]] = lambda model: {}  # extra val accuracies by name
    model_key: str = "model"  # the config node the model comes from, named in its errors (task.teacher: a teacher)

    @property
    def config(self) -> dict[str, Any]:
        """The settings as plain data, as every checkpoint keeps them."""
        return asdict(self.settings)


@dataclass
class RunState:
    """Where a run stands after an epoch: what a resume restores besides the modules' own states."""

    epoch: int = 0
    step: int = 0
    best_acc1: float = -1.0
    val_images: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    position: checkpoint.Position | None = None  # where a mid-epoch checkpoint resumed from
    early: dict[str, Any] = field(default_factory=dict)  # vitexp.early_stopping's state ({}: off)


def fit(
    recipe: Recipe,
    out: Path,
    last: checkpoint.TrainingState | None = None,
    *,
    prefix: str = "",
    extra_results: dict[str, Any] | None = None,
    root: Path | None = None,
    after_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train `recipe` in `out`, from `last` (a loaded last.pt) when given; returns the figures of results.json.
    A sub-run logs to the job's W&B run under `prefix`; `extra_results` join its results.json; `root`: the job's run
    folder that holds `out`; `after_epoch(epoch, metrics)` once an epoch's checkpoints are saved (a search trial)."""
    started, trainer, seed, root = time.perf_counter(), recipe.settings.trainer, recipe.settings.seed, root or out
    if last is not None:
        _resuming(last, out)
    seed_everything(seed)
    model = _start_model(recipe, last)
    train_loader = recipe.loaders[0]
    set_epoch(train_loader, seed, 0)  # whole epochs: a sub-run before this one may have left it mid-epoch
    opt = optimization(recipe, model, min(len(train_loader), trainer.limit_train_batches or len(train_loader)))
    state = restore(last, model, opt, out) if last is not None else RunState()
    _set_trainable(recipe, model, state.epoch + 1)  # before DDP, which records the parameters that train
    train_model, eval_model = _step_models(recipe, model)
    records, settings = EpochLog(out, state.epoch, prefix, root), step_settings(trainer, recipe.machine)
    extra = {**_announce(recipe, model, out), **(extra_results or {})}  # joined to results.json
    config = recipe.config
    saver = StepCheckpoints(
        trainer.ckpt_every_n_steps, trainer.ckpt_every_n_minutes, out, model, opt, state, config, root
    )
    one_epoch = functools.partial(
        engine.train_one_epoch, train_model, train_loader, recipe.loss, opt, limit_batches=trainer.limit_train_batches
    )
    with stop.deferred():  # a signal is honoured after the optimizer step it arrives in (or at the epoch's end)
        for epoch in range(state.epoch + 1, trainer.max_epochs + 1):
            if state.early.get(early_stopping.REASON):
                break  # stopped early (also when resumed from the checkpoint of the epoch it stopped at)
            epoch_start, start = time.perf_counter(), _epoch_start(state, epoch)
            _set_trainable(recipe, model, epoch)
            set_epoch(train_loader, seed, epoch, start.batch)
            monitor = _monitor(recipe, records, epoch)
            train, state.step = one_epoch(
                state.step, settings, monitor=monitor, start=start, after_step=saver.at(epoch)
            )
            if skipped := train.pop("skipped_steps", 0):
                log.warning(f"epoch {epoch}: skipped {skipped} optimizer steps with a non-finite loss or gradient")
            metrics = {"epoch": epoch, **train, **validate(recipe, eval_model, model, opt.ema, settings.reduce)}
            state.val_images, extra[INFER] = metrics.pop("val/images"), metrics.pop(INFER)
            # logged before the checkpoints: a run killed in between repeats this epoch on resume, never loses its row
            metrics["time/epoch_s"] = time.perf_counter() - epoch_start
            records.epoch(metrics, trainer.max_epochs)
            is_best = _record(state, metrics, epoch, trainer.early_stopping)
            ckpt = checkpoint_state(model, opt, state, config)
            save_checkpoints(ckpt, out, is_best, trainer.ckpt_every_n_epochs, root)
            saver.saved()
            stop.check_stop()
            if after_epoch is not None:
                after_epoch(epoch, state.metrics)
    distributed.barrier()  # rank 0's metrics.csv and checkpoints are complete before anyone reads them
    return finish(recipe, model, out, state, started, prefix, extra, root)


def _record(state: RunState, metrics: dict[str, Any], epoch: int, early: EarlyStopping) -> bool:
    """The run state after `epoch` (best accuracy, metrics, early stopping); whether the epoch is the best so far."""
    is_best = metrics["val/acc1"] > state.best_acc1
    state.epoch, state.best_acc1 = epoch, max(state.best_acc1, metrics["val/acc1"])
    state.metrics = {**metrics, "best_val_acc1": state.best_acc1}
    state.early = early_stopping.update(early, state.early, metrics, epoch)
    return is_best


def _resuming(last: checkpoint.TrainingState, out: Path) -> None:
    """Say where the run continues."""
    where = f", mid-epoch at batch {last.position.batch}" if last.position is not None else ""
    log.info(f"resuming {out} from epoch {last.epoch} (step {last.step}{where})")


def _monitor(recipe: Recipe, records: EpochLog, epoch: int) -> engine.Monitor:
    """The epoch's progress bar and per-step W&B figures (every logger.log_every_n_steps optimizer steps)."""
    per_step = records.step if tracking.active() else None
    return engine.Monitor(recipe.machine.progress, f"epoch {epoch}", per_step, recipe.settings.logger.log_every_n_steps)


def _start_model(recipe: Recipe, last: checkpoint.TrainingState | None) -> nn.Module:
    """The model on its device: built, then given `ckpt_path`'s weights when a new run starts from them."""
    init = recipe.settings.ckpt_path
    # pretrained weights are read only when nothing else brings them (a resumed run's last.pt, ckpt_path)
    fresh = last is None and not init
    arch = recipe.arch if fresh else recipe.arch.without_weights_source()
    model = build_from_arch(arch, where=recipe.model_key).to(recipe.machine.device)
    if recipe.settings.trainer.grad_checkpointing:
        grad_checkpointing(model, recipe.model_key)
    if init and last is None:
        checkpoint.load_weights(model, checkpoint.load(init)[checkpoint.MODEL], init)
    return model


def grad_checkpointing(model: nn.Module, where: str = "model") -> None:
    """Recompute each block's activations in the backward pass (timm's `set_grad_checkpointing`; torch's checkpoint
    replays the random generators, so dropout and drop path draw what they drew in the forward pass)."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise VitexpError(
            f"{where} ({type(model).__name__}) has no timm set_grad_checkpointing; set trainer.grad_checkpointing=false"
        )
    model.set_grad_checkpointing(True)


def step_settings(trainer: Trainer, machine: Machine) -> engine.StepSettings:
    """How the engine computes each batch and takes each optimizer step, as `trainer` says on `machine`."""
    return engine.StepSettings(
        device=machine.device,
        autocast_dtype=machine.amp,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        gradient_clip_val=trainer.gradient_clip_val,
        skip_nonfinite=trainer.skip_nonfinite,
        reduce=distributed.sum_all if distributed.world_size() > 1 else None,
    )


def optimization(recipe: Recipe, model: nn.Module, batches_per_epoch: int) -> engine.Optimization:
    """The optimizer (no weight decay on norms, biases, position embeddings and tokens; with layer decay, timm's
    groups by layer, each with its `lr_scale`), its per-step schedule (timm's schedulers multiply each group's rate
    by its `lr_scale`), the GradScaler (fp16), the weight EMA and mixup/cutmix: what `engine.train_one_epoch`
    updates."""
    skip, optim, trainer = getattr(model, "no_weight_decay", set)(), recipe.settings.optim, recipe.settings.trainer
    params = (
        param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=skip)
        if optim.layer_decay is None
        else param_groups_layer_decay(
            model, optim.weight_decay, no_weight_decay_list=skip, layer_decay=optim.layer_decay
        )
    )
    optimizer = recipe.optimizer(params)
    steps_per_epoch = math.ceil(batches_per_epoch / trainer.accumulate_grad_batches)
    scheduler = recipe.scheduler(
        optimizer,
        t_initial=trainer.max_epochs * steps_per_epoch,
        warmup_t=round(optim.warmup_epochs * steps_per_epoch),
    )
    scaler = torch.amp.GradScaler(recipe.machine.device.type) if recipe.machine.fp16_scaler else None
    ema = ModelEmaV3(model, decay=trainer.ema_decay) if trainer.ema_decay else None
    return engine.Optimization(optimizer, scheduler, scaler, ema, recipe.mixup)


def _set_trainable(recipe: Recipe, model: nn.Module, epoch: int) -> None:
    """Only the classifier trains in the first `head_only_epochs` epochs, everything after them."""
    head_only = recipe.settings.optim.head_only_epochs
    if head_only == 0:
        return
    if distributed.world_size() > 1 and head_only < recipe.settings.trainer.max_epochs:
        raise VitexpError(
            "optim.head_only_epochs with unfreezing needs one process (DDP fixes the parameters that train when it "
            "starts); set it to 0 or >= trainer.max_epochs, or train on one device"
        )
    train_only_head(model, epoch <= head_only)


def _step_models(recipe: Recipe, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """What the training step calls (wrapped, under DDP, compiled) and what evaluation calls (compiled)."""
    device = recipe.machine.device
    train_model = recipe.wrap(model) if recipe.wrap else model
    if distributed.world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=ids)
    if not recipe.machine.compile:
        return train_model, model
    # static shapes: without dynamic=False, torch.compile turns a dimension symbolic once it has seen a second size
    # of it in the process (a pruned model after its unpruned one, the last smaller evaluation batch), and those
    # kernels sum in another order than the static ones a resumed process compiles: a resume would not be exact
    compile = functools.partial(torch.compile, mode=recipe.settings.trainer.compile_mode, dynamic=False)
    return compile(train_model), compile(model)


def restore(saved: checkpoint.TrainingState, model: nn.Module, opt: engine.Optimization, out: Path) -> RunState:
    """Put the model, optimizer, schedule, GradScaler, EMA and every random generator back as `saved` holds them."""
    source = out / "checkpoints" / "last.pt"
    checkpoint.load_weights(model, saved.model, str(source))
    parts = {
        checkpoint.OPTIMIZER: (opt.optimizer, saved.optimizer),
        checkpoint.SCHEDULER: (opt.scheduler, saved.scheduler),
        checkpoint.SCALER: (opt.scaler, saved.scaler),
        checkpoint.EMA: (opt.ema, saved.ema),
    }
    for name, (part, state) in parts.items():
        if part is not None:
            checkpoint.load_part(source, name, lambda p=part, s=state: p.load_state_dict(s))
    checkpoint.load_part(source, checkpoint.RNG, lambda: checkpoint.set_rng_state(saved.rng))
    best = saved.metrics["best_val_acc1"] if saved.metrics else -1.0  # {}: stopped inside the first epoch
    early = early_stopping.check(saved.early_stopping, str(source))
    return RunState(saved.epoch, saved.step, best, saved.val_images, saved.metrics, saved.position, early)


def _epoch_start(state: RunState, epoch: int) -> engine.EpochStart:
    """Where `epoch` begins: at its first batch, or where the mid-epoch checkpoint resumed from left it."""
    at = state.position
    if at is None or at.epoch != epoch:
        return engine.EpochStart()
    return engine.EpochStart(at.batch, engine.sums_for_rank(at.sums, distributed.rank()))


class StepCheckpoints:
    """Mid-epoch last.pt: every `every` optimizer steps, when `minutes` of wall clock passed since the last
    checkpoint, and when a stop is asked for (a signal), after which the run stops there.

    The file holds what the epoch-end one does (weights, optimizer, schedule, scaler, EMA, every generator),
    with the step count, and `position`: the epoch, the batches done in it and each rank's running sums."""

    def __init__(
        self,
        every: int,
        minutes: float | None,
        out: Path,
        model: nn.Module,
        opt: engine.Optimization,
        state: RunState,
        config: dict[str, Any],
        root: Path | None = None,
    ) -> None:
        self.every, self.minutes, self.out, self.root = every, minutes, out, root or out
        self.model, self.opt, self.state, self.config = model, opt, state, config
        self.last = time.monotonic()

    def saved(self) -> None:
        """An epoch-end checkpoint was written: the wall-clock interval starts again."""
        self.last = time.monotonic()

    def at(self, epoch: int) -> engine.AfterStep:
        """The engine's `after_step` for `epoch`."""

        def after_step(step: int, batch: int, sums: engine.EpochSums) -> None:
            timed = self.minutes is not None and time.monotonic() - self.last >= 60 * self.minutes
            stopping, timed = distributed.any_rank([stop.requested() is not None, timed])
            if stopping or timed or (self.every and step % self.every == 0):
                self.save(epoch, step, batch, sums)
            if stopping:
                log.warning(
                    f"stop asked ({stop.requested() or 'by another process'}): saved step {step} (epoch "
                    f"{epoch}, batch {batch}) to {self.out / 'checkpoints' / 'last.pt'}"
                )
                stop.check_stop()

        return after_step

    def save(self, epoch: int, step: int, batch: int, sums: engine.EpochSums) -> None:
        """Write last.pt at this step (rank 0; every rank's sums gathered)."""
        position = checkpoint.Position(epoch, batch, distributed.gather(sums.state_dict()))
        ckpt = checkpoint_state(self.model, self.opt, replace(self.state, step=step), self.config, position)
        if distributed.is_main():
            checkpoint.save(ckpt.state_dict(), self.out / "checkpoints" / "last.pt", self.root)
        distributed.barrier()
        self.last = time.monotonic()


def _announce(recipe: Recipe, model: nn.Module, out: Path) -> dict[str, int]:
    """The run's first line; returns the model's size (`params`, `macs`: counted once, the model keeps its shape)."""
    machine, splits = recipe.machine, recipe.splits
    sizes = {"params": count_params(model), "macs": count_macs(model)}
    log.info(
        f"{recipe.arch.name}: {sizes['params'] / 1e6:.2f}M params, {sizes['macs'] / 1e6:.1f}M MACs/img | "
        f"{recipe.settings.data.name}: {len(splits.train)} train, {len(splits.val)} val | {machine.device}, "
        f"{precision_name(machine.amp)}{', compiled' if machine.compile else ''}"
        f"{', data on device' if recipe.settings.data.on_device else ''} | {out}"
    )
    return sizes


def validate(recipe: Recipe, eval_model: nn.Module, model: nn.Module, ema: Any, reduce: Any) -> dict[str, Any]:
    """Val loss and accuracies of the model, and the val top-1 of its EMA and of the recipe's extra views."""
    machine, val_loader = recipe.machine, recipe.loaders[1]

    def score(module: nn.Module) -> dict[str, float]:
        return evaluate_on(
            recipe, module, val_loader, progress=module is eval_model and machine.progress, reduce=reduce
        )[0]

    val = score(eval_model)
    figures = {"val/loss": val["loss"], "val/acc1": val["acc1"], "val/acc5": val["acc5"], "val/images": val["images"]}
    figures[INFER] = val["forward_img_per_s"]
    views = {"val_ema/acc1": ema.module} if ema is not None else {}
    for name, view in {**views, **recipe.views(model)}.items():
        figures[name] = score(view)["acc1"]
    return figures


def evaluate_on(recipe: Recipe, model: nn.Module, loader: Iterable, **kwargs: Any) -> tuple[dict[str, float], Any]:
    """`engine.evaluate` of `model` on `loader` on the recipe's device and autocast, at most
    `trainer.limit_val_batches` batches; `kwargs` go to it as they are."""
    machine, settings = recipe.machine, recipe.settings
    return engine.evaluate(
        model,
        loader,
        machine.device,
        settings.data.num_classes,
        autocast_dtype=machine.amp,
        limit_batches=settings.trainer.limit_val_batches,
        **kwargs,
    )


def checkpoint_state(
    model: nn.Module,
    opt: engine.Optimization,
    state: RunState,
    config: dict,
    position: checkpoint.Position | None = None,
) -> checkpoint.TrainingState:
    """The checkpoint: everything an exact resume needs, and the `arch` a fresh process rebuilds from; `position`:
    a mid-epoch checkpoint's place (None at an epoch's end)."""
    return checkpoint.TrainingState(
        model=model.state_dict(),
        arch=arch_of(model),
        optimizer=opt.optimizer.state_dict(),
        scheduler=opt.scheduler.state_dict(),
        scaler=opt.scaler.state_dict() if opt.scaler is not None else None,
        ema=opt.ema.state_dict() if opt.ema is not None else None,
        epoch=state.epoch,
        step=state.step,
        rng=checkpoint.rng_state(),
        config=config,
        metrics=state.metrics,
        val_images=state.val_images,
        position=position,
        early_stopping=state.early or None,
        wandb_run_id=tracking.wandb_run_id(),
    )


def save_checkpoints(
    saved: checkpoint.TrainingState, out: Path, is_best: bool, every: int, root: Path | None = None
) -> None:
    """best.pt when the epoch is the best so far, epoch_NNNN.pt every `every` epochs, last.pt always; rank 0 only.
    `root`: the job's run folder that holds `out`."""
    if not distributed.is_main():
        return
    folder, epoch = out / "checkpoints", saved.epoch
    names = ["best.pt"] * is_best + [f"epoch_{epoch:04d}.pt"] * bool(every and epoch % every == 0) + ["last.pt"]
    checkpoint.save(saved.state_dict(), folder / names[0], root or out, also=[folder / name for name in names[1:]])


def finish(
    recipe: Recipe,
    model: nn.Module,
    out: Path,
    state: RunState,
    started: float,
    prefix: str,
    extra: dict[str, Any],
    root: Path,
) -> dict[str, Any]:
    """The learning-curve plot, results.json (and the W&B summary and artifact) once the last epoch is done; `extra`:
    figures known before (the model's size) and the caller's, joined to results.json, and under `INFER` the forward
    images/s of the last validation pass (absent when this process ran none: then two batches are timed)."""
    inference = extra.pop(INFER, None)
    rows = read_metrics(out / "metrics.csv", root)
    if distributed.is_main():
        plots.learning_curves(
            rows,
            out / "plots" / "learning_curves.png",
            f"{recipe.settings.task.name} {recipe.arch.name} {out.name}",
            root=root,
        )
    last_row = rows[-1] if rows else {}
    results = {
        "task": recipe.settings.task.name,
        "model": recipe.arch.name,
        "data": recipe.settings.data.name,
        "epochs": last_row.get("epoch", 0),
        "best_val_acc1": state.best_acc1,
        "val_acc1": last_row.get("val/acc1"),
        "val_acc5": last_row.get("val/acc5"),
        "val_images": state.val_images,  # a run killed after its last checkpoint has it from there
        "processes": distributed.world_size(),
        # a glance, not a benchmark (task=benchmark is one): the last validation pass's forward passes, or two
        # training-size batches when this process ran no validation (a resumed run that was already done)
        "infer_img_per_s": inference
        or inference_img_per_s(model, recipe.settings.data.batch_size, recipe.machine.amp, iters=2),
        "train_img_per_s": last_row.get("throughput/img_s"),
        "device": str(recipe.machine.device),
        "precision": precision_name(recipe.machine.amp),
        "wall_s": time.perf_counter() - started,
        "stopped_early": bool(state.early.get(early_stopping.REASON)),
        "stop_reason": state.early.get(early_stopping.REASON),
        **extra,
        "status": "completed",
    }
    write_results(out, results, prefix, root)
    best = out / "checkpoints" / "best.pt"
    if recipe.settings.logger.log_checkpoints and not prefix and distributed.is_main():
        epoch = checkpoint.load(best)[checkpoint.EPOCH]
        tracking.log_checkpoint(
            best,
            ["best", f"epoch-{epoch}"],
            {"epoch": epoch, "val_acc1": state.best_acc1, "arch": arch_of(model).to_dict()},
        )
    log.info(
        f"done: best val/acc1 {state.best_acc1:.4f}, {results['infer_img_per_s']:.0f} img/s inference, "
        f"{results['wall_s']:.0f} s | checkpoints in {out / 'checkpoints'}"
    )
    return results


def sub_run(recipe: Recipe, arch: Arch, epochs: int, model_key: str = "model") -> Recipe:
    """The recipe of a model trained on the side (a teacher to distil, a model to prune): this run's data, optimizer,
    loss and loop, for `arch` from scratch and `epochs`, as task=train."""
    settings = recipe.settings
    settings = replace(
        settings,
        task=Train(name="train", loss=getattr(settings.task, "loss", None)),
        # the model node as the arch holds it (a teacher's has keys no model option has)
        model=arch.config_node(),
        trainer=replace(settings.trainer, max_epochs=epochs),
        ckpt_path=None,
    )
    return replace(recipe, settings=settings, arch=arch, wrap=None, views=lambda model: {}, model_key=model_key)


def train_in(recipe: Recipe, folder: Path, arch: Arch, epochs: int, model_key: str = "model") -> Path:
    """Train `arch` with this recipe for `epochs` in `folder` (a sub-run); resumes or skips it when an earlier
    attempt got that far. Returns its best.pt. `folder` lies in the job's run folder (its parent)."""
    best, last = folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt"
    if completed(folder):
        return best
    log.info(f"training {arch.name} for {epochs} epochs in {folder}")
    fit(
        sub_run(recipe, arch, epochs, model_key),
        folder,
        checkpoint.load_training_state(last) if last.exists() else None,
        prefix=f"{folder.name}/",
        root=folder.parent,
    )
    return best
