"""vitexp on Hydra's public API, on the Hydra installed (1.3 in the main suite; .ci/run runs the tests marked `hydra14`
again on Hydra 1.4): a run, a resume, a sweep, a search and a refusal, without a warning from Hydra; the sweeper
found by its entry point; `instantiate` held to vitexp's trusted targets where Hydra has an execution whitelist."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import hydra
import hydra.utils
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY, vitexp
from vitexp import VitexpError
from vitexp.config import build, hydra_settings
from vitexp.runs import _override

pytestmark = pytest.mark.hydra14
ONE_EPOCH = [*TINY, "trainer.max_epochs=1"]


def _hydra_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not vitexp's or Hydra's log records: warnings, tracebacks."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[20")]


def test_a_run_in_a_fresh_interpreter_prints_no_warning(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # warnings shown as a user sees them
    command = [sys.executable, "-m", "vitexp", *ONE_EPOCH]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and _hydra_lines(proc.stderr) == [], proc.stderr
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()
    assert json.loads((run / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow  # two runs in fresh processes: in the Hydra 1.4 step of .ci/run (-m hydra14) and with -m slow
def test_a_resumed_run_continues_in_its_own_folder(tmp_path):
    vitexp(*ONE_EPOCH, cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "train" / "baseline").iterdir()
    proc = vitexp(f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert _hydra_lines(proc.stderr) == [] and [p.name for p in run.parent.iterdir()] == [run.name]
    assert json.loads((run / "results.json").read_text())["epochs"] == 2
    assert len(list((run / ".hydra").glob("resume_*/config.yaml"))) == 1


def test_a_sweep_runs_each_job_in_its_folder(tmp_path):
    proc = vitexp("--multirun", *ONE_EPOCH, "seed=0,1", cwd=tmp_path)
    assert _hydra_lines(proc.stderr) == []
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    seeds = [yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())["seed"] for job in ("0", "1")]
    assert seeds == [0, 1]


def test_a_search_runs_its_trials_without_a_warning(tmp_path):
    proc = vitexp("hparams_search=optuna", "hydra.sweeper.n_trials=2", *ONE_EPOCH, cwd=tmp_path)
    assert _hydra_lines(proc.stderr) == []
    (sweep,) = (tmp_path / "multirun_outputs").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["name"] == "optuna"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["optim.lrr=1"], "error: optim.lrr is not a config key"),
        (["optim.lr=-1"], "error: optim.lr=-1.0 is not valid"),
        (["--multirun", "optim.lrr=1,2"], "error: optim.lrr is not a config key"),
    ],
    ids=["misspelled-key", "out-of-range", "misspelled-sweep"],
)
def test_a_bad_command_is_one_line_before_any_folder(args, line, tmp_path):
    proc = vitexp(*TINY, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.splitlines()[0]], proc.stderr
    assert proc.stderr.startswith(line) and list(tmp_path.iterdir()) == []


def test_the_sweeper_is_registered_by_its_entry_point():
    (entry,) = [e for e in entry_points(group="hydra.plugins") if e.name == "vitexp_sweeper"]
    assert entry.load().__name__ == "OptunaSweeper"


def test_vitexp_imports_no_hydra_internals():
    for path in [*(REPO / "vitexp").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("hydra._internal") for n in names), path


@pytest.mark.skipif(not hasattr(hydra.utils, "execution_whitelist"), reason="Hydra 1.3 has no execution whitelist")
def test_instantiate_builds_only_trusted_targets():
    assert "execution_whitelist" in hydra_settings() and "version_base" not in hydra_settings()
    with pytest.raises(VitexpError, match="os.getcwd.* not in the Hydra execution whitelist") as refused:
        build(OmegaConf.create({"_target_": "os.getcwd"}))
    assert "\n" not in str(refused.value)
    assert build(OmegaConf.create({"_target_": "torch.nn.Identity"})).__class__.__name__ == "Identity"


@pytest.mark.skipif(hasattr(hydra.utils, "execution_whitelist"), reason="Hydra 1.4 takes no version_base")
def test_hydra_13_is_told_its_version_base():
    assert hydra_settings() == {"version_base": "1.3"}


@pytest.mark.parametrize(
    "folder", ["outputs/train/baseline/t", "/r/a b", "/r/x,y", "/r/it's", "/r/a=b", "/r/é", "/r/b\\"]
)
def test_a_decided_folder_reaches_hydra_as_it_is(folder):
    (parsed,) = OverridesParser.create().parse_overrides([_override("hydra.run.dir", folder)])
    assert parsed.value() == folder and not parsed.is_sweep_override()


def test_a_folder_hydra_would_read_as_an_interpolation_is_one_line():
    with pytest.raises(VitexpError, match=r"holds '\$\{'; rename the folder"):
        _override("hydra.run.dir", "/r/${oc.env:HOME}")
