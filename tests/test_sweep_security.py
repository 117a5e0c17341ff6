"""A sweep folder is data, never code: an Optuna study continued from its folder gives only values of the search the
command line declares, a job's results.json is only read, and a symlink in the folder is refused before any job."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from hydra.types import RunMode

from tests.conftest import TINY, compose_config, vitexp
from tests.test_security import Payload
from vitexp import VitexpError
from vitexp.runs import earlier_job, output_subdir
from vitexp.search import JOURNAL_FILE as STUDY_FILE
from vitexp.search import Search, declared_search, load_study, storage
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
