"""Range and type checks of the composed config (as plain data), so that a bad value stops the run before anything
is built, with one line naming the key, the value and what it must be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vitexp import VitexpError


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE = ("a number > 0", lambda v: _number(v) and v > 0)
NON_NEGATIVE = ("a number >= 0", lambda v: _number(v) and v >= 0)
COUNT = ("a whole number >= 1", lambda v: _integer(v) and v >= 1)
NON_NEGATIVE_COUNT = ("a whole number >= 0", lambda v: _integer(v) and v >= 0)
OPTIONAL_COUNT = ("null or a whole number >= 1", lambda v: v is None or (_integer(v) and v >= 1))
OPTIONAL_POSITIVE = ("null or a number > 0", lambda v: v is None or (_number(v) and v > 0))
FRACTION = ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
OPTIONAL_FRACTION = ("null or a number in [0, 1)", lambda v: v is None or (_number(v) and 0 <= v < 1))
WEIGHT = ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
OPTIONAL_DECAY = ("null or a number in (0, 1)", lambda v: v is None or (_number(v) and 0 < v < 1))

# key -> (what it must be, test); a key absent from the composed config (another task's) is skipped
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "seed": ("a whole number", _integer),
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "data.batch_size": COUNT,
    "data.eval_batch_size": COUNT,
    "data.num_workers": NON_NEGATIVE_COUNT,
    "data.img_size": COUNT,
    "data.num_classes": COUNT,
    "data.train_subset": OPTIONAL_COUNT,
    "data.mixup.prob": WEIGHT,
    "trainer.max_epochs": COUNT,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": OPTIONAL_POSITIVE,
    "trainer.ckpt_every_n_epochs": NON_NEGATIVE_COUNT,
    "trainer.ckpt_every_n_steps": ("null or a whole number >= 0", lambda v: v is None or (_integer(v) and v >= 0)),
    "trainer.ckpt_every_n_minutes": OPTIONAL_POSITIVE,
    "trainer.limit_train_batches": OPTIONAL_COUNT,
    "trainer.limit_val_batches": OPTIONAL_COUNT,
    "trainer.ema_decay": OPTIONAL_DECAY,
    "model.drop_path_rate": OPTIONAL_FRACTION,  # null: a timm model's own default (model=timm)
    "model.drop_rate": OPTIONAL_FRACTION,
    "model.ratio": FRACTION,
    "task.ratio": FRACTION,
    "task.alpha": WEIGHT,
    "task.tau": POSITIVE,
    "task.steps": COUNT,
    "task.rounds": COUNT,
    "task.round_to": COUNT,
    "task.warmup_steps": NON_NEGATIVE_COUNT,
    "task.repeats": COUNT,
    "task.finetune_epochs": NON_NEGATIVE_COUNT,
    "task.teacher_epochs": NON_NEGATIVE_COUNT,
    "optim.layer_decay": ("null or a number in (0, 1]", lambda v: v is None or (_number(v) and 0 < v <= 1)),
    "optim.head_only_epochs": NON_NEGATIVE_COUNT,
    "logger.log_every_n_steps": COUNT,
    "logger.init_timeout": POSITIVE,
}
CHOICES = {
    "trainer.precision": ("auto", "32", "bf16", "16"),
    "trainer.compile": ("auto", True, False),
    "optim.fused": ("auto", True, False),
    "trainer.skip_nonfinite": (True, False),
    "trainer.deterministic": (True, False, "warn"),
    "logger.mode": ("online", "offline", "disabled"),
    "task.mode": ("synthetic", "real"),
    "task.distill_type": ("soft", "hard", "token"),
    "task.importance": ("magnitude", "taylor", "random"),
    "task.allocation": ("uniform", "global"),
}


_ABSENT = object()


def _select(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def validate(config: dict[str, Any]) -> None:
    """Raise a one-line VitexpError for the first value out of range or of the wrong type in the resolved `config`."""
    for key, (must, ok) in RULES.items():
        value = _select(config, key)
        if value is _ABSENT:
            continue
        if not ok(value):
            raise VitexpError(f"{key}={value!r} is not valid: it must be {must}")
    for key, allowed in CHOICES.items():
        value = _select(config, key)
        if value is not _ABSENT and value not in allowed and str(value) not in allowed:
            spelled = (str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)  # as YAML writes them
            raise VitexpError(f"{key}={value!r} is not valid: choose one of {', '.join(spelled)}")
    val_size = _select(config, "data.val_size")
    if not _number(val_size) or val_size <= 0:
        raise VitexpError(f"data.val_size={val_size!r} is not valid: it must be a count >= 1 or a fraction in (0, 1)")
