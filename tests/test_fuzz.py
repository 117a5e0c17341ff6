"""Every entry point that reads a file someone handed over, fuzzed with Hypothesis on mutated honest inputs (a
checkpoint, a run folder, a sweep folder, a shard folder): it returns, or refuses with one printable line
(`VitexpError`, exit 2), and runs nothing from the file, writes nothing outside the folder it was given, and
leaves the victim folder beside it as it was. The fast profile runs in the default suite; `-m slow` runs thousands."""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests import fuzz_inputs as fz
from tests.conftest import TINY, compose_config, vitexp
from vitexp import checkpoint, config, models, report, rundir, search, shards, sweeps

# (fast, slow) cases per entry point: the fast ones keep the default suite within its budget on two cores.
PROFILES = {"fast": dict(max_examples=1, derandomize=True), "slow": dict(max_examples=1, derandomize=False)}
FAST = {"load_model": 60, "resume_checkpoint": 50, "run_folder": 50, "report": 15, "sweep": 70, "shards": 80}
SLOW = {"load_model": 2000, "resume_checkpoint": 1500, "run_folder": 1500, "report": 300, "sweep": 2000, "shards": 3000}
RUN_FILES = [".hydra/config.yaml", ".hydra/overrides.yaml", "results.json", "metrics.csv"]
RUN_LINKS = [
    *RUN_FILES,
    ".hydra",
    "checkpoints",
    "checkpoints/last.pt",
    "train_baseline.log",
    "report.csv",
    "report_val_acc.png",
    "report_acc_vs_macs.png",
    "optimization_results.yaml",
]
JOB = ["optim.lr=0.1", "debug=fast"]


@dataclass(repr=False)
class World:
    """What every case starts from, made once per module: honest inputs and the folder cases are made in."""

    base: Path
    run: Path  # a finished tiny run
    ckpt: dict[str, Any]  # its last.pt, loaded
    cfg: Any  # the tiny config, composed
    study: str  # an Optuna journal file's text
    shards: Path  # a split folder of two shards
    payload: bytes
    marker: Path

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text("world")  # a failing example prints its draws, not the honest checkpoint's tensors

    def case(self) -> fz.Plant:
        """A fresh case folder (the same path each time, so a failing example prints the same paths)."""
        folder = self.base / "case"
        if folder.exists():
            shutil.rmtree(folder)
        return fz.plant(folder, self.payload, self.marker)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("fuzz")
    run = base / "honest"
    proc = vitexp(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=base, check=False)
    assert (run / "checkpoints" / "last.pt").is_file(), proc.stderr[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    if not (run / "results.json").is_file():  # the run's end failed (another change under way): its figures
        (run / "results.json").write_text(json.dumps({"status": "completed", "task": "train", **ckpt["metrics"]}))
    marker = base / "payload_ran"
    buffer = io.BytesIO()
    torch.save({"x": fz.Payload(marker)}, buffer)
    return World(
        base,
        run,
        ckpt,
        compose_config(*TINY),
        _honest_study(base / "study"),
        _honest_shards(base),
        buffer.getvalue(),
        marker,
    )


def _honest_study(folder: Path) -> str:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    folder.mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=search.storage(None, folder), direction="maximize")
    dists = {
        "optim.lr": FloatDistribution(1e-4, 0.1, log=True),
        "model.depth": IntDistribution(1, 4),
        "data": CategoricalDistribution(["cifar10", "mnist"]),
    }
    trials = [
        (TrialState.COMPLETE, 0.5, (0.01, 2, "mnist")),
        (TrialState.FAIL, None, (0.1, 1, "mnist")),
        (TrialState.RUNNING, None, (0.001, 4, "cifar10")),
    ]
    for state, value, params in trials:
        trial = create_trial(state=state, value=value, params=dict(zip(dists, params)), distributions=dists)
        trial.set_user_attr("seed", "0")
        study.add_trial(trial)
    return (folder / search.JOURNAL_FILE).read_text()


def _honest_shards(base: Path) -> Path:
    source = base / "images" / "train"
    rng = np.random.default_rng(0)
    for n in range(6):
        folder = source / f"class{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))
        image.save(folder / f"{n}.{'png' if n % 3 else 'jpg'}")
    shards.write_split(source, base / "shards" / "train", samples_per_shard=4, workers=1)
    return base / "shards" / "train"


