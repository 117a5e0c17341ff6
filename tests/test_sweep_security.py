"""A sweep folder is data, never code: an Optuna study continued from its folder gives only values of the search the
command line declares, a job's results.json is only read, and a symlink in the folder is refused before any job."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from hydra.types import RunMode

from tests import fuzz_inputs as fz
from tests.conftest import TINY, compose_config, vitexp
from tests.test_security import Payload
from vitexp import VitexpError
from vitexp.runs import earlier_job, output_subdir
from vitexp.search import JOURNAL_FILE as STUDY_FILE
from vitexp.search import Search, declared_search, launch_check, load_study, storage
from vitexp.sweeps import check_command

SEARCH = ["hparams_search=optuna", *TINY]


def declared(*arguments: str) -> Search:
    """The search `python -m vitexp hparams_search=optuna ARGUMENTS` runs, as its sweeper parses it."""
    node = compose_config("hparams_search=optuna", *arguments, hydra=True).hydra.sweeper
    return declared_search(node.params, ["hparams_search=optuna", *arguments], node.study_name, node.direction)


def honest_study(folder: Path, search: Search) -> list[dict]:
    """A study as a search stopped in its second trial leaves it: trial 0 completed, trial 1 running; returned as
    the journal's records (record 0 creates the study, record N + 1 trial N)."""
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="vitexp", storage=storage(None, folder), direction="maximize")
    params = {k: (d.low + d.high) / 2 for k, d in search.space.items()}
    for state, value in (("COMPLETE", 0.5), ("RUNNING", None)):
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState[state],
            value=value,
            params=params,
            distributions=search.space,
            user_attrs=search.fixed,
        )
        study.add_trial(trial)
    return [json.loads(line) for line in (folder / STUDY_FILE).read_text().splitlines()]


def write_journal(path: Path, record: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in record))


def plant(tmp_path: Path) -> tuple[dict, Path]:
    """Overrides that would unpickle a payload beside the study (torch.load as the loss), and the payload's marker."""
    marker = tmp_path / "payload_ran"
    torch.save({"x": Payload(marker)}, tmp_path / "notes.pt")
    overrides = {
        "task.loss._target_": "torch.load",
        "+task.loss.f": str(tmp_path / "notes.pt"),
        "+task.loss.weights_only": "false",
        "~task.loss.label_smoothing": "0.0",
    }
    return overrides, marker


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: a file's bytes, a link's target, a folder's name."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        entries[key] = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return entries


