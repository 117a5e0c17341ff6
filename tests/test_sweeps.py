"""Sweeps that compare: one W&B run per job (read back with W&B's own offline reader), resume into the same
W&B run, online mode without network, Optuna search, and `python -m vitexp.report` over train/distill/prune."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from hydra.types import RunMode

from tests import cli
from tests.conftest import TINY, vitexp
from vitexp import VitexpError
from vitexp.report import aggregate, pareto_front, summarize
from vitexp.runs import earlier_job, fresh_dir, output_subdir
from vitexp.search import JOURNAL_FILE as STUDY_FILE
from vitexp.search import load_study
from vitexp.sweeps import check_command
from vitexp.tracking import run_name

OFFLINE = ["logger=wandb", "logger.mode=offline", "logger.log_every_n_steps=1"]
TINY_WANDB = [*TINY[:-1], *OFFLINE]


def leet(*args: str) -> str:
    """W&B's own reader of offline runs: `wandb leet inspect ARGS`."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout


def records(offline_run: Path, kind: str) -> list[dict]:
    """The offline run's records of one type (history, run, artifact, ...)."""
    return [
        json.loads(line)[kind] for line in leet("--json", str(offline_run)).splitlines() if f'"type":"{kind}"' in line
    ]


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
    vitexp(
        "--multirun",
        "optim.lr=1e-3,3e-4",
        "model=baseline,patch8",
        "data=digits",
        *TINY_WANDB,
        "trainer.max_epochs=2",
        cwd=cwd,
    )
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
        assert all(
            {"train/loss", "val/loss", "lr", "grad_norm", "time/epoch_s", "throughput/img_s"} <= h.keys()
            for h in epochs
        )
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
    name = run_name(
        "train",
        "patch8",
        ["model=patch8", "optim.lr=0.001", "logger=wandb", "logger.mode=offline", "hydra.run.dir=x", "seed=1"],
    )
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


def _report_csv(folder: Path, *args: str):
    report(str(folder), *args, cwd=folder)
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
    proc = vitexp(
        *TINY[:-1],
        "logger=wandb",
        "logger.mode=online",
        "logger.init_timeout=1",
        "trainer.max_epochs=1",
        cwd=tmp_path,
        env=env,
        check=False,
    )
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