def fuzz(profile: str, name: str):
    """The settings of one entry point's test in `profile`."""
    cases = (FAST if profile == "fast" else SLOW)[name]
    return settings(
        **{**PROFILES[profile], "max_examples": cases},
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


# --- what a case writes: a mutated file, text damage, or a planted symlink -----------------------------------------


def _load(path: Path) -> Any:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix == ".csv":
        return [list(row) for row in csv.reader(io.StringIO(text))]
    return yaml.safe_load(text)


def _dump(path: Path, value: Any) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(value, default=str))
    elif path.suffix == ".csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows(
            row if isinstance(row, list) else [row] for row in (value if isinstance(value, list) else [value])
        )
        path.write_text(buffer.getvalue())
    else:
        path.write_text(yaml.safe_dump(value))


def damage_files(data, p: fz.Plant, folder: Path, names: list[str], links: list[str]) -> None:
    """One to three changes to the files `names` under `folder`: a mutated structure, damaged text, or one of
    `links` made a symlink to the victim, the payload or nowhere."""
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        how = data.draw(st.sampled_from(["mutate", "mutate", "text", "link"]), label="how")
        name = data.draw(st.sampled_from(links if how == "link" else names), label="file")
        path = folder / name
        if how == "link":
            fz.plant_link(path, data.draw(st.sampled_from(fz.link_targets(p)), label="target"))
        elif not path.is_file() or path.is_symlink() or not fz.inside_real(path):
            continue
        elif how == "text":
            path.write_text(data.draw(fz.text_damage(path.read_text(errors="replace")), label="text"))
        else:
            try:
                honest = _load(path)
            except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            _dump(path, data.draw(fz.mutated(honest, p), label=name).value)


# --- 1. checkpoints ---------------------------------------------------------------------------------------------


def _checkpoint(data, world: World, p: fz.Plant) -> dict[str, Any]:
    """The honest last.pt with one to three mutations; now and then a field holds a pickle that runs code."""
    state = data.draw(fz.mutated(world.ckpt, p, tensors=True), label="checkpoint").value
    if isinstance(state, dict) and data.draw(st.integers(0, 9), label="pickle") == 0:
        state[data.draw(st.sampled_from(["config", "metrics", "arch", "rng"]), label="field")] = fz.Payload(p.marker)
    return state


def _load_model(world: World, data) -> None:
    p = world.case()
    path = p.root / "ckpt" / "best.pt"
    path.parent.mkdir()
    torch.save(_checkpoint(data, world, p), path)
    fz.call("checkpoint.load_model", p, [], lambda: checkpoint.load_model(path))


def _resume_checkpoint(world: World, data) -> None:
    p = world.case()
    run = p.root / "run"
    shutil.copytree(world.run / ".hydra", run / ".hydra")
    (run / "checkpoints").mkdir()
    torch.save(_checkpoint(data, world, p), run / "checkpoints" / "last.pt")
    _resume(world, p, run)


def _resume(world: World, p: fz.Plant, run: Path) -> None:
    """What `resume=<run>` reads before training: the group choices, the resume point, the config, the states."""
    from vitexp.training import restore

    command = [f"resume={run}", "trainer.max_epochs=2"]
    fz.call("config.resume_overrides", p, [run], lambda: config.resume_overrides(command))
    point = fz.call("rundir.resume_point", p, [run], lambda: rundir.resume_point(run))
    if point is None:
        return
    fz.call(
        "config.resumed", p, [run], lambda: config.resumed(world.cfg, point.config, point.overrides, str(run), command)
    )
    if point.last is not None:
        model = models.build_from_arch(world.ckpt["arch"])
        fz.call("training.restore", p, [run], lambda: restore(point.last, model, _optimization(model), run))


def _optimization(model: torch.nn.Module):
    """The optimizer and schedule the tiny config gives `model`, as `training.optimization` makes them."""
    from timm.optim import param_groups_weight_decay
    from timm.scheduler import CosineLRScheduler

    from vitexp import engine

    params = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(params, lr=0.001, weight_decay=0.05)
    return engine.Optimization(
        optimizer,
        CosineLRScheduler(optimizer, t_initial=3, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=3, t_in_epochs=False),
    )


# --- 2. run folders --------------------------------------------------------------------------------------------------


def _copy_run(world: World, folder: Path, *, checkpoints: bool) -> Path:
    shutil.copytree(world.run, folder, ignore=None if checkpoints else shutil.ignore_patterns("checkpoints"))
    return folder