def refused(proc, *words: str) -> str:
    """The one error line of a refused command (exit 2, no traceback), which holds `words`."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


def test_a_study_whose_stopped_trial_plants_code_is_refused_before_any_job(tmp_path):
    sweep = tmp_path / "search"
    record = honest_study(sweep, declared(*TINY))
    overrides, marker = plant(tmp_path)
    stopped = record[2]
    stopped["params"].update(dict.fromkeys(overrides, 0))  # a choice's index: its one choice
    stopped["distributions"].update(
        {
            k: json.dumps({"name": "CategoricalDistribution", "attributes": {"choices": [v]}})
            for k, v in overrides.items()
        }
    )
    write_journal(sweep / STUDY_FILE, record)
    before = snapshot(sweep)
    proc = vitexp(*SEARCH, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    refused(proc, str(sweep / STUDY_FILE), "trial 1", "task.loss._target_", "does not declare")
    assert not marker.exists(), "the pickle payload ran"
    assert snapshot(sweep) == before, "a job folder, multirun.yaml or the study was written"


def test_a_study_may_hold_only_the_declared_search_within_its_distributions(tmp_path):
    search = declared(*TINY)
    path = tmp_path / STUDY_FILE
    honest = honest_study(tmp_path, search)
    study = load_study(path, search=search)  # an honest study passes as it is
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    assert study.trials[1].params == honest[2]["params"]
    overrides, marker = plant(tmp_path)
    lr = honest[1]["distributions"]["optim.lr"]
    seed = json.dumps({"name": "IntDistribution", "attributes": {"low": 0, "high": 9, "step": 1, "log": False}})
    attacks = {  # what an entry of trial 0 is changed to, and what the one line says of it
        "user_attrs": ({"task.loss._target_": "torch.load"}, " has the override task.loss._target_=torch.load"),
        "params": ({"optim.lr": 10.0}, ": parameter optim.lr=10.0 is not in this command's FloatDistribution"),
        "distributions": ({"optim.lr": lr.replace("0.003", "100")}, ": parameter optim.lr was drawn from another"),
    }
    for field, (value, message) in attacks.items():
        record = json.loads(json.dumps(honest))
        record[1][field].update(value)
        write_journal(path, record)
        with pytest.raises(VitexpError, match=re.escape(f"{path}: trial 0") + re.escape(message)) as e:
            load_study(path, search=search)
        assert "\n" not in str(e.value) and "refused" in str(e.value)
    for params, distributions, key in (
        ({"seed": 3}, {"seed": seed}, "parameter seed, which this command's search"),
        ({"optim.lr": "1e-3"}, {}, "parameter optim.lr=1e-3 is not in"),
        ({"optim.lr": True}, {}, "parameter optim.lr=True is not in"),
    ):
        record = json.loads(json.dumps(honest))
        record[2]["params"].update(params)
        record[2]["distributions"].update(distributions)
        write_journal(path, record)
        with pytest.raises(VitexpError, match=f"trial 1.*{key}"):
            load_study(path, search=search)
    # another fixed override than this command's, and a study that goes the other way
    write_journal(path, honest)
    with pytest.raises(VitexpError, match="trial 0 has the override trainer.device=cpu; this command has trainer.dev"):
        load_study(path, search=declared("debug=fast", "trainer.device=cuda", "logger=none"))
    with pytest.raises(VitexpError, match=r"directions \['MAXIMIZE'\], this command's search in \['minimize'\]"):
        load_study(path, search=declared(*TINY, "hydra.sweeper.direction=minimize"))
    assert not marker.exists()


def test_a_malformed_study_is_one_line(tmp_path):
    search = declared(*TINY)
    path = tmp_path / STUDY_FILE
    honest = honest_study(tmp_path, search)
    study, trial = honest[0], honest[1]
    malformed = {
        "[]\n": "unreadable",
        "{not json\n[]\n": "unreadable",
        json.dumps({**study, "op_code": "create"}) + "\n": "unreadable",
        json.dumps(study) + "\n" + json.dumps({**trial, "distributions": {"optim.lr": "{"}}) + "\n": "unreadable",
        json.dumps({**study, "study_name": "other"}) + "\n": "unreadable",
    }
    malformed["[" * 10**5 + "\n"] = "unreadable"
    for text, message in malformed.items():
        path.write_text(text)
        for each in (search, None):  # continued, or only read
            with pytest.raises(VitexpError, match=rf"{path} is unreadable \(.*") as e:
                load_study(path, search=each)
            assert "\n" not in str(e.value) and message in str(e.value) + " unreadable"


def test_a_symlink_in_a_sweep_folder_is_refused_before_any_job(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    sweep = tmp_path / "sweep"
    honest_study(sweep, declared(*TINY))
    study = sweep / STUDY_FILE
    record = {"hydra": {"overrides": {"hydra": [], "task": SEARCH}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(record))
    check_command([*SEARCH, f"hydra.sweep.dir={sweep}"])  # the honest folder passes
    for name, target in (("multirun.yaml", victim), (STUDY_FILE, victim), ("0", outside), ("0/results.json", victim)):
        saved = sweep / f"saved_{name.replace('/', '_')}"
        link = sweep / name
        link.parent.mkdir(exist_ok=True)
        if link.exists():
            link.rename(saved)
        link.symlink_to(target)
        with pytest.raises(VitexpError, match=f"{link} is a symlink") as e:
            check_command([*SEARCH, f"hydra.sweep.dir={sweep}"])
        assert "\n" not in str(e.value)
        link.unlink()
        if saved.exists():
            saved.rename(link)
    study.unlink()
    study.symlink_to(victim)
    with pytest.raises(VitexpError, match=f"{study} is a symlink"):
        load_study(study, search=declared(*TINY))
    # the command refuses it before Hydra starts, also for a search (no --multirun)
    before = snapshot(sweep)
    proc = vitexp(*SEARCH, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    refused(proc, f"{study} is a symlink")
    assert snapshot(sweep) == before and victim.read_text() == "mine" and list(outside.iterdir()) == []


def test_a_jobs_results_json_that_is_not_a_completed_runs_object_is_run_again(tmp_path):
    job, overrides = tmp_path / "0", ["seed=0"]
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    for text in ("[]", '"completed"', '{"status": "compl', "", "NaN", '{"status": ["completed"]}', "[" * 10**5):
        (job / "results.json").write_text(text)
        assert earlier_job(job, overrides) is None  # not completed: run again
        assert output_subdir(None, str(job), RunMode.MULTIRUN, overrides).startswith(".hydra/resume_")
    # a completed run's figures go back to the sweep only when they are numbers
    results = {"status": "completed", "best_val_acc1": "0.9; import os", "params": 10, "macs": True}
    (job / "results.json").write_text(json.dumps(results))
    assert earlier_job(job, overrides) == {"params": 10}
    assert earlier_job(job, overrides, metric="best_val_acc1") is None
    assert output_subdir(None, str(job), RunMode.MULTIRUN, overrides) is None  # skipped as completed
    # another job's folder and a linked results.json are refused with one line
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=1\x1b[2J"]))
    with pytest.raises(VitexpError, match=r"holds a run of seed=1\\x1b\[2J, not of this job's seed=0"):
        earlier_job(job, overrides)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "results.json").unlink()
    (job / "results.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps({"status": "completed", "best_val_acc1": 1.0}))
    with pytest.raises(VitexpError, match="results.json is a symlink"):
        earlier_job(job, overrides)
    assert output_subdir(None, str(job), RunMode.MULTIRUN, overrides) is None  # the job refuses it, with the reason


def test_a_search_whose_trials_all_failed_ends_with_one_line(tmp_path):
    sweep = tmp_path / "search"
    proc = vitexp(
        *SEARCH,
        "trainer.max_epochs=1",
        "data.val_size=5000",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        check=False,
    )
    refused(proc, f"all 1 trials of study vitexp failed; see {sweep / '0' / 'results.json'}")
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "failed"
    assert [t.state.name for t in load_study(sweep / STUDY_FILE).trials] == ["FAIL"]


# --- the launch check: whatever a study holds, a job runs only with this command's search ------------------------


class Recorder:
    """A launcher that records the overrides of each job it is handed (trial N: job N) and returns a best val/acc1
    for each; `during` runs while the jobs run (another worker, or someone else, writing to the shared study)."""

    def __init__(self, during=None) -> None:
        self.jobs: dict[int, list[str]] = {}
        self.during = during

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        for number, overrides in enumerate(job_overrides, initial_job_idx):
            self.jobs[number] = list(overrides)
        if self.during is not None:
            self.during()
        return [JobReturn(overrides=o, status=JobStatus.COMPLETED, _return_value=0.5) for o in job_overrides]


def search_here(sweep: Path, *arguments: str, launcher: Recorder, capsys=None) -> tuple[int, str]:
    """vitexp's sweeper as `python -m vitexp hparams_search=optuna ARGUMENTS hydra.sweep.dir=SWEEP` runs it, in this
    process with `launcher`: its exit status and its one error line ('' when none)."""
    from hydra.utils import instantiate

    cfg = compose_config("hparams_search=optuna", *TINY, *arguments, f"hydra.sweep.dir={sweep}", hydra=True)
    sweeper = instantiate(cfg.hydra.sweeper)
    sweeper.config, sweeper.launcher = cfg, launcher
    sweeper.own_threads = True  # the test process keeps its threads
    try:
        sweeper.sweep(list(cfg.hydra.overrides.task))
        code = 0
    except SystemExit as e:
        code = e.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] if capsys else []
    assert len(errors) == (code != 0), errors
    return code, errors[0] if errors else ""


def launched(launcher: Recorder, key: str) -> list[str]:
    """The values of `key` that the jobs were launched with."""
    return [o.split("=", 1)[1] for job in launcher.jobs.values() for o in job if o.startswith(f"{key}=")]


OUT_OF_SPACE = [  # what a waiting trial fixes, and the key the one line names
    ({"optim.lr": 1e6}, "optim.lr=1000000.0 is not in"),
    ({"optim.weight_decay": 77}, "optim.weight_decay=77 is not in"),
    ({"seed": 10**30}, "seed=1000000000000000000000000000000 is not in"),  # an int of the space, unbounded
    ({"optim.lr": float("nan")}, "optim.lr=nan is not in"),
    ({"optim.lr": "1e-3"}, "optim.lr=1e-3 is not in"),
    ({"trainer.max_epochs": 1000}, "has parameter trainer.max_epochs, which this command's search"),
    ({"task.loss._target_": "torch.load"}, "has parameter task.loss._target_, which"),
]


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_waiting_trial_out_of_the_search_space_is_refused_before_any_job(tmp_path, kind, capsys):
    """What Optuna's own `study.enqueue_trial` writes (the values in system_attrs["fixed_params"]), in the journal or
    in the sqlite storage that hydra.sweeper.storage names."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = ["+hydra.sweeper.params.seed='range(0,4)'", "hydra.sweeper.n_trials=3"]
    cases = OUT_OF_SPACE if kind == "journal" else [OUT_OF_SPACE[i] for i in (0, 3, 5)]  # a new database: 2 s
    for n, (fixed, message) in enumerate(cases):
        sweep = tmp_path / f"{kind}{n}"
        sweep.mkdir()
        url = f"sqlite:///{sweep / 'search.db'}" if kind == "sqlite" else None
        place = f"{sweep / 'search.db'} (hydra.sweeper.storage)" if url else str(sweep / STUDY_FILE)
        extra = [f"hydra.sweeper.storage={url}"] if url else []
        study = optuna.create_study(study_name="vitexp", storage=storage(url, sweep), direction="maximize")
        study.enqueue_trial({"optim.lr": 1e-3}, skip_if_exists=False)  # an honest one first: it runs
        study.enqueue_trial(fixed, skip_if_exists=False)
        launcher = Recorder()
        code, line = search_here(sweep, *space, *extra, launcher=launcher, capsys=capsys)
        assert code == 2 and line.startswith(f"error: {place}: trial 1") and message in line, line
        assert launcher.jobs == {}, "a job ran"
        assert [t.state.name for t in study.get_trials()] == ["WAITING", "WAITING"]  # none left RUNNING
        assert not [p for p in sweep.iterdir() if p.is_dir()], "a job folder was made"


