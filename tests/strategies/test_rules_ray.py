"""The one real Ray simulation of the six newer rules: FedSA-LoRA, whose B lives in each node's state."""

from __future__ import annotations

import pytest
import torch

from fedpeft.cli.configs import compose_config
from fedpeft.clients.state import NodeStore
from fedpeft.run import execute

pytestmark = pytest.mark.slow


def test_fedsa_lora_on_ray_keeps_b_on_the_nodes_and_reports_personal_accuracy(tmp_path):
    # Prepare: heterogeneous ranks, tiny cut (the brief's size for a Ray run)
    cfg = compose_config(
        [
            "+exp=smoke",
            "strategy=fedsa_lora",
            "strategy.ranks=[4,2,1]",
            "model.lora.r=4",
            "num_rounds=2",
            "clients_per_round=2",
            "data.max_samples=60",
            "save_adapter=false",
        ]
    )
    # Execute
    rows = execute(cfg, tmp_path)
    # Assert: every round aggregated, uplink is A only (half of the LoRA factors, no head)
    assert [r["clients_replied"] for r in rows] == [2, 2] and not any(r["clients_rejected"] for r in rows)
    for row in rows:
        assert 0.0 <= row["personal_accuracy"] <= 1.0 and row["personal_accuracy_spread"] >= 0.0
        for client in row["clients"]:
            assert client["bytes_up"] < client["bytes_down"]  # A up; A and the head (for a new node) down
    # each node that trained keeps its own B, at its own rank, in its state folder
    lineage = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)["lineage"]
    trained = {c["partition"] for r in rows for c in r["clients"]}
    for partition in trained:
        kept = NodeStore(tmp_path / "nodes" / f"node-{partition}").load_kept(lineage)
        b = [v for k, v in kept.items() if k.endswith(".lora_B.weight")]
        assert b and all(t.shape[1] == [4, 2, 1][partition] and torch.count_nonzero(t) > 0 for t in b)
