"""FedIT (FedAvg on LoRA): docs/methods.md, invariant 3, HetLoRA padding, and the real Flower plumbing.

Malformed replies (missing/extra key, shape, dtype, NaN/Inf, rank, num-examples, metrics) are
rejected for every rule in ``test_rejections.py``; here a bad reply among good ones is checked to
leave the round exactly as if it had never come.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.protocol.records import from_record, resize_rank, to_record
from fedpeft.protocol.wire import decode_plan
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.fedavg import FedIT, fedit, fedit_pair
from fedpeft.strategies.types import NodeInfo
from tests.strategies import draw

SETTINGS = settings(max_examples=40, deadline=None)
A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.head.weight"

sizes = draw.sizes()


def client_states(sz, *, equal_ranks: bool = False) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, list[int]]:
    """Random float64 adapters (both factors random, and a head) and normalised weights."""
    g = torch.Generator().manual_seed(sz["seed"])
    k = sz["clients"]
    ranks = [sz["ranks"][0]] * k if equal_ranks else sz["ranks"][:k]
    states = [
        {
            A: torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64),
            B: torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64),
            HEAD: torch.randn(2, sz["d_in"], generator=g, dtype=torch.float64),
        }
        for r in ranks
    ]
    counts = torch.randint(1, 100, (k,), generator=g).double()
    return states, counts / counts.sum(), ranks


def initial_adapter(rank: int = 4, *, d_in: int = 6, d_out: int = 5, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        A: torch.randn(rank, d_in, generator=g, dtype=dtype),
        B: torch.randn(d_out, rank, generator=g, dtype=dtype),
        HEAD: torch.randn(3, d_in, generator=g, dtype=dtype),
    }


def replies_for(
    strategy, states_by_partition: dict[int, dict[str, torch.Tensor]], *, server_round: int = 1
) -> list[Message]:
    """Real reply Messages to the strategy's own train instructions, one per sampled node."""
    replies = []
    for msg in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid=None):
        node = strategy.nodes[msg.metadata.dst_node_id]
        metrics = MetricRecord(
            {"num-examples": node.num_examples, "rank": node.rank, "train-loss": 0.5 + node.partition_id}
        )
        content = RecordDict(
            {strategy.arrayrecord_key: to_record(states_by_partition[node.partition_id]), "metrics": metrics}
        )
        replies.append(Message(content, reply_to=msg))
    return replies


# ------------------------------------------------------------------------------ invariant 3
@SETTINGS
@given(sz=sizes, data=st.data())
def test_fedavg_does_not_depend_on_client_order(sz, data):
    # Prepare
    states, weights, ranks = client_states(sz)
    perm = data.draw(st.permutations(range(len(states))))
    # Execute
    out, residual = fedit(states, weights, rank=max(ranks))
    out_perm, residual_perm = fedit([states[i] for i in perm], weights[list(perm)], rank=max(ranks))
    # Assert
    assert out.keys() == out_perm.keys() == {A, B, HEAD}
    for key in out:
        torch.testing.assert_close(out_perm[key], out[key], rtol=0, atol=1e-12)
    assert residual_perm == pytest.approx(residual, abs=1e-12)


@SETTINGS
@given(sz=sizes, factor=st.integers(2, 1000))
def test_fedavg_weights_are_normalised_counts(sz, factor):
    """Multiplying every client's num-examples by the same factor changes nothing."""
    # Prepare
    states, _, ranks = client_states(sz)
    counts = torch.randint(1, 50, (len(states),), generator=torch.Generator().manual_seed(sz["seed"])).double()
    # Execute
    out, _ = fedit(states, counts / counts.sum(), rank=max(ranks))
    out_scaled, _ = fedit(states, (factor * counts) / (factor * counts).sum(), rank=max(ranks))
    # Assert
    for key in out:
        torch.testing.assert_close(out_scaled[key], out[key], rtol=0, atol=1e-12)


@SETTINGS
@given(sz=sizes)
def test_fedavg_of_one_client_is_that_client(sz):
    states, _, ranks = client_states(sz)

    out, residual = fedit(states[:1], torch.ones(1, dtype=torch.float64), rank=ranks[0])

    assert all(torch.equal(out[key], states[0][key]) for key in states[0])
    assert residual == 0.0


