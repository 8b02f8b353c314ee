"""Checkpoints: a run killed (SIGKILL) after round 2 of 4 and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedpeft.results import read_metrics
from tests.conftest import REPO

pytestmark = pytest.mark.slow

ARGS = ["+exp=smoke", "num_rounds=4", "clients_per_round=2", "seed=5"]
SAME = ["round", "test_accuracy", "test_loss", "train_loss", "clients_sampled", "clients_replied", "bytes_up", "bytes_down", "cumulative_bytes_up", "cumulative_bytes_down", "residual"]


def fedpeft_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedpeft.run", *ARGS, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def checkpoint_round(run_dir: Path) -> int:
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["round"]
    except Exception:  # being replaced right now
        return 0


def stop_ray_leftovers() -> None:
    ray = Path(sys.executable).with_name("ray")
    if ray.exists():
        subprocess.run([str(ray), "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path):
    # Prepare: the reference run
    reference = tmp_path / "reference"
    assert fedpeft_run(reference).wait(timeout=600) == 0
    # Execute: the same run, killed as soon as round 2 is checkpointed, then resumed
    killed = tmp_path / "killed"
    proc = fedpeft_run(killed)
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
        stop_ray_leftovers()
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
        execute(compose_cfg(["+exp=smoke", "num_rounds=1", "save_adapter=false", "seed=9", f"resume={run}"]), tmp_path / "other")