def test_a_trial_enqueued_while_the_search_runs_is_checked_before_it_is_launched(tmp_path, capsys):
    """Another process writes to the shared study after this worker checked it: the launch check still stops it."""
    sweep = tmp_path / "search"
    sweep.mkdir()
    study = optuna.create_study(study_name="vitexp", storage=storage(None, sweep), direction="maximize")

    def tamper() -> None:
        study.enqueue_trial({"optim.lr": 1e6, "optim.weight_decay": 77}, skip_if_exists=False)

    launcher = Recorder(during=tamper)
    code, line = search_here(sweep, "hydra.sweeper.n_trials=4", launcher=launcher, capsys=capsys)
    assert code == 2 and f"{sweep / STUDY_FILE}: trial 1: parameter optim.lr=1000000.0 is not in" in line
    assert list(launcher.jobs) == [0] and launched(launcher, "optim.lr") != ["1000000.0"]
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "WAITING"]
    # a stopped trial written into the journal meanwhile: claimed as stopped, refused by the check at the launch
    sweep = tmp_path / "stopped"
    journal = sweep / STUDY_FILE
    record = honest_study(sweep, declared(*TINY))[2]
    record["params"]["optim.lr"] = 1e6

    def plant_stopped() -> None:
        with journal.open("a") as f:
            f.write(json.dumps(record) + "\n")

    launcher = Recorder(during=plant_stopped)
    code, line = search_here(sweep, "hydra.sweeper.n_trials=4", launcher=launcher, capsys=capsys)
    assert code == 2 and f"{journal}: trial 2: parameter optim.lr=1000000.0 is not in" in line, line
    assert list(launcher.jobs) == [1] and not launched(launcher, "optim.lr") == ["1000000.0"]


