"""Checkpoints: a run killed (SIGKILL) after round 2 of 4 and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedpeft.reporting.metrics import read_metrics
from tests.conftest import REPO

pytestmark = pytest.mark.slow

ARGS = ["+exp=smoke", "num_rounds=4", "clients_per_round=2", "seed=5"]
SAME = [
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "clients_sampled",
    "clients_replied",
    "bytes_up",
    "bytes_down",
    "cumulative_bytes_up",
    "cumulative_bytes_down",
    "residual",
]


def fedpeft_run(run_dir: Path, *extra: str, ray_dir: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedpeft.run", *ARGS, f"hydra.run.dir={run_dir}", *extra]
    env = dict(os.environ, RAY_TMPDIR=str(ray_dir)) if ray_dir else None  # so its Ray processes can be found
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def checkpoint_round(run_dir: Path) -> int:
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["round"]
    except Exception:  # being replaced right now
        return 0


def kill_leftovers(marker: str) -> None:
    """SIGKILL the processes of the killed run's own Ray cluster (their command lines name its temp dir).

    Never ``ray stop``: that would also stop every other Ray cluster on the machine.
    """
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path):
    # Prepare: the reference run
    reference = tmp_path / "reference"
    assert fedpeft_run(reference).wait(timeout=600) == 0
    # Execute: the same run, killed as soon as round 2 is checkpointed, then resumed
    killed = tmp_path / "killed"
    ray_dir = Path(tempfile.mkdtemp(prefix="fpr", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    proc = fedpeft_run(killed, ray_dir=ray_dir)
    try:
        deadline = time.monotonic() + 600
        while checkpoint_round(killed) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_leftovers(str(ray_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)
    interrupted_round = checkpoint_round(killed)
    assert 2 <= interrupted_round < 4 and not (killed / "final_adapter").exists()
    assert fedpeft_run(tmp_path / "unused", f"resume={killed}").wait(timeout=600) == 0
    # Assert: same metrics, same final adapter, bit for bit
    want, got = read_metrics(reference), read_metrics(killed)
    assert [[r[k] for k in SAME] for r in got] == [[r[k] for k in SAME] for r in want]
    from safetensors.torch import load_file

    a = load_file(reference / "final_adapter" / "adapter_model.safetensors")
    b = load_file(killed / "final_adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)


def test_resume_refuses_a_different_config(tmp_path):
    from fedpeft.run import execute
    from tests.fedpeft.test_config import compose_cfg

    run = tmp_path / "run"
    execute(compose_cfg(["+exp=smoke", "num_rounds=1", "save_adapter=false"]), run)
    with pytest.raises(Exception, match=r"differs from the checkpoint's in \['seed'\]"):
        execute(
            compose_cfg(["+exp=smoke", "num_rounds=1", "save_adapter=false", "seed=9", f"resume={run}"]),
            tmp_path / "other",
        )
