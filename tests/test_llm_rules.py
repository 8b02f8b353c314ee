"""FedIT and FLoRA on the tiny Llama over the in-process grid (the real client steps, no Ray): the
saved adapter (FedIT) or merged model (FLoRA) reproduces the reported metrics in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedpeft.config import compose_config
from fedpeft.server import run_federated
from tests.conftest import REPO
from tests.fakegrid import InProcessGrid

pytestmark = pytest.mark.slow

TINY = ["+exp=llm_tiny", "num_rounds=2", "num_clients=2", "clients_per_round=2", "client.local_steps=2", "data.max_samples=60", "model.max_length=32"]


@pytest.mark.parametrize("rule, artifact", [("fedavg", "final_adapter"), ("flora", "final_model")])
def test_tiny_llama_rule_saves_what_reproduces_the_reported_metrics(rule, artifact, tmp_path, monkeypatch):
    from clients.app import app

    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    cfg = compose_config([*TINY, f"strategy={rule}"])
    grid = InProcessGrid(app, [{"partition-id": k} for k in range(cfg.num_clients)])
    rows = run_federated(cfg, grid, tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(__import__("omegaconf").OmegaConf.structured(cfg)))
    last = rows[-1]
    assert last["clients_replied"] == 2 and last["response_loss"] > 0 and 0 <= last["mc_accuracy"] <= 1
    assert last["aggregation_seconds"] >= 0
    assert (tmp_path / "run" / artifact).is_dir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDPEFT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "fedpeft.generate", str(tmp_path / "run"), "--evaluate"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["response_loss"] == pytest.approx(last["response_loss"], rel=1e-5)
    assert again["mc_accuracy"] == pytest.approx(last["mc_accuracy"], abs=1e-9)