def test_the_launch_check_takes_values_of_the_space_and_the_commands_fixed_overrides_only():
    node = compose_config("hparams_search=optuna", *TINY, hydra=True).hydra.sweeper
    sweeps = ["seed=range(0,10,3)", "data.transform=choice(cifar,imagenet)"]
    search = declared_search(node.params, [*TINY, *sweeps], "vitexp", "maximize")
    honest = {"optim.lr": 1e-3, "optim.weight_decay": 0.0, "model.drop_path_rate": 0.2, "seed": 9}
    overrides = launch_check("the study", 4, {**honest, "data.transform": "cifar"}, search)
    assert overrides[:5] == [
        "optim.lr=0.001",
        "optim.weight_decay=0.0",
        "model.drop_path_rate=0.2",
        "seed=9",
        "data.transform=cifar",
    ]
    assert overrides[5:] == [f"{k}={v}" for k, v in search.fixed.items()] and "trainer.device=cpu" in overrides
    for change, message in (
        ({"seed": 4}, "seed=4 is not in"),  # off the range's step
        ({"seed": 12}, "seed=12 is not in"),
        ({"seed": 3.0}, "seed=3.0 is not in"),
        ({"seed": True}, "seed=True is not in"),
        ({"optim.lr": math.inf}, "optim.lr=inf is not in"),
        ({"model.drop_path_rate": 0.2000001}, "model.drop_path_rate=0.2000001 is not in"),
        ({"data.transform": "cifar,imagenet"}, "data.transform=cifar,imagenet is not in"),
        ({"trainer.device": "cuda"}, "has parameter trainer.device, which this command's search space"),
        ({"x\x1b[2J": 1}, r"has parameter x\x1b[2J, which"),
    ):
        with pytest.raises(VitexpError, match=re.escape("the study: trial 4") + ".*" + re.escape(message)):
            launch_check("the study", 4, {**honest, "data.transform": "cifar", **change}, search)
    with pytest.raises(VitexpError, match="the study: trial 4 has no value of parameter data.transform; refused"):
        launch_check("the study", 4, honest, search)
    with pytest.raises(VitexpError, match="trial 4: its parameters are list, not names"):
        launch_check("the study", 4, [1e6], search)


