"""End to end: a real Ray simulation of 3 clients x 2 rounds on a small cut of the embedded data."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.config import to_config
from fedpeft.run import execute
from tests.fedpeft.test_config import compose_cfg

pytestmark = pytest.mark.slow


def reload_and_evaluate(cfg, run_dir):
    """Plain peft: ``PeftModel.from_pretrained(base, final_adapter)`` evaluated on the test split."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedpeft import data as fdata
    from fedpeft.models import resolve_model_path
    from fedpeft.training import evaluate

    path = resolve_model_path(cfg.model.name_or_path)
    data = fdata.prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.num_labels)
    model = PeftModel.from_pretrained(base, str(run_dir / "final_adapter"))
    tok = AutoTokenizer.from_pretrained(path)
    examples = fdata.encode(data.test, tok, max_length=cfg.model.max_length, task=cfg.model.task)
    return evaluate(model, fdata.make_loader(examples, pad_token_id=tok.pad_token_id, batch_size=64, shuffle=False))


def test_simulation_runs_loads_base_once_per_worker_and_saves_a_loadable_adapter(tmp_path):
    # Prepare
    cfg = compose_cfg(["+exp=smoke"])
    # Execute
    rows = execute(cfg, tmp_path)
    # Assert: metrics on disk
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == rows and [r["round"] for r in rows] == [1, 2]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["round", "test_accuracy", "test_loss", "train_loss"]
    assert to_config(__import__("omegaconf").OmegaConf.load(tmp_path / "config.yaml")) == cfg
    for row in rows:
        assert row["clients_sampled"] == row["clients_replied"] == 3
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["test_loss"] > 0
        assert row["bytes_up"] == row["bytes_down"] > 0  # FedIT: the same adapter both ways
        assert row["wall_seconds"] > 0 and row["train_loss"] > 0
        assert row["residual"] is not None and row["residual"] >= 0
        for client in row["clients"]:
            assert client["base_loads"] == 1  # the worker loaded the base once, whatever it ran before
            assert client["num_examples"] > 0 and "val_accuracy" in client
    assert rows[1]["cumulative_bytes_up"] == 2 * rows[0]["bytes_up"]
    pids = {c["worker_pid"] for r in rows for c in r["clients"]}
    assert len(pids) < 6  # workers are reused across clients and rounds
    # Assert: plain peft reloads the adapter and reproduces the reported accuracy
    reloaded = reload_and_evaluate(cfg, tmp_path)
    assert reloaded.accuracy == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    assert reloaded.loss == pytest.approx(rows[-1]["test_loss"], rel=1e-4)


def test_centralized_reference_runs(tmp_path):
    cfg = compose_cfg(["+exp=smoke", "mode=centralized", "num_rounds=1"])
    rows = execute(cfg, tmp_path)
    assert len(rows) == 1 and rows[0]["test_accuracy"] is not None
    assert (tmp_path / "final_adapter" / "adapter_config.json").exists()
    assert torch.isfinite(torch.tensor(rows[0]["test_loss"]))