@SETTINGS
@given(sz=sizes)
def test_fedavg_of_identical_clients_is_that_client(sz):
    states, weights, ranks = client_states(sz, equal_ranks=True)

    out, residual = fedit([states[0]] * len(states), weights, rank=ranks[0])

    for key in out:
        torch.testing.assert_close(out[key], states[0][key], rtol=0, atol=1e-12)
    assert residual < 1e-12


@SETTINGS
@given(sz=sizes)
def test_fedavg_is_exact_when_all_a_or_all_b_are_equal(sz):
    # Prepare
    states, weights, ranks = client_states(sz, equal_ranks=True)
    same_a = [{**s, A: states[0][A]} for s in states]
    same_b = [{**s, B: states[0][B]} for s in states]
    # Execute
    (_, residual_a), (_, residual_b) = fedit(same_a, weights, rank=ranks[0]), fedit(same_b, weights, rank=ranks[0])
    # Assert
    assert residual_a < 1e-12 and residual_b < 1e-12


def test_fedavg_residual_is_nonzero_for_generic_clients():
    """The aggregation noise FLoRA and LoRA-FAIR attack: B̄Ā ≠ Σ p_k B_k A_k."""
    states, weights, ranks = client_states({"clients": 3, "d_in": 6, "d_out": 5, "ranks": [2] * 5, "seed": 3})

    _, residual = fedit(states, weights, rank=2)

    assert residual > 1e-3


# ------------------------------------------------------------------------------ heterogeneous ranks
@SETTINGS
@given(sz=sizes, spare=st.integers(0, 2))
def test_heterogeneous_ranks_are_zero_padded_and_each_component_averaged_over_its_holders(sz, spare):
    # Prepare
    states, weights, ranks = client_states(sz)
    r_max = max(ranks) + spare
    # Execute
    lora_a, lora_b = fedit_pair([s[A] for s in states], [s[B] for s in states], weights, rank=r_max)
    # Assert
    assert lora_a.shape == (r_max, sz["d_in"]) and lora_b.shape == (sz["d_out"], r_max)
    for i in range(r_max):
        holders = [(p, s) for p, s, r in zip(weights.tolist(), states, ranks) if r > i]
        expected_a = sum((p * s[A][i] for p, s in holders), torch.zeros(sz["d_in"], dtype=torch.float64))
        expected_b = sum((p * s[B][:, i] for p, s in holders), torch.zeros(sz["d_out"], dtype=torch.float64))
        torch.testing.assert_close(lora_a[i], expected_a, rtol=0, atol=1e-12)
        torch.testing.assert_close(lora_b[:, i], expected_b, rtol=0, atol=1e-12)


def test_each_client_takes_back_its_first_components():
    # Prepare
    ranks = {0: 1, 1: 2, 2: 4}
    strategy = FedIT(initial_adapter(4), clients_per_round=3, seed=0)
    strategy.register_nodes(
        [NodeInfo(node_id=100 + p, partition_id=p, rank=r, num_examples=10 * (p + 1)) for p, r in ranks.items()]
    )
    g = torch.Generator().manual_seed(1)
    uploads = {
        p: {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in resize_rank(strategy.adapter, r).items()}
        for p, r in ranks.items()
    }
    strategy.aggregate_train(1, replies_for(strategy, uploads))
    # Execute
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), grid=None))
    # Assert
    for msg in messages:
        node = strategy.nodes[msg.metadata.dst_node_id]
        sent = from_record(msg.content[strategy.arrayrecord_key])
        assert sent[A].shape[0] == node.rank and decode_plan(msg.content["plan"]).rank == node.rank
        assert torch.equal(sent[A], strategy.adapter[A][: node.rank]) and torch.equal(
            sent[B], strategy.adapter[B][:, : node.rank]
        )
        assert torch.equal(sent[HEAD], strategy.adapter[HEAD])