def _run_folder(world: World, data) -> None:
    p = world.case()
    run = _copy_run(world, p.root / "run", checkpoints=data.draw(st.booleans(), label="checkpoints"))
    damage_files(data, p, run, RUN_FILES, RUN_LINKS)
    _resume(world, p, run)


def _report(world: World, data) -> None:
    p = world.case()
    sweep = p.root / "sweep"
    for job in ("0", "1"):
        _copy_run(world, sweep / job, checkpoints=False)
    (sweep / "optimization_results.yaml").write_text("best_value: 0.5\nbest_params:\n  optim.lr: 0.01\n")
    job = data.draw(st.sampled_from(["0", "1"]), label="job")
    damage_files(
        data,
        p,
        sweep,
        [f"{job}/{f}" for f in RUN_FILES] + ["optimization_results.yaml"],
        [f"{job}/{f}" for f in RUN_LINKS] + ["report.csv", "report_val_acc.png", "optimization_results.yaml"],
    )
    fz.call("report.main", p, [sweep], lambda: report.main([str(sweep)]))


# --- 3. sweep folders ----------------------------------------------------------------------------------------------


def _sweep(world: World, data) -> None:
    p = world.case()
    sweep, job = p.root / "sweep", p.root / "sweep" / "0"
    _copy_run(world, job, checkpoints=False)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(JOB))
    started = ["optim.lr=0.1,0.01", "debug=fast"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": started}}, "seed": 0}))
    (sweep / search.JOURNAL_FILE).write_text(world.study)
    names = ["multirun.yaml", search.JOURNAL_FILE, "0/.hydra/overrides.yaml", "0/results.json"]
    damage_files(data, p, sweep, names, [*names, "0", "0/.hydra"])
    argv = ["-m", *started, f"hydra.sweep.dir={sweep}"]
    fz.call("sweeps.check_command", p, [sweep], lambda: sweeps.check_command(argv))
    fz.call("search.load_study", p, [sweep], lambda: search.load_study(sweep / search.JOURNAL_FILE, name="s"))
    fz.call("rundir.earlier_job", p, [sweep], lambda: rundir.earlier_job(job, JOB))
    fz.call("rundir.output_subdir", p, [sweep], lambda: rundir.output_subdir(None, str(job), "MULTIRUN", JOB))


# --- 4. shard folders ----------------------------------------------------------------------------------------------


@st.composite
def table_damage(draw, table: np.ndarray) -> np.ndarray | bytes:
    """A sample table with a cell set to a negative, huge or zero offset, size or label, another dtype or shape,
    a pickled object array, or bytes that are no .npy file at all."""
    op = draw(st.sampled_from(["cell", "cell", "dtype", "shape", "object", "bytes"]))
    if op == "cell":
        table = table.astype(np.int64)
        value = draw(st.sampled_from([-1, -(2**62), 2**62, 0, 1, 2**31, -(2**63)]))
        table[draw(st.integers(0, len(table) - 1)), draw(st.integers(0, table.shape[1] - 1))] = value
        return table
    if op == "dtype":
        return table.astype(draw(st.sampled_from([np.int32, np.float64, np.uint8, np.int16])))
    if op == "shape":
        return draw(st.sampled_from([table[:-1], table[:, :4], table.reshape(-1), table[None], table[:0]]))
    if op == "object":
        return np.array([fz.Payload(Path("never"))], dtype=object)
    return draw(
        st.sampled_from(
            [
                b"",
                b"\x93NUMPY",
                b"\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_order': False, 'shape': (99999999999,), }",
            ]
        )
    )


@st.composite
def tar_damage(draw, blob: bytes) -> bytes:
    """A shard's bytes with a few flipped, cut short, or garbage appended."""
    op = draw(st.sampled_from(["flip", "flip", "cut", "append"]))
    if op == "cut":
        return blob[: draw(st.integers(0, len(blob)))]
    if op == "append":
        return blob + draw(st.binary(min_size=1, max_size=600))
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


def _write_table(path: Path, table: np.ndarray | bytes) -> None:
    if path.is_symlink():  # a link planted by an earlier change: the damaged table replaces it, never its target
        path.unlink()
    if isinstance(table, bytes):
        path.write_bytes(table)
    else:
        with path.open("wb") as f:
            np.save(f, table, allow_pickle=table.dtype == object)


def _shard_changes(data, p: fz.Plant, folder: Path, honest: Path) -> None:
    index = json.loads((folder / shards.INDEX).read_text())
    tars = [s["file"] for s in index["shards"]]
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        what = data.draw(
            st.sampled_from(["index", "table", "table", "tar", "tar", "sidecar gone", "link"]), label="what"
        )
        tar = folder / data.draw(st.sampled_from(tars), label="shard")
        sidecar = tar.with_name(f"{tar.name}.idx.npy")
        if what == "index":
            index = data.draw(fz.mutated(index, p), label="index").value
        elif what == "table":
            _write_table(sidecar, data.draw(table_damage(np.load(honest / sidecar.name)), label="table"))
        elif what == "tar" and not tar.is_symlink():  # a planted link stays a link: its target is the victim's
            tar.write_bytes(data.draw(tar_damage(tar.read_bytes()), label="tar"))
            if data.draw(st.booleans(), label="index follows") and isinstance(index, dict):
                for s in index.get("shards") if isinstance(index.get("shards"), list) else []:
                    if isinstance(s, dict) and s.get("file") == tar.name:
                        s["bytes"] = tar.stat().st_size
        elif what == "sidecar gone":
            sidecar.unlink(missing_ok=True)
        elif what == "link":
            name = data.draw(st.sampled_from([shards.INDEX, tar.name, sidecar.name]), label="link")
            fz.plant_link(folder / name, data.draw(st.sampled_from(fz.link_targets(p)), label="target"))
    if not (folder / shards.INDEX).is_symlink():
        (folder / shards.INDEX).write_text(json.dumps(index, default=str))


def _shards(world: World, data) -> None:
    p = world.case()
    folder = p.root / "shards" / "train"
    shutil.copytree(world.shards, folder)
    _shard_changes(data, p, folder, world.shards)
    fz.call("shards.read_index", p, [], lambda: shards.read_index(folder))
    dataset = fz.call("shards.ShardSet", p, [], lambda: shards.ShardSet(folder))
    try:
        size = len(dataset) if dataset is not None else 0
        for i in sorted({0, size // 2, size - 1}) if size else []:
            fz.call("shards.ShardSet[i]", p, [], lambda i=i: dataset[i])
            fz.call("shards.ShardSet.source", p, [], lambda i=i: dataset.source(i))
    finally:
        for stream in getattr(dataset, "_files", {}).values():  # the test's own cases: thousands of open shards
            stream.close()


# --- the tests: each entry point in the fast profile (default suite) and the slow one (-m slow) --------------------

CASES = {
    "load_model": _load_model,
    "resume_checkpoint": _resume_checkpoint,
    "run_folder": _run_folder,
    "report": _report,
    "sweep": _sweep,
    "shards": _shards,
}


def _make(name: str, profile: str):
    @fuzz(profile, name)
    @given(data=st.data())
    def test(world, data):
        CASES[name](world, data)

    test.__name__ = f"test_fuzz_{name}" + ("_long" if profile == "slow" else "")
    return test if profile == "fast" else pytest.mark.slow(test)


for _name, _profile in itertools.product(CASES, ("fast", "slow")):
    _test = _make(_name, _profile)
    globals()[_test.__name__] = _test


def test_honest_inputs_pass_every_entry_point(world):
    """The harness itself: the honest checkpoint, run, sweep and shards are read without a refusal."""
    p = world.case()
    run = _copy_run(world, p.root / "run", checkpoints=True)
    model, _ = fz.call("checkpoint.load_model", p, [], lambda: checkpoint.load_model(run / "checkpoints" / "last.pt"))
    assert model is not None
    point = rundir.resume_point(run)
    assert point.last["epoch"] == 1
    config.resumed(world.cfg, point.config, point.overrides, str(run), [f"resume={run}"])
    dataset = shards.ShardSet(world.shards)
    assert len(dataset) == 6 and dataset[5][1] in (0, 1)
    assert search.load_study(world.base / "study" / search.JOURNAL_FILE, name="s").trials[0].value == 0.5


def test_zz_fuzz_case_counts():
    """Every entry point this file fuzzes ran cases, and each case ended in one recorded way; the counts are
    printed (`-s` shows them) for the suite's note."""
    assert fz.COUNTS, "run the whole file: the counts are those of the tests before this one"
    for name, count in fz.COUNTS.items():
        ended = sum(n for (entry, _), n in fz.OUTCOMES.items() if entry == name)
        assert count > 0 and ended == count, f"{name}: {count} cases, {ended} outcomes"
    print("\nfuzz cases:", dict(sorted(fz.COUNTS.items())), "total", sum(fz.COUNTS.values()))
    print("how they ended:", {f"{name} {ended}": n for (name, ended), n in sorted(fz.OUTCOMES.items())})
