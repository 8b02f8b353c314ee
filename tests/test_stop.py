"""Stopping a real run: the first Ctrl-C, and a fatal error inside Flower/Ray, end it at once.

Each test starts ``python -m fedpeft.run`` as its own process (its own session, so the signal
reaches that run only) with a marker in its environment, which every process it starts (Ray's
GCS, raylet, workers) inherits: what is left after the run is found by that marker, never by name,
so the Ray clusters of other runs on the machine are neither counted nor touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedpeft.cli.resume import checkpoint_round
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY = [
    "+exp=smoke",
    "num_clients=2",
    "clients_per_round=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=32",
    "save_adapter=false",
]
MARKER = "FEDPEFT_TEST_RUN"


def start(run_dir: Path, args: list[str], *, code: str | None = None) -> tuple[subprocess.Popen, str]:
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER: marker})
    argv = [*args, f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "fedpeft.run", *argv] if code is None else [sys.executable, "-c", code, *argv]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    return proc, marker


def started_by(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (the run and everything it started)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def leftovers(marker: str, *, grace: float = 15.0) -> list[int]:
    """The marked processes still alive after ``grace`` seconds (killed ones take a moment to be reaped)."""
    deadline = time.monotonic() + grace
    while (alive := started_by(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def finish(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the bug this guards against: a run that never ends
        for pid in started_by(marker):
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s:\n{out[-3000:]}")
    return out


def test_first_ctrl_c_stops_the_run_keeps_the_checkpoint_and_leaves_no_ray_process(tmp_path):
    run_dir = tmp_path / "run"
    proc, marker = start(run_dir, [*TINY, "num_rounds=4"])
    try:
        deadline = time.monotonic() + 600
        while checkpoint_round(run_dir) < 1:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        done = checkpoint_round(run_dir)
        assert done < 4
        os.kill(proc.pid, signal.SIGINT)  # one Ctrl-C
        out = finish(proc, marker, timeout=120)
    finally:
        for pid in started_by(marker):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    kept = checkpoint_round(run_dir)
    assert 1 <= kept < 4
    assert "stopped by Ctrl-C" in out
    # The console holds fedpeft's lines only (header, rounds, the stop): no Flower, Ray or worker output
    lines = out.splitlines()
    header, rest = (
        lines[:8],
        lines[next(i for i, line in enumerate(lines) if line.startswith("round ")) :],
    )  # between: partition and node tables
    assert header[0].startswith("fedpeft: FedIT (strategy=fedavg)") and all(
        line.startswith("  ") for line in header[1:]
    ), out
    assert all(line.startswith(("round ", "stopped by Ctrl-C")) for line in rest), out
    assert (
        f"round {kept} is the last complete one (checkpointed in {run_dir}); continue with: python -m fedpeft.run +exp=smoke"
        in out
    )
    assert out.rstrip().endswith(f"resume={run_dir}")
    assert leftovers(marker) == []


# fedpeft refuses client.num_cpus above the machine's cores before Ray starts; with that check
# switched off, Ray gets a client it cannot place and Flower fails with "ActorPool is empty".
WITHOUT_RESOURCE_CHECK = "import runpy, fedpeft.cli.checks as c; c.check_resources = lambda cfg: None; runpy.run_module('fedpeft.run', run_name='__main__', alter_sys=True)"


def test_a_fatal_error_inside_flower_or_ray_ends_the_run_with_its_reason(tmp_path):
    run_dir = tmp_path / "run"
    proc, marker = start(run_dir, [*TINY, "num_rounds=2", "client.num_cpus=64"], code=WITHOUT_RESOURCE_CHECK)
    try:
        out = finish(proc, marker, timeout=300)
    finally:
        for pid in started_by(marker):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-3000:]
    assert "error: Flower's simulation engine failed: ValueError: ActorPool is empty" in out, out[-3000:]
    assert "Traceback" not in out
    assert f"no round finished, so there is nothing to resume (the config and run.log are in {run_dir})" in out
    assert "resume=" not in out
    assert "ActorPool is empty" in (run_dir / "run.log").read_text()  # Flower's own report, with its traceback
    assert leftovers(marker) == []
