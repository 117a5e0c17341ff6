"""The composed config, below the tasks: where it lives, building objects from `_target_`, the resolvers, and the
config a resumed run gets (vitexp's own YAML, with only plain values taken from the run's files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from vitexp import VitexpError, files, rundir, schema
from vitexp.files import printable

# Config groups a resumed run takes from its first start; the first six define what the run is and cannot change.
FIXED_ON_RESUME = ("model", "task", "data", "optim", "experiment", "debug")
CARRIED_ON_RESUME = (*FIXED_ON_RESUME, "trainer", "logger")
# Keys through which a config node runs code when instantiated: never taken from a file.
CODE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# Nodes of free-form keyword arguments (timm's): a run's own keys are kept on resume, not checked against vitexp's.
FREE_FORM = ("model.kwargs", "task.teacher.kwargs")


def config_dir() -> str:
    """The top-level conf/ in a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    source = here.parent / "conf"
    return str(source if (source / "config.yaml").is_file() else here / "conf")


def options(group: str) -> list[str]:
    """The options of a config group, as vitexp's own YAML files name them."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def build(node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with any failure turned into a one-line `VitexpError` naming the config key."""
    key = getattr(node, "_get_full_key", lambda _: "")("")
    try:
        if kwargs and isinstance(node, DictConfig) and OmegaConf.get_type(node) is not dict:
            # a schema node refuses the call site's objects (transforms, flags) as values of its own type
            node = OmegaConf.create(OmegaConf.to_container(node, resolve=True, throw_on_missing=True))
        return instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, VitexpError):
            raise cause from None
        raise VitexpError(
            f"cannot build {printable(key or 'config node')}: {type(cause).__name__}: {printable(cause)}"
        ) from None
    except MissingMandatoryValue as e:
        raise VitexpError(f"{e.full_key} must be set: pass {e.full_key}=...") from None


def plain(node: Any) -> Any:
    """A config node as plain, resolved Python data."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def typed(cfg: DictConfig) -> schema.Config:
    """The composed config as schema instances (`vitexp.schema`), interpolations resolved; a setting still ??? is
    refused in one line."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise VitexpError(f"{e.full_key} must be set: pass {e.full_key}=...") from None


def validate(cfg: DictConfig) -> None:
    """Refuse, in one line, the first setting of `cfg` outside its field's choices or range (`vitexp.schema`)."""
    schema.check(typed(cfg))


def register_resolvers() -> None:
    """What every composition of vitexp's config needs: its schemas (`vitexp.schema`) in Hydra's ConfigStore.

    Here, not in `__main__`, so that launchers that pickle the config (submitit) can import it. The config has no
    resolvers of its own: run folders are decided once it is composed (`vitexp.runs`), never while it resolves."""
    schema.register()


def run_dir() -> Path:
    """This job's output folder, as Hydra made it."""
    return Path(HydraConfig.get().runtime.output_dir)


def continues_its_folder(cfg: DictConfig) -> bool:
    """Whether this job continues what its folder already holds: a sweep job run again into its sweep's folder, or a
    job requeued with `auto_resume` (`resume=` names the run to continue itself)."""
    return not cfg.resume and (cfg.auto_resume or HydraConfig.get().mode == RunMode.MULTIRUN)


def command_line() -> list[str]:
    """This job's overrides (the command line's, and a sweep's for this job)."""
    return list(HydraConfig.get().overrides.task)


def saved_choices(config: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """The group choices a run started with: from its first start's overrides, or, in a folder without them, from
    the names its config records. Only options of vitexp's own groups count; anything else in the files is ignored."""
    choices = {}
    for override in overrides:
        group, _, option = override.partition("=")
        if group in CARRIED_ON_RESUME and option in options(group):
            choices[group] = option
    if not overrides:
        for group in ("task", "model", "data"):
            name = config.get(group, {}).get("name") if isinstance(config.get(group), dict) else None
            if name in options(group):
                choices[group] = name
    return choices


def resume_overrides(argv: list[str]) -> list[str]:
    """The command line of a plain run with `resume=<folder>`, plus the group choices the run started with that it
    does not name itself, so that Hydra composes the run's own structure (and task) from vitexp's YAML."""
    resume = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("resume=")), None)
    if any(a.startswith("-") for a in argv) or resume in (None, "", "null"):
        return argv
    folder = rundir.resume_run_dir(resume)
    # before the job records its start in .hydra/resume_<time>/ and appends to its log: a link would take them elsewhere
    files.refuse_links(folder)
    if not rundir.resumable(folder):
        raise VitexpError(
            f"resume={printable(resume)}: no run there (no checkpoints/last.pt, no .hydra/config.yaml); "
            f"pass a run folder vitexp wrote"
        )
    overrides, saved = rundir.first_start(folder)
    named = {a.split("=", 1)[0].lstrip("+~") for a in argv}
    return argv + [f"{g}={o}" for g, o in saved_choices(saved, overrides).items() if g not in named]


