"""The config's schema: one dataclass per config group with the YAML's names and types, each setting's allowed
choices or range declared on its field, and `check`, which refuses a bad value in one line. Defaults live in the
YAML: every field here is MISSING."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from vitexp import VitexpError


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def must(what: str, ok: Callable[[Any], bool]) -> Any:
    """A MISSING field whose value must pass `ok`; `what` says what it must be."""
    return field(default=MISSING, metadata={"must": what, "ok": ok})


def choice(*allowed: Any) -> Any:
    """A MISSING field whose value must be one of `allowed` (a number also as its string: precision 32 or '32')."""
    return field(default=MISSING, metadata={"choices": allowed})


def _positive() -> Any:
    return must("a number > 0", lambda v: _number(v) and v > 0)


def _non_negative() -> Any:
    return must("a number >= 0", lambda v: _number(v) and v >= 0)


def _count() -> Any:
    return must("a whole number >= 1", lambda v: _integer(v) and v >= 1)


def _non_negative_count() -> Any:
    return must("a whole number >= 0", lambda v: _integer(v) and v >= 0)


def _optional_count() -> Any:
    return must("null or a whole number >= 1", lambda v: v is None or (_integer(v) and v >= 1))


def _optional_positive() -> Any:
    return must("null or a number > 0", lambda v: v is None or (_number(v) and v > 0))


def _fraction() -> Any:
    return must("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)


def _optional_fraction() -> Any:
    return must("null or a number in [0, 1)", lambda v: v is None or (_number(v) and 0 <= v < 1))


def _weight() -> Any:
    return must("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)


def _val_size() -> Any:
    return must("a count >= 1 or a fraction in (0, 1)", lambda v: _number(v) and v > 0)


# The validation figures a run logs each epoch that early stopping may watch: every run's, the EMA's (with
# trainer.ema_decay) and a token-distilled student's two heads
MONITORED = ("val/loss", "val/acc1", "val/acc5", "val_ema/acc1", "val/acc1_cls", "val/acc1_dist")


@dataclass
class EarlyStopping:
    monitor: str | None = must(f"null (off) or one of {', '.join(MONITORED)}", lambda v: v is None or v in MONITORED)
    mode: str = choice("min", "max")
    patience: int = _count()
    min_delta: float = _non_negative()


@dataclass
class Trainer:
    max_epochs: int = _count()
    device: str = MISSING
    precision: str = choice("auto", "32", "bf16", "16")
    accumulate_grad_batches: int = _count()
    gradient_clip_val: float | None = _optional_positive()
    ckpt_every_n_epochs: int = _non_negative_count()
    ckpt_every_n_steps: int | None = must(
        "null or a whole number >= 0", lambda v: v is None or (_integer(v) and v >= 0)
    )
    ckpt_every_n_minutes: float | None = _optional_positive()
    compile: Any = choice("auto", True, False)
    compile_mode: str | None = MISSING
    deterministic: Any = choice(True, False, "warn")
    matmul_precision: str = choice("highest", "high", "medium")
    skip_nonfinite: bool = MISSING
    limit_train_batches: int | None = _optional_count()
    limit_val_batches: int | None = _optional_count()
    ema_decay: float | None = must("null or a number in (0, 1)", lambda v: v is None or (_number(v) and 0 < v < 1))
    progress: Any = choice("auto", True, False)
    early_stopping: EarlyStopping = MISSING
    grad_checkpointing: bool = MISSING


@dataclass
class Optim:
    lr: float = _positive()
    weight_decay: float = _non_negative()
    warmup_epochs: float = _non_negative()
    fused: Any = choice("auto", True, False)
    layer_decay: float | None = must("null or a number in (0, 1]", lambda v: v is None or (_number(v) and 0 < v <= 1))
    head_only_epochs: int = _non_negative_count()
    optimizer: Any = MISSING  # built with `_target_`: its keyword arguments are the optimizer's own
    scheduler: Any = MISSING


@dataclass
class Augment:
    """The per-image training augmentation of `data.transform`'s preset (crop_padding and hflip also on the device)."""

    hflip: float = _weight()
    auto_augment: str | None = MISSING
    re_prob: float = _weight()
    crop_padding: int = _non_negative_count()
    rotate: float = _non_negative()
    scale: list[float] = MISSING
    ratio: list[float] = MISSING
    color_jitter: float | None = MISSING


