"""FedIT and FLoRA on the tiny Llama over the in-process grid (the real client steps, no Ray): the
saved adapter (FedIT) or merged model (FLoRA) reproduces the reported metrics in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedpeft.cli.configs import compose_config
from fedpeft.server.loop import run_federated
from tests.conftest import REPO
from tests.fakegrid import InProcessGrid

pytestmark = pytest.mark.slow

TINY = [
    "+exp=llm_tiny",
    "num_rounds=2",
    "num_clients=2",
    "clients_per_round=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=32",
]


@pytest.mark.parametrize("rule, artifact", [("fedavg", "final_adapter"), ("flora", "final_model")])
def test_tiny_llama_rule_saves_what_reproduces_the_reported_metrics(rule, artifact, tmp_path, monkeypatch):
    from fedpeft.clients.app import app

    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    cfg = compose_config([*TINY, f"strategy={rule}"])
    grid = InProcessGrid(app, [{"partition-id": k} for k in range(cfg.num_clients)])
    rows = run_federated(cfg, grid, tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text(
        __import__("omegaconf").OmegaConf.to_yaml(__import__("omegaconf").OmegaConf.structured(cfg))
    )
    last = rows[-1]
    assert last["clients_replied"] == 2 and last["response_loss"] > 0 and 0 <= last["mc_accuracy"] <= 1
    assert last["aggregation_seconds"] >= 0
    assert (tmp_path / "run" / artifact).is_dir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDPEFT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "fedpeft.generate", str(tmp_path / "run"), "--evaluate"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["response_loss"] == pytest.approx(last["response_loss"], rel=1e-5)
    assert again["mc_accuracy"] == pytest.approx(last["mc_accuracy"], abs=1e-9)


def test_canaries_planted_in_instruction_data_are_trained_on_and_audited(tmp_path, monkeypatch):
    """audit.canaries on the tiny Llama's instruction data: client 0 trains on the planted
    instructions, and the audit ranks each secret's response likelihood among the candidates."""
    from fedpeft.audit import run_audit
    from fedpeft.clients.app import app
    from fedpeft.reporting.metrics import read_metrics

    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    cfg = compose_config(
        [*TINY, "audit.canaries=2", "audit.canary_repeats=4", "audit.candidates=30", "audit.max_examples=8"]
    )
    grid = InProcessGrid(app, [{"partition-id": k} for k in range(cfg.num_clients)])
    run_federated(cfg, grid, tmp_path / "run")
    sizes = {c["partition"]: c["num_examples"] for c in read_metrics(tmp_path / "run")[0]["clients"]}
    from fedpeft.data.partition import prepare

    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=False)
    assert sizes == {
        0: len(data.client_split(0)[0]) + 8,
        1: len(data.client_split(1)[0]),
    }  # 2 canaries x 4, in client 0 only
    report = run_audit(tmp_path / "run", cfg=cfg)
    canaries = report["canaries"]
    assert canaries["count"] == 2 and canaries["repeats"] == 4 and all(1 <= r <= 31 for r in canaries["rank"])
    assert canaries["max_exposure"] == pytest.approx(__import__("math").log2(31))
    assert report["membership"]["overall"]["members"] == 16 and 0 <= report["membership"]["overall"]["auc"] <= 1
