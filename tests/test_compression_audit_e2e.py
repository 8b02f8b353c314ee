"""End to end: a real Ray simulation with ComPEFT uploads, error feedback and the privacy audit at the end."""

from __future__ import annotations

import json

import pytest

from fedpeft.run import execute
from tests.fedpeft.test_config import compose_cfg

pytestmark = pytest.mark.slow


def test_compressed_run_with_error_feedback_and_audit(tmp_path):
    # Prepare
    cfg = compose_cfg(
        [
            "num_rounds=2",
            "num_clients=2",
            "clients_per_round=2",
            "client.local_steps=2",
            "data.max_samples=60",
            "model.max_length=32",
            "compression=compeft",
            "compression.density=0.1",
            "compression.error_feedback=true",
            "audit.enabled=true",
            "audit.max_examples=10",
        ]
    )
    # Execute
    rows = execute(cfg, tmp_path)
    # Assert: every update accepted, the uplink a small fraction of the (dense) downlink
    for row in rows:
        assert row["clients_replied"] == 2 and row["clients_rejected"] == 0
        assert 0 < row["bytes_up"] < row["bytes_down"] / 8
        assert 0.0 <= row["test_accuracy"] <= 1.0
    assert len(list((tmp_path / "nodes").rglob("compression-residual.safetensors"))) == 2  # one per node
    # Assert: the audit ran on the final model
    report = json.loads((tmp_path / "audit.json").read_text())
    assert set(report["membership"]["per_client"]) == {"0", "1"}
    assert 0.0 <= report["membership"]["overall"]["auc"] <= 1.0 and report["participation"] == {"0": 2, "1": 2}
