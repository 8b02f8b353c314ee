"""Flower's deployment engine on 127.0.0.1: a SuperLink and two SuperNodes as real processes,
TLS and SuperNode authentication on, each node started with ``python -m fedpeft.deploy supernode``
and the run submitted with the command docs/deployment.md gives.

Each node serves its own folder of text files (``data-path``): the data never leaves it. One
federation serves the FLoRA run (with its console followed line by line) and then the run that is
interrupted with Ctrl-C; the run that loses a node has a federation of its own.
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

from fedpeft.config.schema import to_config
from fedpeft.engines.deploy.federation import LocalFederation, free_port, wait_for_port
from fedpeft.engines.deploy.nodes import export_partitions
from fedpeft.engines.deploy.submit import flwr_env
from fedpeft.reporting.metrics import read_metrics
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SMOKE = {"seed": 3, "data": {"max_samples": 150, "partitioner": "iid"}}


def write_node_folders(root: Path, num_nodes: int) -> list[Path]:
    """Each node's share of the smoke data as a ``<label>/<i>.txt`` folder."""
    return export_partitions(to_config({**SMOKE, "num_clients": num_nodes}), root)


def node_configs(root: Path, num_nodes: int = 2) -> list[dict]:
    folders = write_node_folders(root, num_nodes)
    return [
        {"partition-id": k, "data-path": str(folders[k]), "state-dir": str(root / f"state{k}")}
        for k in range(num_nodes)
    ]


