"""Flower's deployment engine on 127.0.0.1: a SuperLink and two SuperNodes as real processes,
TLS and SuperNode authentication on, the run submitted with the README's command.

Each node serves its own folder of text files (``data-path``): the data never leaves it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpeft.config import to_config
from fedpeft.deploy import LocalFederation, export_partitions
from fedpeft.results import read_metrics
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SMOKE = {"seed": 3, "data": {"max_samples": 150, "partitioner": "iid"}}


def write_node_folders(root: Path, num_nodes: int) -> list[Path]:
    """Each node's share of the smoke data as a ``<label>/<i>.txt`` folder."""
    return export_partitions(to_config({**SMOKE, "num_clients": num_nodes}), root)


def submit(fed: LocalFederation, run_dir: Path, *extra: str) -> subprocess.Popen:
    deploy = fed.config_overrides()
    cmd = [
        sys.executable, "-m", "fedpeft.run", "+exp=smoke", "seed=3", "num_clients=2", "clients_per_round=2", "mode=deploy",
        f"deploy.superlink={deploy['superlink']}", f"deploy.root_certificates={deploy['root_certificates']}", "deploy.timeout=500",
        f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_supernodes_with_tls_and_auth_run_flora(tmp_path):
    folders = write_node_folders(tmp_path, 2)
    nodes = [{"partition-id": k, "data-path": str(folders[k]), "state-dir": str(tmp_path / f"state{k}")} for k in range(2)]
    with LocalFederation(tmp_path / "fed", nodes) as fed:
        run_dir = tmp_path / "run"
        finish(submit(fed, run_dir, "strategy=flora", "strategy.ranks=[4,2]"))
    superlink_log = (tmp_path / "fed" / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in superlink_log and superlink_log.count("RegisterNode] Created node_id") == 2
    assert "insecure" not in (tmp_path / "fed" / "flwr-home" / "config.toml").read_text()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_replied"] == 2 and r["clients_failed"] == 0 for r in rows)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert sorted(c["rank"] for c in rows[-1]["clients"]) == [2, 4]
    assert (run_dir / "final_model" / "config.json").exists()
    # Node state on the nodes' disks: FLoRA's merged base after round 1, the encoded-data cache
    for k in range(2):
        store = tmp_path / f"state{k}" / f"node-{k}"
        assert list(store.glob("*/merged-base.safetensors")), sorted(p.name for p in store.rglob("*"))
        assert list((store / "cache").glob("data-*.pt"))


def test_run_finishes_when_a_supernode_dies(tmp_path):
    folders = write_node_folders(tmp_path, 2)
    nodes = [{"partition-id": k, "data-path": str(folders[k]), "state-dir": str(tmp_path / f"state{k}")} for k in range(2)]
    with LocalFederation(tmp_path / "fed", nodes) as fed:
        run_dir = tmp_path / "run"
        proc = submit(fed, run_dir, "num_rounds=3", "min_clients=1", "round_timeout=45", "save_adapter=false")
        deadline = time.monotonic() + 400
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
        fed.kill("supernode1")
        finish(proc)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["clients_replied"] == 2
    later = rows[1:]
    assert all(r["clients_replied"] == 1 for r in later)
    assert all(r["clients_failed"] + r["clients_replied"] == r["clients_sampled"] for r in later)
    assert sum(r["clients_failed"] for r in later) >= 1 and all(f["reason"] for r in later for f in r["failures"])
    dead = {f["node"] for r in later for f in r["failures"]}
    assert len(dead) == 1 and all(len(r["failures"]) == r["clients_failed"] <= 1 for r in later)  # the dead node, once a round
    assert rows[-1]["test_accuracy"] is not None
