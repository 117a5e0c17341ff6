"""Sweeps that compare: one W&B run per job (read back with W&B's own offline reader), resume into the same
W&B run, online mode without network, Optuna search, and `python -m vitexp.report` over train/distill/prune."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml

from tests import cli
from tests.conftest import TINY, vitexp
from vitexp.report import pareto_front
from vitexp.rundir import fresh_dir
from vitexp.tracking import run_name

OFFLINE = ["logger=wandb", "logger.mode=offline", "logger.log_every_n_steps=1"]
TINY_WANDB = [*TINY[:-1], *OFFLINE]


def leet(*args: str) -> str:
    """W&B's own reader of offline runs: `wandb leet inspect ARGS`."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout


def records(offline_run: Path, kind: str) -> list[dict]:
    """The offline run's records of one type (history, run, artifact, ...)."""
    return [json.loads(line)[kind] for line in leet("--json", str(offline_run)).splitlines()
            if f'"type":"{kind}"' in line]  # fmt: skip


def inspect(offline_run: Path) -> tuple[dict, list[dict]]:
    """The run summary (state, config, latest values) and its history rows."""
    summary = json.loads(leet("--summary", "--json", str(offline_run)))
    return summary, [h["item"] for h in records(offline_run, "history")]


def report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = cli.run(list(args), cwd, 300, entry="report")
    assert proc.returncode == 0, proc.stderr
    return proc


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """The 2 x 2 sweep of the issue: lr x model on digits, offline W&B, 2 epochs."""
    cwd = tmp_path_factory.mktemp("sweep")
    vitexp("--multirun", "optim.lr=1e-3,3e-4", "model=baseline,patch8", "data=digits", *TINY_WANDB,
           "trainer.max_epochs=2", cwd=cwd)  # fmt: skip
    (folder,) = (cwd / "multirun_outputs").iterdir()
    return folder


def test_each_sweep_job_has_its_own_wandb_run_with_config_and_epoch_metrics(sweep):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    ids = set()
    for job in jobs:
        (offline,) = (job / "wandb").glob("offline-run-*")
        summary, history = inspect(offline)
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("optim.lr=")).split("=")[1])
        model = next(o for o in overrides if o.startswith("model=")).split("=")[1]
        assert summary["state"] == "finished" and summary["exit_code"] == 0
        assert summary["config"]["optim"]["lr"] == lr and summary["config"]["model"]["name"] == model
        assert summary["config"]["model"]["img_size"] == 16  # resolved, not "${data.img_size}"
        assert summary["name"].startswith(f"train-{model}-optim.lr=") and summary["run_id"] == offline.name[-8:]
        results = json.loads((job / "results.json").read_text())
        assert summary["summary"]["best_val_acc1"] == results["best_val_acc1"]
        assert summary["summary"]["params"] == results["params"]
        epochs = [h for h in history if "epoch" in h]
        rows = list(csv.DictReader((job / "metrics.csv").open()))
        assert [h["epoch"] for h in epochs] == [1, 2]
        assert [h["val/acc1"] for h in epochs] == [float(r["val/acc1"]) for r in rows]
        assert all({"train/loss", "val/loss", "lr", "grad_norm", "time/epoch_s", "throughput/img_s"} <= h.keys()
                   for h in epochs)  # fmt: skip
        steps = [h for h in history if "step/train_loss" in h]
        assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]  # debug=fast: 3 steps per epoch
        assert all(h["step/lr"] > 0 and h["step/grad_norm"] > 0 for h in steps)
        ckpt_id = torch.load(job / "checkpoints" / "last.pt", weights_only=True)["wandb_run_id"]
        assert ckpt_id == summary["run_id"]
        ids.add(summary["run_id"])
    assert len(ids) == 4
    assert not (sweep.parent.parent / "wandb").exists()  # nothing outside the run folders


def test_sweep_jobs_share_a_wandb_group(sweep):
    (run,) = records(next((sweep / "0" / "wandb").glob("offline-run-*")), "run")
    assert run["run_group"] == f"sweep-{sweep.name}" and run["job_type"] == "train"


def test_report_on_the_sweep(sweep):
    proc = report(str(sweep), cwd=sweep.parent)
    rows = table_rows(proc.stdout)
    assert len(rows) == 4
    assert "all runs: " in proc.stdout and "trainer.max_epochs=2" in proc.stdout.split("\n\n")[0]
    accs = [float(r[5].rstrip("%")) for r in rows]
    assert accs == sorted(accs, reverse=True)
    with (sweep / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert sorted(r["run"] for r in table) == ["0", "1", "2", "3"]
    for r in table:
        results = json.loads((sweep / r["run"] / "results.json").read_text())
        assert float(r["best_val_acc1"]) == results["best_val_acc1"] and r["status"] == "completed"
        assert int(r["macs"]) == results["macs"] and "optim.lr=" in r["overrides"]
    for png in ("report_val_acc.png", "report_acc_vs_macs.png"):
        height, width, _ = matplotlib.image.imread(sweep / png).shape
        assert height >= 300 and width >= 500


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.6), (4.0, 0.9)]
    assert pareto_front(points) == [(1.0, 0.5), (2.0, 0.7), (4.0, 0.9)]