@dataclass
class DeviceAugment:
    policy: str | None = choice(None, "trivial", "rand")
    num_ops: int = _non_negative_count()
    magnitude: float = must("a number in [0, 10]", lambda v: _number(v) and 0 <= v <= 10)
    magnitude_std: float = _non_negative()
    op_prob: float = _weight()
    erase_prob: float = _weight()


@dataclass
class Mixup:
    prob: float = _weight()
    mixup_alpha: float = MISSING
    cutmix_alpha: float = MISSING
    switch_prob: float = MISSING


@dataclass
class Data:
    name: str = MISSING
    img_size: int = _count()
    in_chans: int = _count()
    num_classes: int = _count()
    mean: list[float] = MISSING
    std: list[float] = MISSING
    batch_size: int = _count()
    eval_batch_size: int = _count()
    num_workers: int = _non_negative_count()
    transform: str = choice("cifar", "imagenet")
    interpolation: str = choice("bilinear", "bicubic", "nearest")
    crop_pct: float = must("a number in (0, 1] (timm's ImageNet value is 0.875)", lambda v: _number(v) and 0 < v <= 1)
    on_device: bool = MISSING
    persistent_workers: bool = MISSING
    val_size: Any = _val_size()  # a count (int) or a fraction (float): not one type
    train_subset: int | None = _optional_count()
    split_seed: int | None = must("null or a whole number >= 0", lambda v: v is None or (_integer(v) and v >= 0))
    augment: Augment = field(default_factory=Augment)
    device_augment: DeviceAugment = field(default_factory=DeviceAugment)
    mixup: Mixup = field(default_factory=Mixup)


@dataclass
class ImageData(Data):
    root: str = MISSING
    download: bool = MISSING
    check_images: bool = MISSING
    follow_links: bool = MISSING


@dataclass
class Logger:
    mode: str = choice("online", "offline", "disabled")
    name: str | None = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    log_checkpoints: bool = MISSING
    log_every_n_steps: int = _count()
    init_timeout: float = _positive()


@dataclass
class Model:
    builder: str = MISSING
    name: str = MISSING
    img_size: int = MISSING
    in_chans: int = MISSING
    num_classes: int = MISSING
    drop_rate: float | None = _optional_fraction()
    drop_path_rate: float | None = _optional_fraction()  # null: a timm model's own default (model=timm)


@dataclass
class ViTModel(Model):
    patch_size: int = MISSING
    embed_dim: int = MISSING
    depth: int = MISSING
    num_heads: int = MISSING
    mlp_ratio: float = MISSING
    qkv_bias: bool = MISSING
    attn_drop_rate: float = MISSING


@dataclass
class PrunedModel(ViTModel):
    ratio: float = _fraction()
    layout: list[list[int]] | None = MISSING


@dataclass
class TimmModel(Model):
    patch_size: int | None = MISSING
    embed_dim: int | None = MISSING
    depth: int | None = MISSING
    num_heads: int | None = MISSING
    kwargs: Any = MISSING  # null or timm's own keyword arguments, free-form
    pretrained: Any = MISSING  # false, true or a path
    layout: list[list[int]] | None = MISSING


@dataclass
class Teacher:
    """A timm model by name, as `model=timm` builds it (`small_input` adapts ResNet stems to small images)."""

    builder: str = MISSING
    name: str = MISSING
    img_size: int = MISSING
    in_chans: int = MISSING
    num_classes: int = MISSING
    small_input: bool = MISSING
    pretrained: Any = MISSING  # false, true or a path
    kwargs: Any = MISSING  # null or timm's own keyword arguments, free-form