def test_a_continued_search_launches_at_most_n_trials_in_all(tmp_path, capsys):
    """A journal holding six stopped trials: a search of 3 trials finishes the first three and launches no more."""
    sweep = tmp_path / "search"
    search = declared(*TINY)
    sweep.mkdir()
    study = optuna.create_study(study_name="vitexp", storage=storage(None, sweep), direction="maximize")
    params = {k: (d.low + d.high) / 2 for k, d in search.space.items()}
    for _ in range(6):
        stopped = optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING, params=params, distributions=search.space, user_attrs=search.fixed
        )
        study.add_trial(stopped)
    launcher = Recorder()
    assert search_here(sweep, "hydra.sweeper.n_trials=3", launcher=launcher, capsys=capsys) == (0, "")
    assert list(launcher.jobs) == [0, 1, 2]
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3 + ["RUNNING"] * 3
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == 0.5


def test_a_completed_trial_whose_value_is_not_a_number_is_one_line(tmp_path, capsys):
    """In the study before the search starts (refused before any job), or written into it while a trial runs (the
    search ends with one line; the trials told so far stay)."""
    sweep = tmp_path / "search"
    honest_study(sweep, declared(*TINY))
    journal = sweep / STUDY_FILE
    honest = journal.read_text()
    for value in ('["0.9; rm -rf ~"]', "[[0.5]]", '["high"]', "[NaN]", "[0.5,0.7]", "null"):
        journal.write_text(honest.replace('"value":0.5,"values":null', f'"value":null,"values":{value}'))
        launcher = Recorder()
        code, line = search_here(sweep, "hydra.sweeper.n_trials=3", launcher=launcher, capsys=capsys)
        assert code == 2 and f"{journal} is unreadable (trial 0 is completed with the value" in line, line
        assert launcher.jobs == {} and not (sweep / "1").exists()
    journal.write_text(honest)

    def tamper() -> None:  # a completed trial with a text value added to the journal by hand while trial 1 runs
        with journal.open("a") as f:
            f.write(honest.splitlines()[1].replace('"value":0.5', '"value":"text"') + "\n")

    launcher = Recorder(during=tamper)
    code, line = search_here(sweep, "hydra.sweeper.n_trials=3", launcher=launcher, capsys=capsys)
    assert code == 2 and "trial 2 is completed with the value ['text']" in line, line
    assert list(launcher.jobs) == [1] and not (sweep / "optimization_results.yaml").exists()
    assert [t.state.name for t in load_study(journal, name="vitexp").trials][:2] == ["COMPLETE", "COMPLETE"]


