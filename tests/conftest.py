"""Shared fixtures: the real config with tiny overrides, and the CLI as users call it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tarfile
from pathlib import Path

# Under xdist each worker, and every run it starts, computes on one thread: two workers with a thread per core each
# oversubscribe the cores, and OpenMP's spinning threads then slow every run several-fold.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest
from hydra import compose, initialize_config_dir

from tests import cli
from vitexp.config import config_dir, register_resolvers, version_base

REPO = Path(__file__).resolve().parents[1]
# ../shared next to the checkout, or where VITEXP_CIFAR_TAR says (a checkout elsewhere)
CIFAR_TAR = Path(os.environ.get("VITEXP_CIFAR_TAR", REPO.parent / "shared" / "data" / "cifar10" / "train.tar.gz"))
# A 2-block model, a few batches, CPU, no W&B.
TINY = ["debug=fast", "trainer.device=cpu", "logger=none"]


def metric_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the metrics.csv at `path` without the columns a clock measures (time/..., throughput/...), which
    differ between two runs of the same command."""
    with path.open(newline="") as f:
        return [
            {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))} for row in csv.DictReader(f)
        ]


def compose_config(*overrides: str, hydra: bool = False):
    """The composed config as `python -m vitexp` would see it (with the hydra node when asked)."""
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), **version_base()):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def tiny_cfg():
    """A fresh copy of the tiny config for each test."""
    return compose_config(*TINY)


def vitexp(
    *args: str, cwd: Path, check: bool = True, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m vitexp ARGS` in `cwd`, as a user would, in a process of its own (tests/cli.py); `env` adds
    environment variables."""
    proc = cli.run(list(args), cwd, timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"vitexp {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """220 real photographs of two classes in every size, shape and file format (tests/photos.py)."""
    from tests.photos import make_photos

    return make_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """An ImageFolder tree of 60 real CIFAR-10 training images per class, from ../shared."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} not present")
    root = tmp_path_factory.mktemp("cifar10")
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            cls = parts[-2]
            if counts.get(cls, 0) >= 60:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            dest = root / "train" / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
            if len(counts) == 10 and all(c >= 60 for c in counts.values()):
                break
    return root