@dataclass
class Loss:
    _target_: str = MISSING
    label_smoothing: float = _fraction()


@dataclass
class Task:
    name: str = MISSING


@dataclass
class Train(Task):
    loss: Loss = field(default_factory=Loss)


@dataclass
class Evaluate(Task):
    pass


@dataclass
class Distill(Train):
    distill_type: str = choice("soft", "hard", "token")
    alpha: float = _weight()
    tau: float = _positive()
    teacher_ckpt: str | None = MISSING
    teacher_epochs: int = _non_negative_count()
    teacher: Teacher = field(default_factory=Teacher)


@dataclass
class Prune(Train):
    ratio: float = _fraction()
    allocation: str = choice("uniform", "global")
    round_to: int = _count()
    importance: str = choice("magnitude", "taylor", "random")
    rounds: int = _count()
    prune_embed: bool = MISSING
    calibration_batches: int = _count()
    finetune_epochs: int = _non_negative_count()
    train_epochs: int = _non_negative_count()
    finetune_distill: bool = MISSING
    alpha: float = _weight()


@dataclass
class Benchmark(Train):
    mode: str = choice("synthetic", "real")
    warmup_steps: int = _non_negative_count()
    steps: int = _count()
    repeats: int = _count()
    anchor: bool = MISSING


@dataclass
class Config:
    model: Model = MISSING
    task: Task = MISSING
    data: Data = MISSING
    optim: Optim = MISSING
    trainer: Trainer = MISSING
    logger: Logger = MISSING
    seed: int = must("a whole number", _integer)
    ckpt_path: str | None = MISSING
    resume: str | None = MISSING
    auto_resume: bool = MISSING


# schema/<name> in the ConfigStore: what each YAML option pulls in with `defaults: [/schema/<name>@_here_, _self_]`
SCHEMAS = {
    "config": Config,
    "trainer": Trainer,
    "optim": Optim,
    "data": Data,
    "image_data": ImageData,
    "logger": Logger,
    "vit_model": ViTModel,
    "pruned_model": PrunedModel,
    "timm_model": TimmModel,
    "train": Train,
    "evaluate": Evaluate,
    "distill": Distill,
    "prune": Prune,
    "benchmark": Benchmark,
}


def choices(schema: type, name: str) -> tuple[Any, ...]:
    """The values field `name` of dataclass `schema` allows."""
    return next(f.metadata["choices"] for f in fields(schema) if f.name == name)


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (as schema/<name>), where the YAML's defaults lists find them."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)


def check(settings: Any, prefix: str = "") -> None:
    """Raise a one-line VitexpError for the first value of typed `settings` (a schema instance) outside its field's
    choices or range."""
    for f in fields(settings):
        value, key = getattr(settings, f.name), f"{prefix}{f.name}"
        _check_field(f, value, key)
        if is_dataclass(value):
            check(value, f"{key}.")


def check_value(schema: type, name: str, value: Any, key: str) -> None:
    """Refuse `value` for field `name` of `schema` in one line naming `key`, as `check` does: the field's rule for a
    value that comes from elsewhere than the config (a checkpoint's arch)."""
    _check_field(next(f for f in fields(schema) if f.name == name), value, key)


def _check_field(f: Any, value: Any, key: str) -> None:
    if "ok" in f.metadata and not f.metadata["ok"](value):
        raise VitexpError(f"{key}={value!r} is not valid: it must be {f.metadata['must']}")
    allowed = f.metadata.get("choices")
    if allowed is not None and value not in allowed and str(value) not in map(str, allowed):
        spelled = ("null" if a is None else str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        raise VitexpError(f"{key}={value!r} is not valid: choose one of {', '.join(spelled)}")