def _fake_run(folder: Path, overrides: list[str], acc: float, curve: list[float], status: str = "completed") -> None:
    """A run folder as vitexp leaves it: .hydra/overrides.yaml, results.json and metrics.csv."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    model = next(o.split("=")[1] for o in overrides if o.startswith("model="))
    results = {"task": "train", "model": model, "best_val_acc1": acc, "params": 1000, "macs": 2e6, "status": status}
    (folder / "results.json").write_text(json.dumps(results))
    rows = "".join(f"{e},{a}\n" for e, a in enumerate(curve, 1))
    (folder / "metrics.csv").write_text("epoch,val/acc1\n" + rows)


def test_report_gives_the_mean_std_and_n_of_runs_that_differ_only_in_seed(tmp_path):
    runs = [
        ("baseline", 0, 0.50, [0.3, 0.50]),
        ("baseline", 1, 0.60, [0.4, 0.60]),
        ("baseline", 2, 0.70, [0.2, 0.7]),
        ("patch8", 0, 0.40, [0.3, 0.40]),
        ("patch8", 1, 0.45, [0.1, 0.45]),
    ]
    for i, (model, seed, acc, curve) in enumerate(runs):
        _fake_run(tmp_path / str(i), [f"model={model}", f"seed={seed}", "trainer.max_epochs=2"], acc, curve)
    _fake_run(tmp_path / "5", ["model=patch8", "seed=2", "trainer.max_epochs=2"], 0.1, [0.1], status="failed")
    rows = {r["model"]: r for r in csv.DictReader(_report_csv(tmp_path))}
    assert set(rows) == {"baseline", "patch8"}
    base, patch8 = rows["baseline"], rows["patch8"]
    assert base["run"] == "0,1,2" and base["n"] == "3" and base["best_val_acc1_n"] == "3"
    assert float(base["best_val_acc1"]) == pytest.approx(0.6) and float(base["best_val_acc1_std"]) == pytest.approx(0.1)
    # the failed run is counted in n and status, not in the figures
    assert patch8["n"] == "3" and patch8["status"] == "2 completed, 1 failed" and patch8["best_val_acc1_n"] == "2"
    assert float(patch8["best_val_acc1"]) == pytest.approx(0.425)
    assert float(patch8["best_val_acc1_std"]) == pytest.approx(statistics.stdev([0.40, 0.45]))
    table = report(str(tmp_path), cwd=tmp_path).stdout
    assert "| 60.00% ± 10.00 |" in table and "| 42.50% ± 3.54 (n=2) |" in table
    assert "seed=0,1,2" in table.split("\n\n")[0]  # said once, above the table

    runs = [summarize(tmp_path / str(i), tmp_path) for i in range(6)]
    row = next(r for r in aggregate(runs) if r["model"] == "baseline")
    assert [e for e, _, _ in row["curve"]] == [1, 2]
    for (_, mean, std), accs in zip(row["curve"], [(0.3, 0.4, 0.2), (0.5, 0.6, 0.7)]):  # the band of the plot
        assert mean == pytest.approx(statistics.mean(accs)) and std == pytest.approx(statistics.stdev(accs))
    assert len(aggregate(runs, by=())) == 6  # --by none: a row per run
    (pooled,) = list(csv.DictReader(_report_csv(tmp_path, "--by", "seed,model")))
    assert pooled["n"] == "6" and pooled["model"] == "baseline,patch8"


@pytest.mark.slow
def test_a_seed_sweep_reports_one_row_per_setting_with_mean_and_std(tmp_path):
    vitexp("--multirun", "seed=0,1,2", "model=baseline,patch8", *TINY, "trainer.max_epochs=1", cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    by_model: dict[str, list[float]] = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        results = json.loads((job / "results.json").read_text())
        by_model.setdefault(results["model"], []).append(results["best_val_acc1"])
    assert {m: len(a) for m, a in by_model.items()} == {"baseline": 3, "patch8": 3}
    table = report(str(sweep), cwd=tmp_path).stdout
    assert len(table_rows(table)) == 2
    rows = {r["model"]: r for r in csv.DictReader((sweep / "report.csv").open())}
    for model, accs in by_model.items():
        mean, std = statistics.mean(accs), statistics.stdev(accs)
        assert float(rows[model]["best_val_acc1"]) == pytest.approx(mean, abs=1e-12)
        assert float(rows[model]["best_val_acc1_std"] or 0) == pytest.approx(std, abs=1e-12)
        assert rows[model]["n"] == rows[model]["best_val_acc1_n"] == "3"
        assert f"| {100 * mean:.2f}%" + (f" ± {100 * std:.2f}" if std else "") + " |" in table
    for png in ("report_val_acc.png", "report_acc_vs_macs.png"):
        height, width, _ = matplotlib.image.imread(sweep / png).shape
        assert height >= 300 and width >= 500


def test_a_sweep_job_finds_its_own_earlier_start_and_refuses_another_jobs_folder(tmp_path):
    job = tmp_path / "0"
    _fake_run(job, ["model=baseline", "seed=0"], 0.5, [0.5])
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    assert earlier_job(job, ["seed=0", "model=baseline"])["best_val_acc1"] == 0.5  # completed: kept, its results
    with pytest.raises(
        VitexpError, match="holds a run of model=baseline seed=0, not of this job's model=baseline seed=1"
    ):
        earlier_job(job, ["model=baseline", "seed=1"])
    assert earlier_job(tmp_path / "1", ["seed=1"]) is None  # never started
    # Hydra records nothing in a completed job's folder that a sweep run again skips, nor in another job's
    assert output_subdir(None, str(job), RunMode.MULTIRUN, ["model=baseline", "seed=0"]) is None
    assert output_subdir(None, str(job), RunMode.MULTIRUN, ["model=patch8", "seed=0"]) is None
    assert output_subdir(None, str(job), RunMode.RUN, []).startswith(".hydra/resume_")  # auto_resume: recorded
    (job / "results.json").write_text(json.dumps({"status": "failed"}))
    assert earlier_job(job, ["model=baseline", "seed=0"]) is None  # failed: run again
    assert output_subdir(None, str(job), RunMode.MULTIRUN, ["model=baseline", "seed=0"]).startswith(".hydra/resume_")


def test_a_sweep_run_again_reruns_its_failed_job_and_refuses_another_command(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["--multirun", *TINY, "data.val_size=5000", f"hydra.sweep.dir={sweep}"]
    vitexp(*args, cwd=tmp_path)
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "failed"
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*")}
    proc = vitexp(*args[:-2], "data.val_size=4000", args[-1], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{sweep} holds a sweep of other overrides (" in proc.stderr and "data.val_size=5000" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("*")} == before
    vitexp(*args, cwd=tmp_path)  # the same command: the failed job runs again, in its folder
    assert [p.name for p in (sweep / "0" / ".hydra").iterdir() if p.is_dir()][0].startswith("resume_")
    assert (sweep / "0" / "train_baseline.log").read_text().count("error: data.val_size=5000") == 2


def test_an_unreadable_study_file_is_one_line(tmp_path):
    path = tmp_path / STUDY_FILE
    for text in ("{not json\n[]\n", json.dumps({"op_code": 0, "study_name": "vitexp", "directions": ["up"]}) + "\n"):
        path.write_text(text)
        with pytest.raises(VitexpError, match=f"{path} is unreadable") as e:
            load_study(path)
        assert "\n" not in str(e.value)


def test_a_sweep_folder_is_continued_only_with_its_own_overrides(tmp_path):
    record = {"hydra": {"overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": ["seed=0,1", "model=patch8"]}}}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(record))
    folder = f"hydra.sweep.dir={tmp_path}"
    check_command(["--multirun", "seed=0,1", folder, "model=patch8", "hydra.sweeper.n_trials=3"])  # Hydra's may change
    check_command(["--multirun", "seed=0,1"])  # a new sweep folder: nothing to check
    for other in (["seed=0,1,2", "model=patch8"], ["model=patch8", "seed=0,1"]):  # other jobs, or in another order
        with pytest.raises(VitexpError, match=r"holds a sweep of other overrides \(seed=0,1 model=patch8\)"):
            check_command(["--multirun", *other, folder])
    (tmp_path / "multirun.yaml").write_text("hydra: [")
    with pytest.raises(VitexpError, match="multirun.yaml is unreadable"):
        check_command(["--multirun", "seed=0,1", folder])