def test_lock_files_and_study_files_that_are_not_regular_files_are_refused_at_once(tmp_path, capsys):
    """A folder, or a FIFO (a read of it would wait for a writer forever), where a lock, the journal or the sqlite
    file goes: one line and exit 2 within seconds, nothing launched, nothing in the folder changed."""
    names = [".study.lock", f"{STUDY_FILE}.lock", STUDY_FILE, "search.db", ".trial_0.lock"]
    for n, name in enumerate(names + ["search.db-journal", "search.db-wal"]):
        for kind in ("folder", "fifo"):
            sweep = tmp_path / f"{n}{kind}"
            sweep.mkdir()
            os.mkfifo(sweep / name) if kind == "fifo" else (sweep / name).mkdir()
            database = sweep / name.split("-")[0]
            extra = [f"hydra.sweeper.storage=sqlite:///{database}"] if database.name == "search.db" else []
            launcher = Recorder()
            before = snapshot(sweep)
            with fz.no_hang():
                code, line = search_here(sweep, "hydra.sweeper.n_trials=2", *extra, launcher=launcher, capsys=capsys)
            assert code == 2 and str(sweep / name) in line and "Traceback" not in line, (name, kind, line)
            after = snapshot(sweep)  # all as it was; the study's own lock file may be new
            assert launcher.jobs == {} and {k: after.get(k) for k in before} == before, (name, kind)
            made = {STUDY_FILE, "multirun.yaml"} if name == ".trial_0.lock" else set()  # a trial lock: after them
            assert set(after) - set(before) <= {".study.lock", *made}, (name, kind)
    os.mkfifo(tmp_path / "study.log")
    with fz.no_hang(), pytest.raises(VitexpError, match="study.log is not a regular file"):
        load_study(tmp_path / "study.log")  # as the report and optuna-dashboard's helper read a study


def test_a_sqlite_storage_that_is_not_a_database_is_one_line(tmp_path, capsys):
    database = tmp_path / "search.db"
    for content in (b"not a database\n" * 100, b"SQLite format 3\x00" + b"\xff" * 500):
        database.write_bytes(content)
        launcher = Recorder()
        code, line = search_here(
            tmp_path / "sweep", f"hydra.sweeper.storage=sqlite:///{database}", launcher=launcher, capsys=capsys
        )
        assert code == 2 and f"error: {database} (hydra.sweeper.storage) is unreadable (" in line, line
        assert launcher.jobs == {} and database.read_bytes() == content


def test_a_multirun_yaml_that_is_not_a_regular_file_refuses_the_continued_sweep(tmp_path):
    """A folder or a FIFO in place of the command record: refused at once (never skipped, so a changed override
    cannot run in the old sweep's job folders)."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    argv = ["-m", "optim.lr=1e6", *TINY, f"hydra.sweep.dir={sweep}"]
    for make in (os.mkfifo, os.mkdir):
        make(sweep / "multirun.yaml")
        with (
            fz.no_hang(),
            pytest.raises(VitexpError, match=f"{sweep / 'multirun.yaml'} is a (FIFO|folder).*, not a regular file"),
        ):
            check_command(argv)
        os.rmdir(sweep / "multirun.yaml") if make is os.mkdir else (sweep / "multirun.yaml").unlink()
    os.mkfifo(sweep / "multirun.yaml")
    proc = vitexp(*argv, cwd=tmp_path, check=False, timeout=120)
    refused(proc, f"{sweep / 'multirun.yaml'} is a FIFO (named pipe), not a regular file")
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"], "a job ran"


def test_a_journal_whose_last_record_is_cut_short_is_refused_before_it_is_written_to(tmp_path, capsys):
    sweep = tmp_path / "search"
    honest_study(sweep, declared(*TINY))
    journal = sweep / STUDY_FILE
    cut = journal.read_bytes()[:-40]  # a worker killed in the middle of a record
    journal.write_bytes(cut)
    launcher = Recorder()
    code, line = search_here(sweep, "hydra.sweeper.n_trials=3", launcher=launcher, capsys=capsys)
    assert code == 2 and f"error: {journal} is unreadable (its last record is cut short)" in line, line
    assert launcher.jobs == {} and journal.read_bytes() == cut