def submit(fed: LocalFederation, run_dir: Path, *extra: str) -> subprocess.Popen:
    deploy = fed.config_overrides()
    cmd = [
        sys.executable, "-m", "fedpeft.run", "+exp=smoke", "seed=3", "num_clients=2", "clients_per_round=2", "mode=deploy",
        f"deploy.superlink={deploy['superlink']}", f"deploy.root_certificates={deploy['root_certificates']}", "deploy.timeout=500",
        f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip

    def restore() -> None:
        """SIGINT as a terminal's Ctrl-C delivers it (a background job may inherit it ignored)."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=restore
    )


def read_until(proc: subprocess.Popen, needle: str, lines: list[str], *, timeout: float = 400) -> str:
    """Console lines as they come, until one holds ``needle`` (returned)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return line
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s:\n{''.join(lines[-30:])}"
    raise AssertionError(f"the console ended without {needle!r}:\n{''.join(lines[-30:])}")


def finish(proc: subprocess.Popen, lines: list[str], timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    with LocalFederation(root / "fed", node_configs(root)) as fed:
        yield fed, root


def test_two_supernodes_with_tls_and_auth_run_flora_and_the_console_follows_the_rounds(federation):
    """A deployed FLoRA run with ComPEFT uploads (error feedback on the nodes' disks) and the
    privacy audit at the end."""
    fed, root = federation
    run_dir = root / "run"
    compressed = [
        "compression=compeft",
        "compression.density=0.2",
        "compression.error_feedback=true",
        "audit.enabled=true",
        "audit.max_examples=10",
    ]
    proc = submit(fed, run_dir, "strategy=flora", "strategy.ranks=[4,2]", *compressed)
    lines: list[str] = []
    # The console reports each round while the run is still going (not only at the end)
    read_until(proc, "2 nodes connected", lines)
    assert proc.poll() is None and not (run_dir / "deploy-done.json").exists()
    first = read_until(proc, "round 1/2", lines)
    assert proc.poll() is None and len(read_metrics(run_dir)) == 1
    out = finish(proc, lines)
    # Assert: the console, as a simulated run's
    assert "(strategy=flora), 2 rounds" in out and f"run dir {run_dir}" in out
    table = out[out.index("2 nodes connected") :].splitlines()[1:4]
    assert table[0].split()[:6] == ["node", "partition", "rank", "tier", "examples", "labels"]
    assert [row.split()[1:4] for row in table[1:]] == [["0", "4", "-"], ["1", "2", "-"]]  # partition, rank, tier
    assert all(row.split()[5] == "5/5" for row in table[1:])  # the IID split shows each node every label
    assert "clients 2/2" in first and "acc" in first and "ETA" in first and "MB" in first
    assert "round 2/2" in out and "done: 2 rounds in" in out and "final accuracy" in out
    nodes = json.loads((run_dir / "nodes.json").read_text())["nodes"]
    assert "2 nodes connected" in (run_dir / "run.log").read_text() and sorted(n["rank"] for n in nodes) == [2, 4]
    # Assert: the deployment itself
    superlink_log = (root / "fed" / "superlink.log").read_text()
    assert (
        "SuperNode authentication is disabled" not in superlink_log
        and superlink_log.count("RegisterNode] Created node_id") == 2
    )
    assert "insecure" not in (root / "fed" / "flwr-home" / "config.toml").read_text()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_replied"] == 2 and r["clients_failed"] == 0 and r["unreachable"] == [] for r in rows)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert sorted(c["rank"] for c in rows[-1]["clients"]) == [2, 4]
    assert (run_dir / "final_model" / "config.json").exists() and (run_dir / "plots" / "accuracy_loss.png").exists()
    # ComPEFT: every upload accepted and far below its dense size (A and B of query/value in 6
    # layers at the node's rank, 4 bytes each)
    assert all(r["clients_rejected"] == 0 for r in rows)
    for c in (c for r in rows for c in r["clients"]):
        assert 0 < c["bytes_up"] < c["rank"] * (384 + 384) * 12 * 4 / 8
    # The audit of the final model, reported on the console and written next to it
    audit = json.loads((run_dir / "audit.json").read_text())
    assert set(audit["membership"]["per_client"]) == {"0", "1"} and 0.0 <= audit["membership"]["overall"]["auc"] <= 1.0
    assert "privacy audit" in out
    # Node state on the nodes' disks: FLoRA's merged base after round 1, the encoded-data cache
    for k in range(2):
        store = root / f"state{k}" / f"node-{k}"
        assert list(store.glob("*/merged-base.safetensors")), sorted(p.name for p in store.rglob("*"))
        assert list((store / "cache").glob("data-*.pt"))
        assert list(
            store.rglob("compression-residual.safetensors")
        )  # error feedback: what ComPEFT dropped, kept by the node


def test_ctrl_c_on_the_submitting_console_stops_the_run_on_the_superlink(federation):
    fed, root = federation
    run_dir = root / "run-interrupted"
    proc = submit(fed, run_dir, "num_rounds=6", "save_adapter=false")
    lines: list[str] = []
    read_until(proc, "round 1/6", lines)
    # Execute: Ctrl-C
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = "".join(lines) + out
    # Assert: the command ends with 130, says which run it stopped and how to continue; the SuperLink agrees
    assert proc.returncode == 130, out[-3000:]
    stopped = re.findall(r"the deployed run (\d+) was stopped on the SuperLink", out)
    assert stopped and "stopped by Ctrl-C" in out and f"resume={run_dir}" in out, out[-2000:]
    run_id = int(stopped[0])
    ls = subprocess.run(
        [str(Path(sys.executable).with_name("flwr")), "ls", "--run-id", str(run_id), "--format", "json"],
        env=flwr_env(root / "fed" / "flwr-home"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert '"finished:stopped"' in ls.stdout, ls.stdout + ls.stderr
    assert len(read_metrics(run_dir)) < 6


def test_run_finishes_when_a_supernode_dies(tmp_path):
    with LocalFederation(tmp_path / "fed", node_configs(tmp_path)) as fed:
        run_dir = tmp_path / "run"
        proc = submit(fed, run_dir, "num_rounds=3", "min_clients=1", "round_timeout=45", "save_adapter=false")
        lines: list[str] = []
        read_until(proc, "round 1/3", lines)
        fed.kill("supernode1")
        out = finish(proc, lines)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["clients_replied"] == 2 and rows[0]["unreachable"] == []
    later = rows[1:]
    assert all(r["clients_replied"] == 1 for r in later)
    assert all(r["clients_failed"] + r["clients_replied"] == r["clients_sampled"] for r in later)
    assert sum(r["clients_failed"] for r in later) >= 1 and all(f["reason"] for r in later for f in r["failures"])
    dead = {f["node"] for r in later for f in r["failures"]}
    assert len(dead) == 1 and all(
        len(r["failures"]) == r["clients_failed"] <= 1 for r in later
    )  # the dead node, once a round
    # The dead node is recorded as unreachable, by node and partition, in every round it failed
    assert all(r["unreachable"] == [{"node": f["node"], "partition": 1} for f in r["failures"]] for r in later)
    assert "(1 failed)" in out and rows[-1]["test_accuracy"] is not None


# ------------------------------------------------------------------------------ the documented steps
def documented_deploy_steps() -> dict[str, str]:
    """The commands of docs/deployment.md's "Step by step" section, by step, as printed there."""
    page = (REPO / "docs" / "deployment.md").read_text()
    section = page.split("## Step by step", 1)[1].split("\n## ", 1)[0]
    blocks = [b.replace("\\\n", " ").strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]
    inline = re.findall(r"`(python -m fedpeft\.deploy (?:node-key|partitions) [^`]*)`", section)
    steps = {}
    for name, start in [("certs", "python -m fedpeft.deploy certs"), ("superlink", "flower-superlink"), ("register", "flwr supernode register"),
                        ("supernode", "python -m fedpeft.deploy supernode"), ("submit", "python -m fedpeft.run")]:  # fmt: skip
        (steps[name],) = [b for b in blocks if start in b.splitlines()[-1]]  # a block's last line is its command
    (steps["node_key"],) = [c for c in inline if " node-key " in c]
    (steps["partitions"],) = [c for c in inline if " partitions " in c]
    (steps["flwr_config"],) = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    return steps


def test_documented_deploy_steps_run_as_written(tmp_path):
    """Every deploy step of docs/deployment.md, on 127.0.0.1: only addresses, ports and paths are
    replaced (and the submitted run is cut to the tiny test size)."""
    steps = documented_deploy_steps()
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

    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        FLWR_HOME=str(tmp_path / "flwr-home"),
    )

    def run(cmd: str) -> str:
        done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    started: list[subprocess.Popen] = []

    def start(name: str, cmd: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "w") as log:
            started.append(
                subprocess.Popen(
                    ["bash", "-c", cmd],
                    cwd=tmp_path,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
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
