"""FedSA-LoRA: Ā is the example-weighted average of the A uploads; personalised evaluation summary.

docs/methods.md, invariant 9 (B never uploaded, a node's B bit-identical across rounds and resume) is
checked over the strategy and the node state below the math tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedpeft.protocol import wire as protocol
from fedpeft.strategies.fedsa_lora import FedSALoRA, fedsa_aggregate, personal_summary
from tests.strategies import draw, replies


def uploads(sz):
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (len(ranks),), generator=g).double()
    return lora_as, counts / counts.sum(), ranks


# ------------------------------------------------------------------------------ the average of A
@draw.SETTINGS
@given(sz=draw.sizes(), spare=st.integers(0, 2))
def test_a_bar_is_the_example_weighted_zero_padded_average(sz, spare):
    # Prepare
    lora_as, weights, ranks = uploads(sz)
    rank = max(ranks) + spare
    # Execute
    lora_a = fedsa_aggregate(lora_as, weights, rank=rank)
    # Assert: row i averages every client's row i, a client without row i contributing zero
    assert lora_a.shape == (rank, sz["d_in"])
    for i in range(rank):
        expected = sum(
            (p * a[i] for p, a in zip(weights.tolist(), lora_as) if i < a.shape[0]),
            torch.zeros(sz["d_in"], dtype=torch.float64),
        )
        torch.testing.assert_close(lora_a[i], expected, rtol=0, atol=1e-12)


@draw.SETTINGS
@given(sz=draw.sizes(), factor=st.floats(0.1, 10.0), data=st.data())
def test_a_bar_ignores_client_order_and_the_scale_of_the_counts(sz, factor, data):
    lora_as, weights, ranks = uploads(sz)
    order = data.draw(st.permutations(range(len(ranks))))
    scaled = weights * factor

    plain = fedsa_aggregate(lora_as, weights, rank=max(ranks))
    shuffled = fedsa_aggregate([lora_as[i] for i in order], weights[list(order)], rank=max(ranks))

    torch.testing.assert_close(shuffled, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        fedsa_aggregate(lora_as, scaled / scaled.sum(), rank=max(ranks)), plain, rtol=0, atol=1e-12
    )


def test_one_client_gets_its_own_a_back_and_unnormalised_weights_are_refused():
    a = torch.randn(3, 4, dtype=torch.float64)

    assert torch.equal(fedsa_aggregate([a], torch.ones(1, dtype=torch.float64), rank=3), a)
    with pytest.raises(ValueError, match="sum to 1"):
        fedsa_aggregate([a, a], torch.tensor([3.0, 5.0], dtype=torch.float64), rank=3)


# ------------------------------------------------------------------------------ personalised evaluation
@draw.SETTINGS
@given(values=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_the_personal_summary_is_the_weighted_mean_and_spread(values, seed):
    counts = torch.randint(1, 100, (len(values),), generator=torch.Generator().manual_seed(seed)).double()
    weights = counts / counts.sum()

    mean, spread = personal_summary(values, weights)

    expected = sum(n * v for n, v in zip(counts.tolist(), values)) / float(counts.sum())
    assert mean == pytest.approx(expected, abs=1e-12)
    assert min(values) - 1e-12 <= mean <= max(values) + 1e-12
    assert spread == pytest.approx(
        (sum(n * (v - expected) ** 2 for n, v in zip(counts.tolist(), values)) / float(counts.sum())) ** 0.5, abs=1e-9
    )


def test_the_personal_summary_of_known_values():
    mean, spread = personal_summary([0.5, 1.0], torch.tensor([0.5, 0.5], dtype=torch.float64))

    assert mean == pytest.approx(0.75) and spread == pytest.approx(0.25)
    assert personal_summary([0.8, 0.8, 0.8], torch.full((3,), 1 / 3, dtype=torch.float64))[1] == pytest.approx(
        0.0, abs=1e-12
    )


# ------------------------------------------------------------------------------ the strategy (mock replies)
A_KEYS = {f"{m}.lora_A.weight" for m in replies.LAYERS}


def fedsa_with(ranks, *, clients_per_round: int, keep_head: bool = True) -> FedSALoRA:
    strategy = FedSALoRA(
        replies.initial_adapter(max(ranks)), clients_per_round=clients_per_round, seed=3, keep_head=keep_head
    )
    strategy.register_nodes(replies.nodes(ranks))
    return strategy


@pytest.mark.parametrize("keep_head", [True, False])
def test_b_stays_on_the_node_and_never_travels(keep_head):
    # Prepare
    strategy = fedsa_with([4, 2], clients_per_round=2, keep_head=keep_head)
    # Execute
    messages = replies.train_messages(strategy, 1)
    # Assert: B from the node's state (zero on a new node), kept, never sent nor uploaded
    for msg in messages:
        node = strategy.nodes[msg.metadata.dst_node_id]
        sent = protocol.decode_instruction(msg.content)
        b = sent.plan.group_of("m.layer0.q.lora_B.weight")
        assert (b.source, b.fallback, b.train, b.upload, b.keep) == (
            protocol.Source.NODE,
            protocol.Source.ZERO,
            True,
            False,
            True,
        )
        assert not any(k.endswith(".lora_B.weight") for k in sent.tensors)
        uploads = strategy.upload_keys(node, sent.plan)
        assert uploads == (A_KEYS if keep_head else A_KEYS | {replies.HEAD})
        assert set(sent.tensors) == A_KEYS | {
            replies.HEAD
        }  # the head: for a node with no state yet (keep_head) or to train
        assert sent.plan.evaluate == protocol.Evaluate.PERSONAL


def test_an_upload_holding_b_is_rejected_by_the_common_checks():
    strategy = fedsa_with([3], clients_per_round=1)
    (msg,) = replies.train_messages(strategy, 1)
    g = torch.Generator().manual_seed(0)
    leaking = {
        k: torch.randn(v.shape, generator=g)
        for k, v in strategy.adapter.items()
        if k in A_KEYS or k.endswith(".lora_B.weight")
    }
    before = {k: v.clone() for k, v in strategy.adapter.items()}

    arrays, _ = strategy.aggregate_train(1, [replies.reply(strategy, msg, g, upload=leaking)])

    assert (
        arrays is None
        and "unexpected" in strategy.reports[1].rejected[0]["reason"]
        and "lora_B" in strategy.reports[1].rejected[0]["reason"]
    )
    assert all(torch.equal(strategy.adapter[k], v) for k, v in before.items())


def test_a_bar_is_aggregated_and_the_personal_accuracy_reported():
    # Prepare: heterogeneous ranks; every client reports its own model's validation accuracy
    ranks = [4, 1, 3]
    strategy = fedsa_with(ranks, clients_per_round=3)
    g = torch.Generator().manual_seed(1)
    messages = replies.train_messages(strategy, 1)
    accuracy = {100: 0.5, 107: 0.75, 114: 1.0}
    sent = [
        replies.reply(
            strategy, m, g, **{protocol.VAL_ACCURACY: accuracy[m.metadata.dst_node_id], protocol.VAL_EXAMPLES: 4}
        )
        for m in messages
    ]
    head_before = strategy.adapter[replies.HEAD].clone()
    # Execute
    strategy.aggregate_train(1, sent)
    # Assert
    uploads = [protocol.decode_reply(r.content)[0] for r in sent]
    counts = torch.tensor(
        [float(strategy.nodes[m.metadata.dst_node_id].num_examples) for m in messages], dtype=torch.float64
    )
    for key in A_KEYS:
        assert torch.equal(
            strategy.adapter[key], fedsa_aggregate([u[key] for u in uploads], counts / counts.sum(), rank=4)
        )
    assert torch.equal(strategy.adapter[replies.HEAD], head_before)  # the head is personal too
    extra = strategy.reports[1].extra
    assert extra["personal_accuracy"] == pytest.approx(0.75) and extra["personal_accuracy_spread"] == pytest.approx(
        (1 / 24) ** 0.5
    )
    for msg, _ in zip(messages, sent):  # up: A only, exactly
        node = strategy.nodes[msg.metadata.dst_node_id]
        assert strategy.reports[1].bytes_up[node.node_id] == 4 * node.rank * 8 * len(replies.LAYERS)
