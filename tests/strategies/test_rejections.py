"""Malformed updates are rejected before aggregation by the real strategy code of every rule."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.protocol.records import resize_rank, to_record
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.types import NodeInfo
from tests.strategies import draw

NODE = NodeInfo(node_id=7, partition_id=0, rank=2, num_examples=12)


def adapter(rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "m.q.lora_A.weight": torch.randn(rank, 6, generator=g),
        "m.q.lora_B.weight": torch.randn(5, rank, generator=g),
        "m.head.weight": torch.randn(3, 6, generator=g),
    }


def strategy_for(rule: str):
    """The rule on a rank-4 global adapter with a rank-2 node; a rule that refuses mixed ranks gets rank 2."""
    strategy = STRATEGIES[rule](adapter(), clients_per_round=1, seed=0)
    try:
        strategy.register_nodes([NODE])
    except ValueError:  # fedex_lora: one rank for every client
        strategy = STRATEGIES[rule](adapter(NODE.rank), clients_per_round=1, seed=0)
        strategy.register_nodes([NODE])
    return strategy


def good_state(strategy) -> dict[str, torch.Tensor]:
    state = resize_rank(strategy.adapter, NODE.rank)
    return {k: v + 0.5 for k, v in state.items() if k in draw.upload_keys_at(strategy, NODE.rank)}


def corrupt(kind: str, state: dict, metrics: dict) -> None:
    key = next(k for k in sorted(state) if k.endswith((".lora_A.weight", ".lora_B.weight")))  # an uploaded factor
    if kind == "missing key":
        del state[key]
    elif kind == "extra key":
        state["m.k.lora_A.weight"] = torch.zeros(2, 6)
    elif kind == "wrong shape":
        state[key] = torch.zeros(*(d + 1 for d in state[key].shape))
    elif kind == "wrong dtype":
        state[key] = state[key].double()
    elif kind == "nan":
        state[key][0, 0] = float("nan")
    elif kind == "inf":
        state[key][0, 0] = float("inf")
    elif kind == "rank other than assigned":
        metrics["rank"] = 4
    elif kind == "zero num-examples":
        metrics["num-examples"] = 0
    elif kind == "negative num-examples":
        metrics["num-examples"] = -3
    elif kind == "implausible num-examples":
        metrics["num-examples"] = 10**9
    elif kind == "non-finite metric":
        metrics["train-loss"] = float("nan")


KINDS = [
    "missing key",
    "extra key",
    "wrong shape",
    "wrong dtype",
    "nan",
    "inf",
    "rank other than assigned",
    "zero num-examples",
    "negative num-examples",
    "implausible num-examples",
    "non-finite metric",
]


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
@pytest.mark.parametrize("kind", KINDS)
def test_malformed_update_is_rejected_and_never_touches_the_global_model(rule, kind):
    # Prepare
    strategy = strategy_for(rule)
    msg = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid=None))[0]
    before = {k: v.clone() for k, v in strategy.global_model().adapter.items()}
    state, metrics = good_state(strategy), {"num-examples": NODE.num_examples, "rank": NODE.rank, "train-loss": 0.7}
    corrupt(kind, state, metrics)
    reply = Message(RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)}), reply_to=msg)
    # Execute
    arrays, _ = strategy.aggregate_train(1, [reply])
    # Assert
    report = strategy.reports[1]
    assert arrays is None and not report.clients
    assert len(report.rejected) == 1 and report.rejected[0]["node"] == NODE.node_id and report.rejected[0]["reason"]
    after = strategy.global_model()
    assert after.base_updates == [] and all(torch.equal(after.adapter[k], v) for k, v in before.items())


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
def test_a_well_formed_update_is_accepted(rule):
    strategy = strategy_for(rule)
    msg = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid=None))[0]
    metrics = {"num-examples": NODE.num_examples, "rank": NODE.rank, "train-loss": 0.7}
    reply = Message(
        RecordDict({"arrays": to_record(good_state(strategy)), "metrics": MetricRecord(metrics)}), reply_to=msg
    )
    arrays, out = strategy.aggregate_train(1, [reply])
    assert arrays is not None and strategy.reports[1].clients and not strategy.reports[1].rejected
    assert out["train-loss"] == pytest.approx(0.7)


def test_client_sampling_is_seeded_and_independent_of_node_ids():
    """Two runs with one seed pick the same partitions every round, whatever ids Flower gave the nodes."""

    def picks(seed: int, id_offset: int) -> list[list[int]]:
        strategy = STRATEGIES["fedavg"](adapter(), clients_per_round=3, seed=seed)
        strategy.register_nodes(
            [NodeInfo(node_id=id_offset + 97 * k, partition_id=k, rank=2, num_examples=10) for k in range(8)]
        )
        return [[strategy.nodes[n].partition_id for n in strategy.sample(r)] for r in range(1, 6)]

    assert picks(3, 1000) == picks(3, 5) and picks(3, 5) != picks(4, 5)
    assert all(len(set(p)) == 3 for p in picks(3, 5))
