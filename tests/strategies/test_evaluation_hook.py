"""The evaluation hook: a rule asks for a federated (global or personal) evaluation; the server
sends evaluate plans, collects the replies, and metrics.jsonl summarises the clients' accuracy."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType

from fedpeft.protocol import wire as protocol
from fedpeft.protocol.wire import LORA_B, Evaluate, Source
from fedpeft.server.rows import round_row
from fedpeft.strategies.fedavg import FedIT
from fedpeft.strategies.types import NodeInfo

A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.head.weight"


class Evaluating(FedIT):
    def evaluation_plan(self, node, server_round):
        if node.partition_id == 0:
            return self.personal_evaluation(node, server_round, personal=frozenset({LORA_B}))
        return self.global_evaluation(node, server_round)


def strategy() -> Evaluating:
    g = torch.Generator().manual_seed(0)
    s = Evaluating(
        {A: torch.randn(4, 6, generator=g), B: torch.randn(5, 4, generator=g), HEAD: torch.randn(3, 6, generator=g)},
        clients_per_round=2,
        seed=0,
    )
    s.register_nodes(
        [NodeInfo(node_id=10 + p, partition_id=p, rank=r, num_examples=20) for p, r in enumerate((4, 2, 1))]
    )
    return s


def test_evaluate_messages_carry_valid_evaluate_plans():
    s = strategy()
    messages = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord({}), grid=None))
    assert [m.metadata.dst_node_id for m in messages] == [10, 11, 12]
    for msg in messages:
        assert msg.metadata.message_type == MessageType.EVALUATE
        sent = protocol.decode_instruction(msg.content, evaluate_only=True)
        node = s.nodes[msg.metadata.dst_node_id]
        if node.partition_id == 0:  # personal: B from the node's own state, never sent
            assert (
                sent.plan.evaluate == Evaluate.PERSONAL
                and sent.plan.group_of(B).source == Source.NODE
                and B not in sent.tensors
            )
        else:
            assert sent.plan.evaluate == Evaluate.GLOBAL and set(sent.tensors) == {A, B, HEAD}
            assert torch.equal(sent.tensors[A], s.adapter[A][: node.rank])


def test_replies_become_an_example_weighted_spread_in_the_metrics_row():
    s = strategy()
    messages = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord({}), grid=None))
    results = {10: (0.5, 10), 11: (1.0, 30), 12: (0.25, 0)}
    replies = []
    for msg in messages:
        acc, n = results[msg.metadata.dst_node_id]
        metrics = {protocol.VAL_ACCURACY: acc, protocol.VAL_EXAMPLES: n, protocol.EVALUATED: 1}
        replies.append(Message(protocol.encode_reply(None, metrics), reply_to=msg))
    s.aggregate_evaluate(1, replies)
    row = round_row(s, 1, wall=1.0, result=None, totals={"up": 0, "down": 0})
    assert row["client_val_accuracy_source"] == "evaluate" and len(row["evaluations"]) == 3
    assert row["client_val_accuracy_mean"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert (row["client_val_accuracy_min"], row["client_val_accuracy_max"]) == (0.25, 1.0)
    assert row["client_val_accuracy_std"] == pytest.approx(((10 * 0.375**2 + 30 * 0.125**2) / 40) ** 0.5)
