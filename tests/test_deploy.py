"""Flower's deployment engine on 127.0.0.1: a SuperLink and two SuperNodes as real processes,
TLS and SuperNode authentication on, the run submitted with the README's command.

Each node serves its own folder of text files (``data-path``): the data never leaves it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpeft.config import to_config
from fedpeft.deploy import LocalFederation, export_partitions, free_port, wait_for_port
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


# ------------------------------------------------------------------------------ the README's steps
def readme_deploy_steps() -> dict[str, str]:
    """The commands of the README's "Deploying on edge devices" section, by step, as printed there."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Deploying on edge devices", 1)[1].split("\n## ", 1)[0]
    blocks = [b.replace("\\\n", " ").strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]
    inline = re.findall(r"`(python -m fedpeft\.deploy (?:node-key|partitions) [^`]*)`", section)
    steps = {}
    for name, start in [("certs", "python -m fedpeft.deploy certs"), ("superlink", "flower-superlink"), ("register", "flwr supernode register"),
                        ("supernode", "flower-supernode"), ("submit", "python -m fedpeft.run")]:  # fmt: skip
        (steps[name],) = [b for b in blocks if b.startswith(start)]
    (steps["node_key"],) = [c for c in inline if " node-key " in c]
    (steps["partitions"],) = [c for c in inline if " partitions " in c]
    (steps["flwr_config"],) = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    return steps


def test_readme_deploy_steps_run_as_written(tmp_path):
    """Every deploy step of the README, on 127.0.0.1: only addresses, ports and paths are replaced
    (and the submitted run is cut to the tiny test size)."""
    steps = readme_deploy_steps()
    port = free_port()

    def here(text: str, node: int = 0) -> str:
        for old, new in [
            ("203.0.113.10:9443", f"127.0.0.1:{port}"), ("--port 9443", f"--port {port}"), ("0.0.0.0", "127.0.0.1"), ("203.0.113.10", "127.0.0.1"),
            ("/absolute/path/certs/ca.crt", str(tmp_path / "certs" / "ca.crt")), ("--port 9094", f"--port {free_port()}"),
            ("node0", f"node{node}"), ("partition-id=0", f"partition-id={node}"), ("rank=8", f"rank={[8, 2][node]}"),
            ("/data/news", str(tmp_path / "parts" / f"node{node}-data")), ("/var/lib/fedpeft", str(tmp_path / f"state{node}")),
        ]:  # fmt: skip
            text = text.replace(old, new)
        return text

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO), FLWR_HOME=str(tmp_path / "flwr-home"))

    def run(cmd: str) -> str:
        done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    started: list[subprocess.Popen] = []

    def start(name: str, cmd: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "w") as log:
            started.append(subprocess.Popen(["bash", "-c", cmd], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return started[-1]

    try:
        run(here(steps["certs"]))  # 1
        superlink = start("superlink", here(steps["superlink"]))  # 2
        wait_for_port(port, proc=superlink, log_path=tmp_path / "superlink.log")
        (tmp_path / "flwr-home").mkdir(exist_ok=True)  # flower-superlink made it
        (tmp_path / "flwr-home" / "config.toml").write_text(here(steps["flwr_config"]))
        run(here(steps["partitions"]))
        for node in range(2):  # 3 and 4
            run(here(steps["node_key"], node))
            run(here(steps["register"], node))
            start(f"supernode{node}", here(steps["supernode"], node))
        tiny = "num_rounds=2 client.local_steps=2 model.max_length=32 data.max_samples=60 deploy.timeout=500"
        out = run(f"{here(steps['submit'])} {tiny} hydra.run.dir={tmp_path / 'run'}")  # 5
    finally:
        for proc in reversed(started):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients_replied"] == 2 for r in rows)
    assert sorted(c["rank"] for c in rows[-1]["clients"]) == [2, 8]  # the ranks of the nodes' own configs
    assert "done: 2 rounds" in out and "final_model" in out