# ------------------------------------------------------------------------------ the real plumbing
def three_clients(*, ranks=(4, 4, 4), counts=(5, 17, 40)):
    strategy = FedIT(initial_adapter(4), clients_per_round=3, seed=0)
    strategy.register_nodes(
        [
            NodeInfo(node_id=10 + p, partition_id=p, rank=r, num_examples=n)
            for p, (r, n) in enumerate(zip(ranks, counts))
        ]
    )
    g = torch.Generator().manual_seed(7)
    uploads = {
        p: {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in resize_rank(strategy.adapter, r).items()}
        for p, r in enumerate(ranks)
    }
    return strategy, uploads


def test_aggregate_train_equals_flowers_own_fedavg_for_equal_ranks():
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    # Prepare
    strategy, uploads = three_clients()
    replies = sorted(replies_for(strategy, uploads), key=lambda m: m.metadata.src_node_id)
    # Execute
    ours, metrics = strategy.aggregate_train(1, replies)
    theirs = aggregate_arrayrecords([r.content for r in replies], "num-examples")
    # Assert
    assert set(ours) == set(theirs) == {A, B, HEAD}
    for key in ours:
        torch.testing.assert_close(
            torch.from_numpy(ours[key].numpy()), torch.from_numpy(theirs[key].numpy()), rtol=1e-12, atol=1e-12
        )
    assert metrics["num-examples"] == 62 and metrics["clients-replied"] == 3


def test_aggregate_train_equals_the_pure_rule_and_ignores_arrival_order():
    # Prepare
    strategy, uploads = three_clients(ranks=(1, 3, 4))
    replies = replies_for(strategy, uploads)
    counts = torch.tensor([5.0, 17.0, 40.0], dtype=torch.float64)
    expected, residual = fedit([uploads[p] for p in range(3)], counts / counts.sum(), rank=4)
    twin, _ = three_clients(ranks=(1, 3, 4))
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    twin.aggregate_train(1, list(reversed(replies_for(twin, uploads))))
    # Assert
    assert all(torch.equal(strategy.adapter[k], v) for k, v in expected.items())
    assert all(torch.equal(from_record(arrays)[k], v) for k, v in expected.items())
    assert all(torch.equal(twin.adapter[k], v) for k, v in strategy.adapter.items())  # bit-identical
    assert strategy.reports[1].extra["residual"] == pytest.approx(residual)


def test_aggregate_train_never_mutates_the_replies():
    strategy, uploads = three_clients()
    replies = replies_for(strategy, uploads)
    before = [{k: v.numpy().copy() for k, v in r.content[strategy.arrayrecord_key].items()} for r in replies]

    strategy.aggregate_train(1, replies)

    for reply, saved in zip(replies, before):
        record = reply.content[strategy.arrayrecord_key]
        assert set(record) == set(saved) and all((record[k].numpy() == v).all() for k, v in saved.items())


@pytest.mark.parametrize("rule", ["fedavg", "ffa_lora", "lora_fair"])
def test_a_bad_reply_among_good_ones_leaves_the_round_as_if_it_never_came(rule):
    # Prepare: partition 1 replies with a NaN; the result must equal a round of partitions 0 and 2 only
    def build(partitions):
        strategy = STRATEGIES[rule](initial_adapter(2), clients_per_round=len(partitions), seed=0)
        strategy.register_nodes(
            [NodeInfo(node_id=10 + p, partition_id=p, rank=2, num_examples=3 + p) for p in partitions]
        )
        g = torch.Generator().manual_seed(5)
        good = {
            p: {
                k: torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in strategy.adapter.items()
                if k in draw.upload_keys_at(strategy, 2)
            }
            for p in range(3)
        }
        return strategy, good

    strategy, uploads = build([0, 1, 2])
    uploads[1][B] = uploads[1][B].clone()
    uploads[1][B][0, 0] = float("nan")
    reference, good = build([0, 2])
    # Execute
    strategy.aggregate_train(1, replies_for(strategy, uploads))
    reference.aggregate_train(1, replies_for(reference, {0: good[0], 2: good[2]}))
    # Assert
    report = strategy.reports[1]
    assert [r["node"] for r in report.rejected] == [11] and "NaN" in report.rejected[0]["reason"]
    assert sorted(c["node"] for c in report.clients) == [10, 12]
    assert all(torch.equal(strategy.adapter[k], v) for k, v in reference.adapter.items())
