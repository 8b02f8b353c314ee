"""A regular (non-editable) install runs: the wheel holds the rules, the client and the YAML under the
one import name ``fedpeft``, and ``python -m fedpeft.run +exp=flora_hetero`` runs from it outside the
checkout. The wheel's dependencies are the test venv's own (installed with ``--no-deps`` into a folder
put first on ``PYTHONPATH``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy of the source tree: setuptools' build/ folder in a checkout may hold modules
    # that no longer exist, and would put them in the wheel
    source, out = tmp_path_factory.mktemp("source") / "fedpeft", tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "experiments", "runs", "outputs", "site"
    )
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("fedpeft-*.whl")
    return path


def test_the_wheel_installs_one_import_name_with_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"fedpeft"}  # no generic top-level `clients` or `strategies`
    for member in (
        "fedpeft/strategies/flora.py",
        "fedpeft/clients/app.py",
        "fedpeft/conf/config.yaml",
        "fedpeft/conf/exp/flora_hetero.yaml",
        "fedpeft/py.typed",
    ):
        assert member in names, member


def test_the_main_command_runs_from_the_installed_wheel_outside_the_checkout(wheel, tmp_path):
    target, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import fedpeft; print(fedpeft.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(target)  # not the checkout
    run_dir = tmp_path / "run"
    overrides = [
        "num_rounds=1",
        "data.max_samples=150",
        "model.max_length=32",
        "client.local_steps=1",
        "save_adapter=false",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.run", "+exp=flora_hetero", *overrides],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows][-1] == 1
    assert (run_dir / "config.yaml").read_text().count("name: flora") == 1
