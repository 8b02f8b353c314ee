"""HetLoRA's rank self-pruning: the plan carries it, the client penalises and drops its tail, the server follows.

The client never learns which rule runs: the plan's :class:`~fedpeft.protocol.wire.RankPruning` says
how to penalise and when to shrink; the server accepts a reply at the plan's rank or its pruned
rank, and sends a client that pruned itself its new rank from then on (through a resume too).
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message

from fedpeft.cli.checks import check_config
from fedpeft.cli.configs import compose_config
from fedpeft.clients.job import tail_norm
from fedpeft.engines.batched import BatchedGrid
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import resize_rank
from fedpeft.protocol.wire import ClientPlan, ProtocolError, RankPruning
from fedpeft.server.loop import run_federated
from fedpeft.strategies.hetlora import HetLoRA
from tests.strategies import replies
from tests.strategies.test_rules_fakegrid import grid, tiny_model  # noqa: F401  (a fixture)

PRUNE = RankPruning(decay=0.5, weight=0.1, min_rank=1)


# ------------------------------------------------------------------------------ the plan
def test_the_pruned_rank_is_the_floor_of_decay_times_rank_and_never_below_the_minimum():
    assert [RankPruning(decay=0.99, weight=0.01).pruned_rank(r) for r in (16, 8, 2, 1)] == [15, 7, 1, 1]
    assert [RankPruning(decay=0.5, weight=0.0, min_rank=3).pruned_rank(r) for r in (16, 5, 3, 2)] == [8, 3, 3, 2]
    for bad in (
        {"decay": 1.0, "weight": 0.1},
        {"decay": 0.0, "weight": 0.1},
        {"decay": 0.5, "weight": -1.0},
        {"decay": 0.5, "weight": float("nan")},
        {"decay": 0.5, "weight": 0.1, "min_rank": 0},
    ):
        with pytest.raises(ProtocolError):
            RankPruning(**bad)


def test_a_pruning_plan_travels_and_a_partial_or_rankless_one_is_refused():
    plan = ClientPlan(groups=protocol.single_group(), server_round=3, rank=8, prune=PRUNE)
    record = protocol.encode_plan(plan)
    assert protocol.decode_plan(record) == plan
    assert plan.reply_ranks() == (8, 4)
    assert ClientPlan(groups=protocol.single_group(), server_round=3, rank=8).reply_ranks() == (8,)
    del record[protocol.PRUNE_WEIGHT]
    with pytest.raises(ProtocolError, match="without"):
        protocol.decode_plan(record)
    with pytest.raises(ProtocolError, match="needs a LoRA rank"):
        ClientPlan(groups=protocol.single_group(), server_round=1, rank=None, prune=PRUNE)
    frozen_a = (
        protocol.GroupPlan(roles={protocol.LORA_A}, source=protocol.Source.SEED, seed=1, train=False, upload=False),
        protocol.GroupPlan(roles={protocol.LORA_B, protocol.OTHER}),
    )
    with pytest.raises(ProtocolError, match="both LoRA factors"):
        ClientPlan(groups=frozen_a, server_round=1, rank=4, prune=PRUNE)


# ------------------------------------------------------------------------------ the client's penalty
def test_the_tail_norm_is_the_sum_over_layers_of_the_tail_factors_norms_and_moves_only_the_tail():
    g = torch.Generator().manual_seed(0)
    factors = [
        (
            torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True),
        )
        for _ in range(3)
    ]
    value = tail_norm(factors, 2)
    expected = sum(
        float(torch.sqrt((b.detach()[:, 2:] ** 2).sum()) * torch.sqrt((a.detach()[2:] ** 2).sum())) for a, b in factors
    )
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    value.backward()
    for a, b in factors:
        assert torch.all(a.grad[:2] == 0) and torch.all(b.grad[:, :2] == 0)
        assert torch.all(a.grad[2:] != 0) and torch.all(b.grad[:, 2:] != 0)
    assert float(tail_norm(factors, 4)) == 0.0  # nothing to drop at the full rank


# ------------------------------------------------------------------------------ the server (mock replies)
def pruned_reply(strategy: HetLoRA, msg: Message, g: torch.Generator, rank: int) -> Message:
    node = strategy.nodes[msg.metadata.dst_node_id]
    template = resize_rank(strategy.adapter, rank)
    upload = {k: torch.randn(template[k].shape, generator=g) for k in template}
    return Message(
        protocol.encode_reply(
            upload, {protocol.NUM_EXAMPLES: node.num_examples, protocol.RANK: rank, protocol.TRAIN_LOSS: 1.0}
        ),
        reply_to=msg,
    )


def test_a_client_that_pruned_itself_is_sent_its_new_rank_from_then_on_and_through_a_resume():
    # Prepare
    strategy = HetLoRA(replies.initial_adapter(4), clients_per_round=2, seed=0, prune=PRUNE)
    strategy.register_nodes(replies.nodes([4, 4]))
    g = torch.Generator().manual_seed(1)
    # Execute: round 1, node of partition 0 prunes 4 -> 2, the other keeps 4
    messages = replies.train_messages(strategy, 1)
    assert all(protocol.decode_instruction(m.content).plan.prune == PRUNE for m in messages)
    by_partition = {strategy.nodes[m.metadata.dst_node_id].partition_id: m for m in messages}
    strategy.aggregate_train(
        1, [pruned_reply(strategy, by_partition[0], g, 2), replies.reply(strategy, by_partition[1], g)]
    )
    # Assert
    assert strategy.reports[1].rejected == [] and sorted(c["rank"] for c in strategy.reports[1].clients) == [2, 4]
    restored = HetLoRA(replies.initial_adapter(4), clients_per_round=2, seed=0, prune=PRUNE)
    restored.register_nodes(replies.nodes([4, 4]))
    restored.load_state_dict(strategy.state_dict())
    for s in (strategy, restored):
        sent = {
            s.nodes[m.metadata.dst_node_id].partition_id: protocol.decode_instruction(m.content)
            for m in replies.train_messages(s, 2)
        }
        assert [sent[p].plan.rank for p in (0, 1)] == [2, 4]
        assert sent[0].tensors[f"{replies.LAYERS[0]}.lora_A.weight"].shape[0] == 2
        assert sent[0].plan.reply_ranks() == (2, 1)


def test_a_reply_at_a_rank_the_plan_does_not_allow_is_rejected():
    for prune, bad in ((PRUNE, 3), (None, 2)):  # 4 prunes to 2, never to 3; without pruning only 4 goes
        strategy = HetLoRA(replies.initial_adapter(4), clients_per_round=1, seed=0, prune=prune)
        strategy.register_nodes(replies.nodes([4]))
        (msg,) = replies.train_messages(strategy, 1)
        strategy.aggregate_train(1, [pruned_reply(strategy, msg, torch.Generator().manual_seed(0), bad)])
        (rejected,) = strategy.reports[1].rejected
        assert f"rank {bad} differs from the assigned rank 4" in rejected["reason"]


# ------------------------------------------------------------------------------ a whole run
@pytest.mark.parametrize(
    "engine", ["ray", "batched"]
)  # ray: the in-process grid answering through the ClientApp, as a Ray worker does
def test_clients_prune_their_rank_over_a_run_and_upload_exactly_the_pruned_adapter(tmp_path, tiny_model, engine):  # noqa: F811
    # Prepare: a heavy penalty, so the tails fade
    cfg = compose_config(
        [
            *tiny_model,
            "strategy=hetlora",
            "num_rounds=4",
            "model.lora.r=4",
            "strategy.ranks=[4,4,2]",
            "strategy.prune_decay=0.5",
            "strategy.prune_weight=10.0",
            f"engine={engine}",
        ]
    )
    batched = BatchedGrid(num_nodes=3, clients_per_pass=2, seed=cfg.seed) if engine == "batched" else None
    # Execute
    rows = run_federated(cfg, batched or grid(), tmp_path / "run")
    if batched is not None:  # a pruning job trains alone, on the one-client path
        assert batched.passes == []
    # Assert
    assert not any(r["clients_rejected"] or r["clients_failed"] for r in rows)
    assert all(
        c["tail_norm_before"] == 0.0 and c["rank"] in (4, 2) for c in rows[0]["clients"]
    )  # B = 0: nothing to prune in round 1
    current, pruning = {0: 4, 1: 4, 2: 2}, RankPruning(decay=0.5, weight=10.0)
    for row in rows:
        for c in row["clients"]:
            rank = current[c["partition"]]  # what the server sent: the client's rank after its last prune
            assert c["rank"] == (pruning.pruned_rank(rank) if c["tail_norm_after"] < c["tail_norm_before"] else rank)
            current[c["partition"]] = c["rank"]
    assert current != {0: 4, 1: 4, 2: 2}, "nobody pruned"
    adapter = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)["strategy"][
        "adapter"
    ]
    for row in rows:  # what went up is the adapter at the reply's rank, nothing more
        for c in row["clients"]:
            assert c["bytes_up"] == sum(v.numel() * v.element_size() for v in resize_rank(adapter, c["rank"]).values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.prune_decay=1.5"], "decay must lie in"),
        (["strategy.prune_decay=0.9", "client=dp"], "not a per-sample loss"),
        (["strategy.prune_decay=0.9", "compression=compeft"], "compression=compeft"),
    ],
)
def test_pruning_that_cannot_run_is_refused_at_start(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(compose_config(["strategy=hetlora", *overrides]))