def resumed(
    cfg: DictConfig, saved: dict[str, Any], overrides: list[str], source: str, command: list[str] | None = None
) -> DictConfig:
    """The config of a resumed run: `cfg` (composed from vitexp's YAML with the run's group choices and this command
    line) with the plain values of the run's `saved` config on top, except the keys this command line changes.

    The file is data: a `_target_` (or another key that runs code) that differs from vitexp's own, a node vitexp
    does not have that holds one, or an interpolation is refused with one line naming the key; nothing is built."""
    started_with = saved_choices(saved, overrides)
    changed = []
    for override in command_line() if command is None else command:
        key, _, option = override.partition("=")
        key = key.lstrip("+~")
        if key in ("resume", "auto_resume") or key.startswith("hydra") or override in overrides:
            continue
        if key in FIXED_ON_RESUME and started_with.get(key) != option:
            raise VitexpError(f"{override} cannot change on resume; start a new run (with ckpt_path=...) instead")
        if started_with.get(key) != option:
            changed.append(key)
    ours = OmegaConf.to_container(cfg, resolve=False)
    _overlay(ours, saved, "", changed, source)
    merged = cfg.copy()
    try:
        merged.merge_with(ours)  # the schema refuses a value of the wrong type
        for key in FREE_FORM:  # replaced, not merged: the run's own arguments, as it ran
            if (value := _at(ours, key)) is not _ABSENT:
                OmegaConf.update(merged, key, value, merge=False)
        OmegaConf.resolve(merged)
        schema.check(typed(merged))
    except OmegaConfBaseException as e:
        first = str(e.msg).splitlines()[0] if str(e.msg).strip() else type(e).__name__
        raise VitexpError(
            f"cannot resume from {printable(source)}: {printable(e.full_key)}: {printable(first)}"
        ) from None
    except VitexpError as e:
        raise VitexpError(f"cannot resume from {printable(source)}: {printable(e, 1000)}") from None
    OmegaConf.set_struct(merged, True)
    return merged


def _refuse(source: str, key: str, why: str) -> VitexpError:
    return VitexpError(
        f"refused to resume from {printable(source)}: {printable(key, 120)} {printable(why, 120)}; a run folder is "
        f"data, never code. Start a new "
        f"run (ckpt_path=<its best.pt> keeps the weights, which load as tensors only)"
    )


def _check_data(value: Any, key: str, source: str) -> None:
    """Refuse a value from a file that holds a key that runs code or an interpolation, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in CODE_KEYS:
                raise _refuse(source, f"{key}.{k}", "would name code to run, which vitexp's own config does not")
            _check_data(v, f"{key}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_data(v, f"{key}[{i}]", source)
    elif isinstance(value, str) and "${" in value:
        raise _refuse(source, key, f"holds an interpolation ({value[:40]}) that vitexp's own config does not")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise _refuse(source, key, f"holds a {type(value).__name__}, not plain data")


def _overlay(ours: dict, theirs: dict, path: str, changed: list[str], source: str) -> None:
    """Copy the plain values of `theirs` (a file's config) into `ours` (composed from vitexp's YAML), in place."""
    for key, value in theirs.items():
        where = f"{path}{key}"
        if not isinstance(key, str):
            raise _refuse(source, f"{path}{key!r}", "is not a config key")
        if where in ("resume", "auto_resume") or any(where == k or where.startswith(f"{k}.") for k in changed):
            continue
        mine = ours.get(key, _ABSENT)
        if key in CODE_KEYS:
            if value != mine:
                raise _refuse(source, where, "names code to run that vitexp's own config does not")
        elif where in FREE_FORM and isinstance(value, dict):
            _check_data(value, where, source)
            ours[key] = value
        elif isinstance(value, dict) and isinstance(mine, dict):
            _overlay(mine, value, f"{where}.", changed, source)
        elif isinstance(value, str) and "${" in value and value == mine:
            continue  # the same interpolation as vitexp's own YAML (a first start's .hydra/config.yaml)
        else:
            _check_data(value, where, source)
            if mine is _ABSENT:
                raise VitexpError(
                    f"cannot resume from {printable(source)}: {printable(where)} is not a setting of this vitexp's "
                    f"config; the run was "
                    f"written by another version, start a new run (ckpt_path=<its best.pt> keeps the weights)"
                )
            ours[key] = value


def _at(config: dict, key: str) -> Any:
    """The value at dotted `key` of a plain config, or _ABSENT."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return _ABSENT
        config = config[part]
    return config


_ABSENT = object()
