"""`pip install .` (not editable) gives a package that finds its configs from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_installed_package_finds_its_configs(tmp_path):
    src = tmp_path / "src"
    top_level_only = {".git", "outputs", "multirun_outputs", "data", "build"}

    def skip(folder: str, names: list[str]) -> list[str]:
        junk = [n for n in names if n.endswith((".egg-info", "_cache")) or n == "__pycache__"]
        return junk + ([n for n in names if n in top_level_only] if folder == str(REPO) else [])

    shutil.copytree(REPO, src, ignore=skip)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, src],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-m", "vitexp", "--cfg", "job", "model=patch8", "data=cifar10"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "name: patch8" in proc.stdout and "name: cifar10" in proc.stdout
    located = subprocess.run(
        [sys.executable, "-c", "import vitexp.__main__ as m; print(m.config_dir())"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert located.stdout.strip().startswith(str(target))
    assert list(elsewhere.iterdir()) == []
