"""Every entry point that reads a file someone handed over, fuzzed with Hypothesis on mutated honest inputs (a
checkpoint, a run folder, a sweep folder, a shard folder): it returns, or refuses with one printable line
(`VitexpError`, exit 2), and runs nothing from the file, writes nothing outside the folder it was given, and
leaves the victim folder beside it as it was. The fast profile runs in the default suite; `-m slow` runs thousands."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests import fuzz_inputs as fz
from tests import handed
from tests.conftest import TINY, compose_config, vitexp
from vitexp import checkpoint, explain, models, predict, report, runs, search, shards, sweeps

# (fast, slow) cases per entry point: the fast ones keep the default suite within its budget on two cores.
PROFILES = {"fast": dict(max_examples=1, derandomize=True), "slow": dict(max_examples=1, derandomize=False)}
FAST = {
    "load_model": 60,
    "resume_checkpoint": 50,
    "run_folder": 50,
    "report": 15,
    "sweep": 70,
    "shards": 80,
    "predict": 25,
    "explain": 10,
}
SLOW = {
    "load_model": 2000,
    "resume_checkpoint": 1500,
    "run_folder": 1500,
    "report": 300,
    "sweep": 2000,
    "shards": 3000,
    "predict": 400,
    "explain": 200,
}
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


def damage_files(data, p: fz.Plant, folder: Path, names: list[str], links: list[str], *, fifos: bool = False) -> None:
    """One to three changes to the files `names` under `folder`: a mutated structure, damaged text, one of `links`
    made a symlink to the victim, the payload, a device or nowhere, or (with `fifos`) a file made a FIFO."""
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        how = data.draw(
            st.sampled_from(["mutate", "mutate", "text", "link", *(["fifo"] if fifos else [])]), label="how"
        )
        name = data.draw(st.sampled_from(links if how == "link" else names), label="file")
        path = folder / name
        if how == "fifo":
            fz.plant_fifo(path)
        elif how == "link":
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
    fz.call("runs.resume_overrides", p, [run], lambda: runs.resume_overrides(command))
    point = fz.call("runs.resume_point", p, [run], lambda: runs.resume_point(run))
    if point is None:
        return
    fz.call("runs.resumed", p, [run], lambda: runs.resumed(world.cfg, point.config, point.overrides, str(run), command))
    if point.last is not None:
        model = models.build_from_arch(models.Arch.from_dict(world.ckpt["arch"], "last.pt"))
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
    damage_files(data, p, run, RUN_FILES, RUN_LINKS, fifos=True)
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
        fifos=True,
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
    damage_files(data, p, sweep, names, [*names, "0", "0/.hydra"], fifos=True)
    argv = ["-m", *started, f"hydra.sweep.dir={sweep}"]
    fz.call("sweeps.check_command", p, [sweep], lambda: sweeps.check_command(argv))
    fz.call("search.load_study", p, [sweep], lambda: search.load_study(sweep / search.JOURNAL_FILE, name="s"))
    fz.call("runs.earlier_job", p, [sweep], lambda: runs.earlier_job(job, JOB))
    fz.call("runs.output_subdir", p, [sweep], lambda: runs.output_subdir(None, str(job), "MULTIRUN", JOB))


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
    if op == "append" or not blob:  # an empty shard (cut by an earlier change) has no byte to flip
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
            st.sampled_from(["index", "table", "table", "tar", "tar", "sidecar gone", "link", "fifo"]), label="what"
        )
        tar = folder / data.draw(st.sampled_from(tars), label="shard")
        sidecar = tar.with_name(f"{tar.name}.idx.npy")
        if what == "index":
            index = data.draw(fz.mutated(index, p), label="index").value
        elif what == "table" and not (sidecar.exists() and not sidecar.is_file()):
            _write_table(sidecar, data.draw(table_damage(np.load(honest / sidecar.name)), label="table"))
        elif (
            what == "tar" and tar.is_file() and not tar.is_symlink()
        ):  # a planted link stays a link: its target is the victim's
            tar.write_bytes(data.draw(tar_damage(tar.read_bytes()), label="tar"))
            if data.draw(st.booleans(), label="index follows") and isinstance(index, dict):
                for s in index.get("shards") if isinstance(index.get("shards"), list) else []:
                    if isinstance(s, dict) and s.get("file") == tar.name:
                        s["bytes"] = tar.stat().st_size
        elif what == "sidecar gone":
            sidecar.unlink(missing_ok=True)
        elif what == "fifo":
            fz.plant_fifo(folder / data.draw(st.sampled_from([shards.INDEX, tar.name, sidecar.name]), label="fifo"))
        elif what == "link":
            name = data.draw(st.sampled_from([shards.INDEX, tar.name, sidecar.name]), label="link")
            fz.plant_link(folder / name, data.draw(st.sampled_from(fz.link_targets(p)), label="target"))
    if (folder / shards.INDEX).is_file() and not (folder / shards.INDEX).is_symlink():
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


# --- 5. exported folders (predict) -------------------------------------------------------------------------------


def _predict_changes(data, p: fz.Plant, folder: Path, images: Path) -> str:
    """One to three changes to an exported folder and the images folder: the card mutated, a graph vitexp never
    exports (external data, other inputs or outputs, a huge constant), a FIFO or a link (to the victim or a device)
    in place of a file, formula and control strings as class and file names; returns the `--out` to pass."""
    out = str(p.root / "out" / "predictions.csv")
    card = json.loads((folder / "model.json").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        what = data.draw(st.sampled_from(["card", "graph", "fifo", "link", "names", "out"]), label="what")
        name = data.draw(st.sampled_from(["model.json", "model.onnx", "images/a.png"]), label="file")
        path = folder / name if not name.startswith("images/") else images / "a.png"
        if what == "card":
            card = data.draw(fz.mutated(card, p), label="card").value
        elif what == "graph" and not (folder / "model.onnx").is_symlink():
            variant = data.draw(st.sampled_from(handed.VARIANTS), label="graph")
            (folder / "model.onnx").unlink(missing_ok=True)
            (folder / "model.onnx").write_bytes(handed.model(variant).SerializeToString())
        elif what == "fifo":
            fz.plant_fifo(path)
        elif what == "link":
            targets = [*fz.link_targets(p), Path("/dev/zero"), Path("/dev/null")]
            fz.plant_link(path, data.draw(st.sampled_from(targets), label="target"))
        elif what == "names" and isinstance(card, dict):
            names = [t[:100] for t in fz.NASTY_TEXT if "/" not in t and "\x00" not in t]  # what a file name can be
            nasty = st.sampled_from(names)
            card["classes"] = [data.draw(nasty, label="class"), "dog"]
            handed.images(images, [data.draw(nasty, label="image") + ".png"])
        elif what == "out":
            out = data.draw(st.sampled_from(["/dev/null", str(p.root / "fifo.csv"), str(images)]), label="out")
            if out.endswith("fifo.csv") and not os.path.lexists(out):
                os.mkfifo(out)
    if (folder / "model.json").is_file() and not (folder / "model.json").is_symlink():
        (folder / "model.json").write_text(json.dumps(card, default=str))
    return out


def _predict(world: World, data) -> None:
    p = world.case()
    (p.cwd / "secret.bin").write_bytes(b"SECRET" * 32)  # what external data would read from the working folder
    folder, images = handed.export_folder(p.root / "export"), handed.images(p.root / "images", ["a.png", "b.png"])
    out = _predict_changes(data, p, folder, images)
    argv = [str(folder), str(images), "--out", out, "--topk", "2"]
    fz.call("predict.main", p, [p.root / "out"], lambda: predict.main(argv))
    written = p.root / "out" / "predictions.csv"
    if written.is_file():
        cells = [c for row in csv.reader(written.open(newline="")) for c in row]
        assert not any(fz.CONTROL.search(c) or "\n" in c for c in cells), f"predict: a raw control character: {cells}"
        assert not any(c[:1] in "=+-@" and not _number(c) for c in cells if c), f"predict: a formula cell: {cells}"
        assert "SECRET" not in written.read_text(), "predict: external data read from the working folder"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "predict: /dev/null replaced"


def _explain(world: World, data) -> None:
    """explain on a mutated checkpoint (now and then a pickle that runs code) and an images folder with FIFOs, links
    (to the victim or a device) and formula or control strings as file names; `--out` a file, device or FIFO."""
    p = world.case()
    (p.root / "ckpt").mkdir()
    ckpt = p.root / "ckpt" / "best.pt"
    honest = data.draw(st.booleans(), label="honest checkpoint")
    torch.save(world.ckpt if honest else _checkpoint(data, world, p), ckpt)
    images, out = handed.images(p.root / "images", ["a.png", "b.png"]), p.root / "out"
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        what = data.draw(st.sampled_from(["fifo", "link", "names", "out"]), label="what")
        if what == "fifo":
            fz.plant_fifo(images / "a.png")
        elif what == "link":
            targets = [*fz.link_targets(p), Path("/dev/zero"), Path("/dev/null")]
            fz.plant_link(images / "b.png", data.draw(st.sampled_from(targets), label="target"))
        elif what == "names":
            names = [t[:100] for t in fz.NASTY_TEXT if "/" not in t and "\x00" not in t]
            handed.images(images, [data.draw(st.sampled_from(names), label="image") + ".png"])
        elif not os.path.lexists(out):
            kind = data.draw(st.sampled_from(["file", "fifo", "device"]), label="out")
            out = Path("/dev/null") if kind == "device" else out
            out.write_text("x") if kind == "file" else os.mkfifo(out) if kind == "fifo" else None
    argv = [str(ckpt), str(images), "--out", str(out), "--method", data.draw(st.sampled_from(explain.METHODS))]
    fz.call("explain.main", p, [p.root / "out"], lambda: explain.main(argv))
    written = out / "explain.csv"
    if out.is_dir() and written.is_file():
        cells = [c for row in csv.reader(written.open(newline="")) for c in row]
        assert not any(fz.CONTROL.search(c) or "\n" in c for c in cells), f"explain: a raw control character: {cells}"
        assert not any(c[:1] in "=+-@" and not _number(c) for c in cells if c), f"explain: a formula cell: {cells}"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "explain: /dev/null replaced"


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --- 6. Optuna searches: a study in its journal or a sqlite file, continued in its sweep folder --------------------

SEARCH_CASES = {"fast": 30, "slow": 600}
SEARCH_ARGS = ["hparams_search=optuna", *TINY, "hydra.sweeper.n_trials=3"]
SEARCH_FILES = [search.JOURNAL_FILE, f"{search.JOURNAL_FILE}.lock", ".study.lock", ".trial_2.lock", "multirun.yaml"]


@dataclass(repr=False)
class SearchWorld:
    """A search's config composed once per storage (journal, sqlite) for the case folder, and its honest study's
    bytes: trial 0 completed, trial 1 stopped while running."""

    configs: dict[str, Any]
    honest: dict[str, bytes]
    sweep: Path

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text("search world")


class RecordingLauncher:
    """The sweeper's launcher in a case: records each job's overrides (trial N: job N), returns a best val/acc1."""

    def __init__(self) -> None:
        self.jobs: dict[int, list[str]] = {}

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.jobs.update(enumerate(map(list, job_overrides), initial_job_idx))
        return [JobReturn(overrides=o, status=JobStatus.COMPLETED, _return_value=0.25) for o in job_overrides]


@pytest.fixture(scope="module")
def search_world(world) -> SearchWorld:
    import optuna

    sweep, made = world.base / "case" / "sweep", world.base / "honest_search"
    configs, honest = {}, {}
    for kind, extra in (("journal", []), ("sqlite", [f"hydra.sweeper.storage=sqlite:///{sweep / 'search.db'}"])):
        cfg = compose_config(*SEARCH_ARGS, *extra, f"hydra.sweep.dir={sweep}", hydra=True)
        configs[kind] = cfg
        folder = made / kind
        folder.mkdir(parents=True)
        url = f"sqlite:///{folder / 'search.db'}" if kind == "sqlite" else None
        node = cfg.hydra.sweeper
        wanted = search.declared_search(node.params, SEARCH_ARGS[:-1], node.study_name, node.direction)
        study = optuna.create_study(study_name="vitexp", storage=search.storage(url, folder), direction="maximize")
        params = {k: (d.low + d.high) / 2 for k, d in wanted.space.items()}
        for state, value in (("COMPLETE", 0.5), ("RUNNING", None)):
            state = optuna.trial.TrialState[state]
            trial = optuna.trial.create_trial(
                state=state, value=value, params=params, distributions=wanted.space, user_attrs=wanted.fixed
            )
            study.add_trial(trial)
        name = "search.db" if kind == "sqlite" else search.JOURNAL_FILE
        honest[kind] = (folder / name).read_bytes()
    return SearchWorld(configs, honest, sweep)


def _search_changes(data, p: fz.Plant, sweep: Path, kind: str, cfg: Any) -> None:
    """One to three changes: a waiting trial that fixes values (enqueued with Optuna's own API), stopped trials
    beyond n_trials, a damaged journal, a completed trial with a text value, a FIFO or folder for a sweep file."""
    import optuna

    url = cfg.hydra.sweeper.storage
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        what = data.draw(st.sampled_from(["enqueue", "enqueue", "stopped", "text", "value", "special"]), label="what")
        if what == "special":
            sqlite = ["search.db", *(f"search.db-{side}" for side in search.SQLITE_SIDE_FILES)] if url else ["0"]
            name = data.draw(st.sampled_from([*SEARCH_FILES, *sqlite]), label="file")
            fz.plant_special(sweep / name, data.draw(st.sampled_from(fz.SPECIAL), label="kind"))
            return  # Optuna cannot write into the study after this
        if what in ("text", "value") and kind == "journal":
            journal = sweep / search.JOURNAL_FILE
            text = journal.read_text(errors="replace")
            if what == "value":
                value = json.dumps(data.draw(fz.scalars(p), label="value"))
                told = next((line for line in text.splitlines() if '"value":0.5' in line), None)  # trial 0's
                if told is not None:
                    journal.write_text(text + told.replace('"value":0.5', f'"value":{value}') + "\n")
            else:
                journal.write_text(data.draw(fz.text_damage(text), label="journal"))
            continue
        try:
            _optuna_change(data, what, optuna.load_study(study_name="vitexp", storage=search.storage(url, sweep)))
        except Exception:  # noqa: BLE001 - damaged by an earlier change: Optuna's own API cannot write to it
            continue


def _optuna_change(data, what: str, study: Any) -> None:
    """A waiting trial that fixes values, or stopped trials, added with Optuna's own API."""
    import optuna

    if what == "enqueue":
        fixed = data.draw(fz.fixed_params(dict(study.trials[0].distributions)), label="fixed")
        study.enqueue_trial(fixed, skip_if_exists=False)
    elif what == "stopped":
        trial = study.trials[1]
        for _ in range(data.draw(st.integers(1, 5), label="stopped")):
            stopped = optuna.trial.create_trial(
                state=trial.state, params=trial.params, distributions=trial.distributions
            )
            study.add_trial(stopped)


def _launched_within(launcher: RecordingLauncher, cfg: Any) -> None:
    """An oracle of its own: every job launched holds a value of each declared interval inside it (Hydra's parse of
    the search space, compared as numbers), the command's fixed overrides as typed, and no other key; at most
    n_trials trials, numbered below n_trials."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    intervals = {k: parser.parse_override(f"{k}={v}").value() for k, v in cfg.hydra.sweeper.params.items()}
    for number, overrides in launcher.jobs.items():
        assert number < cfg.hydra.sweeper.n_trials, f"trial {number} launched beyond n_trials"
        job = dict(o.split("=", 1) for o in overrides)
        assert set(job) == set(intervals) | {o.split("=", 1)[0] for o in SEARCH_ARGS[:-1]}, job
        assert all(job[o.split("=", 1)[0]] == o.split("=", 1)[1] for o in SEARCH_ARGS[:-1]), job
        for key, interval in intervals.items():
            assert interval.start <= float(job[key]) <= interval.end, f"{key}={job[key]} launched"


def _optuna_search(world: World, search_world: SearchWorld, data) -> None:
    from hydra.utils import instantiate

    p = world.case()
    kind = data.draw(st.sampled_from(["journal", "sqlite"]), label="storage")
    cfg, sweep = search_world.configs[kind], search_world.sweep
    sweep.mkdir()
    (sweep / ("search.db" if kind == "sqlite" else search.JOURNAL_FILE)).write_bytes(search_world.honest[kind])
    task = ["hparams_search=optuna", *TINY]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    _search_changes(data, p, sweep, kind, cfg)
    argv = [*SEARCH_ARGS, f"hydra.sweep.dir={sweep}"]
    launcher = RecordingLauncher()

    def command() -> None:  # what `python -m vitexp` does with the command line: its check, then the sweeper
        sweeps.check_command(argv)
        sweeper = instantiate(cfg.hydra.sweeper)
        sweeper.config, sweeper.launcher, sweeper.own_threads = cfg, launcher, True
        sweeper.sweep(task)

    with fz.no_hang():
        fz.call("optuna search", p, [sweep], command)
        if kind == "journal":
            journal = sweep / search.JOURNAL_FILE
            fz.call("search.load_study", p, [sweep], lambda: search.load_study(journal, name="vitexp"))
    _launched_within(launcher, cfg)


def _search_test(profile: str):
    @settings(
        max_examples=SEARCH_CASES[profile],
        derandomize=profile == "fast",
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(data=st.data())
    def test(world, search_world, data):
        _optuna_search(world, search_world, data)

    test.__name__ = "test_fuzz_optuna_search" + ("_long" if profile == "slow" else "")
    return test if profile == "fast" else pytest.mark.slow(test)


test_fuzz_optuna_search = _search_test("fast")
test_fuzz_optuna_search_long = _search_test("slow")


# --- the tests: each entry point in the fast profile (default suite) and the slow one (-m slow) --------------------

CASES = {
    "load_model": _load_model,
    "resume_checkpoint": _resume_checkpoint,
    "run_folder": _run_folder,
    "report": _report,
    "sweep": _sweep,
    "shards": _shards,
    "predict": _predict,
    "explain": _explain,
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
    point = runs.resume_point(run)
    assert point.last.epoch == 1
    runs.resumed(world.cfg, point.config, point.overrides, str(run), [f"resume={run}"])
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


@pytest.mark.slow
def test_zz_fuzz_case_counts_long():
    """The same counts at the end of the slow profile (`-m slow` deselects the one above)."""
    test_zz_fuzz_case_counts()