def test_run_name_says_task_model_and_overrides():
    name = run_name("train", "patch8", ["model=patch8", "optim.lr=0.001", "logger=wandb", "logger.mode=offline",
                                        "hydra.run.dir=x", "seed=1"])  # fmt: skip
    assert name == "train-patch8-optim.lr=0.001-seed=1"


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    claim = fresh_dir.__wrapped__
    first, second = claim(str(tmp_path / "t")), claim(str(tmp_path / "t"))
    assert (first, second) == (str(tmp_path / "t"), str(tmp_path / "t_1"))


def test_a_failing_sweep_job_is_recorded_and_the_others_finish(tmp_path):
    vitexp("--multirun", *TINY_WANDB, "trainer.max_epochs=1", "data.val_size=5000,360", cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    failed = json.loads((sweep / "0" / "results.json").read_text())
    assert failed["status"] == "failed" and "data.val_size=5000" in failed["error"]
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "completed"
    summary, _ = inspect(next((sweep / "0" / "wandb").glob("offline-run-*")))
    assert summary["state"] == "failed" and summary["exit_code"] == 1  # closed, and marked failed
    statuses = {r["run"]: r["status"] for r in csv.DictReader(_report_csv(sweep))}
    assert statuses == {"0": "failed", "1": "completed"}


def _report_csv(folder: Path):
    report(str(folder), cwd=folder)
    return (folder / "report.csv").open()


def test_resume_continues_the_same_wandb_run(tmp_path):
    vitexp(*TINY_WANDB, "trainer.max_epochs=1", cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()
    vitexp(f"resume={run}", "trainer.max_epochs=2", *OFFLINE, "logger.log_checkpoints=true", cwd=tmp_path)
    first, second = sorted((run / "wandb").glob("offline-run-*"))
    (s1, h1), (s2, h2) = inspect(first), inspect(second)
    assert (
        s1["run_id"] == s2["run_id"] == torch.load(run / "checkpoints" / "last.pt", weights_only=True)["wandb_run_id"]
    )
    assert [h["epoch"] for h in h1 if "epoch" in h] == [1] and [h["epoch"] for h in h2 if "epoch" in h] == [2]
    assert [h["step"] for h in h2 if "step/train_loss" in h] == [4, 5, 6]  # the step axis goes on too
    (artifact,) = records(second, "artifact")
    assert artifact["name"] == f"model-{s2['run_id']}" and "best" in artifact["aliases"]
    (entry,) = artifact["manifest"]["contents"]
    assert entry["path"] == "best.pt" and Path(entry["local_path"]).is_relative_to(run)  # staged in the run folder


def test_online_without_network_warns_once_and_finishes(tmp_path):
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}  # nothing listens on port 9
    proc = vitexp(*TINY[:-1], "logger=wandb", "logger.mode=online", "logger.init_timeout=1", "trainer.max_epochs=1",
                  cwd=tmp_path, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "W&B online is not available" in line]
    assert len(warnings) == 1 and "wandb sync" in warnings[0]
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
    summary, history = inspect(next((run / "wandb").glob("offline-run-*")))
    assert summary["state"] == "finished" and [h["epoch"] for h in history if "epoch" in h] == [1]


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    vitexp("hparams_search=optuna", "hydra.sweeper.n_trials=3", *TINY, "trainer.max_epochs=1", cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(trials) == 3
    results = [json.loads((t / "results.json").read_text()) for t in trials]
    configs = [yaml.safe_load((t / ".hydra" / "config.yaml").read_text()) for t in trials]
    assert len({c["optim"]["lr"] for c in configs}) == 3 and all(1e-4 <= c["optim"]["lr"] <= 3e-3 for c in configs)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["best_val_acc1"] for r in results)
    assert set(best["best_params"]) == {"optim.lr", "optim.weight_decay", "model.drop_path_rate"}
    assert "best trial" in report(str(sweep), cwd=tmp_path).stdout


def test_report_covers_train_distill_and_prune_runs(tmp_path):
    vitexp("--multirun", "task=train,distill,prune", *TINY, "trainer.max_epochs=1", cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    rows = list(csv.DictReader(_report_csv(sweep)))
    by_run = {r["run"]: r for r in rows}
    assert {by_run["0"]["task"], by_run["1"]["task"], by_run["2"]["task"]} == {"train", "distill", "prune"}
    assert by_run["1/teacher"]["model"] == "resnet18" and by_run["2/unpruned"]["model"] == "baseline"
    assert all(r["status"] == "completed" and r["params"] and r["macs"] and r["best_val_acc1"] for r in rows)
    assert int(by_run["2"]["params"]) < int(by_run["2/unpruned"]["params"])


def test_report_on_a_folder_without_runs_is_one_line(tmp_path):
    proc = cli.run([str(tmp_path)], tmp_path, entry="report")
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "no run folders" in proc.stderr
