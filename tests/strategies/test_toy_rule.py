"""A rule written entirely in this file — a strategy subclass and its config — runs end to end.

The proof that adding a rule needs no edit outside its own file: the client follows the plans,
the config schema takes the rule's options from its dataclass, and the registry is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from fedpeft.cli.configs import compose_config
from fedpeft.config.schema import StrategyConfig
from fedpeft.protocol.records import State
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, GroupPlan, Source
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo


@dataclass
class PersonalHeadConfig(StrategyConfig):
    name: str = "personal_head"
    damping: float = field(default=1.0, metadata={"help": "Server step toward the clients' average (1: plain FedAvg)."})


class PersonalHead(LoRAStrategy):
    """A toy rule: LoRA factors averaged with a damped server step; each client's head is its own
    (kept on its node, never uploaded; a client's first round starts from the global head)."""

    name = "personal_head"
    config_class = PersonalHeadConfig

    def __init__(self, initial_adapter: State, *, damping: float = 1.0, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        self.damping = damping

    def groups(self, node: NodeInfo, server_round: int) -> tuple[GroupPlan, ...]:
        return (
            GroupPlan(roles={LORA_A, LORA_B}, source=Source.MESSAGE),
            GroupPlan(roles={OTHER}, source=Source.NODE, fallback=Source.MESSAGE, keep=True, upload=False),
        )

    def evaluation_plan(self, node: NodeInfo, server_round: int):
        return self.personal_evaluation(
            node, server_round, personal=frozenset({OTHER}), fallback=Source.MESSAGE
        )  # each client's own head

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        for key in updates[0].state:
            average = weighted_sum([u.state[key] for u in updates], weights)
            self.adapter[key] = self.adapter[key] + self.damping * (average - self.adapter[key])
        return {}

    @classmethod
    def from_config(cls, cfg: Any, initial_adapter: State) -> PersonalHead:
        return cls(
            initial_adapter,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            min_clients=cfg.min_clients,
            damping=cfg.strategy.damping,
        )


TINY = [
    "num_rounds=2",
    "num_clients=2",
    "clients_per_round=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=32",
]


def test_the_rules_options_come_from_its_own_dataclass(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "personal_head", PersonalHead)
    cfg = compose_config(["strategy=personal_head_schema", "strategy.damping=0.5"])
    assert isinstance(cfg.strategy, PersonalHeadConfig) and cfg.strategy.damping == 0.5
    with pytest.raises(Exception, match="damping"):
        compose_config(["strategy=fedavg", "strategy.damping=0.5"])


@pytest.mark.slow
def test_a_rule_defined_in_a_test_file_runs_end_to_end(tmp_path, monkeypatch):
    from fedpeft.run import execute

    # Prepare
    monkeypatch.setitem(STRATEGIES, "personal_head", PersonalHead)
    cfg = compose_config(["+exp=smoke", "strategy=personal_head_schema", "strategy.damping=0.5", *TINY])
    # Execute
    rows = execute(cfg, tmp_path)
    # Assert: every reply accepted; heads stayed on the nodes (the uplink is the LoRA factors only)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients_replied"] == 2 and row["clients_rejected"] == 0 and row["clients_failed"] == 0
        assert row["bytes_up"] < row["bytes_down"]
    # the evaluation hook: every node evaluated its personal model; metrics.jsonl summarises them
    for row in rows:
        assert row["client_val_accuracy_source"] == "evaluate" and len(row["evaluations"]) == 2
        accs = [e["val_accuracy"] for e in row["evaluations"]]
        assert row["client_val_accuracy_min"] == min(accs) and row["client_val_accuracy_max"] == max(accs)
        assert all(e["evaluated"] == 2 for e in row["evaluations"])
    kept = sorted(tmp_path.glob("nodes/node-*/*/kept.safetensors"))
    assert len(kept) == 2
    from safetensors.torch import load_file

    heads = [load_file(str(p)) for p in kept]
    assert set(heads[0]) == set(heads[1]) and all(".lora_" not in k for k in heads[0])
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # each node's own head
