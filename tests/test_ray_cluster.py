"""``ray.address``: a simulation runs its clients on a running Ray cluster instead of a private one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedpeft.engines.ray import check_ray_address
from fedpeft.run import execute
from tests.fedpeft.test_config import compose_cfg
from tests.test_resume import kill_leftovers

TINY = [
    "num_rounds=2",
    "num_clients=2",
    "clients_per_round=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=32",
    "data.partitioner=iid",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.usefixtures("worker_counters")
def test_simulation_runs_on_a_running_cluster(tmp_path):
    # Prepare: a single-node cluster of our own (its own temp dir, so its processes can be told apart)
    port = free_port()
    ray_dir = Path(tempfile.mkdtemp(prefix="fpc", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    ray_cli = Path(sys.executable).with_name("ray")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    start = [
        str(ray_cli),
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={ray_dir}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
        cfg = compose_cfg([*TINY, f"ray.address=127.0.0.1:{port}"])
        # Execute
        rows = execute(cfg, tmp_path / "run")
        # Assert: both rounds ran, and every client ran in a worker of that cluster (its log names the pid)
        assert [r["round"] for r in rows] == [1, 2] and all(r["clients_replied"] == 2 for r in rows)
        logs = " ".join(p.name for p in ray_dir.glob("session_*/logs/worker-*.out"))
        pids = {c["worker_pid"] for r in rows for c in r["clients"]}
        assert pids and all(f"-{pid}.out" in logs for pid in pids), (pids, logs[:500])
        # The cluster outlives the run (the driver only disconnected)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        kill_leftovers(str(ray_dir))  # only this cluster's processes; never `ray stop`
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_unreachable_address_fails_fast():
    with pytest.raises(ValueError, match="no Ray cluster answers there"):
        check_ray_address(f"127.0.0.1:{free_port()}", timeout=1.0)
