"""FFA-LoRA: docs/methods.md, invariant 4 (A never travels, bit-identical everywhere) and exactness of B̄A."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import LORA_A_SUFFIX, from_record, resize_rank, seeded_tensors, state_nbytes, to_record
from fedpeft.strategies.fedavg import FedIT
from fedpeft.strategies.ffa_lora import FFALoRA, ffa, ffa_aggregate
from fedpeft.strategies.lora_math import ideal_delta
from fedpeft.strategies.types import NodeInfo
from tests.strategies import draw

SETTINGS = settings(max_examples=40, deadline=None)
LAYERS = ("m.layer0.q", "m.layer0.v", "m.layer1.q")
HEAD = "m.head.weight"


def initial_adapter(rank: int = 4, *, dim: int = 8, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Square layers (d_in = d_out = dim), both factors random, and a head."""
    g = torch.Generator().manual_seed(0)
    state = {HEAD: torch.randn(3, dim, generator=g, dtype=dtype)}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, dim, generator=g, dtype=dtype)
        state[f"{layer}.lora_B.weight"] = torch.randn(dim, rank, generator=g, dtype=dtype)
    return state


def strategy_with(ranks: dict[int, int], *, seed: int = 0, max_rank: int = 4) -> FFALoRA:
    strategy = FFALoRA(initial_adapter(max_rank), clients_per_round=len(ranks), seed=seed)
    strategy.register_nodes(
        [NodeInfo(node_id=100 + p, partition_id=p, rank=r, num_examples=10 + 7 * p) for p, r in ranks.items()]
    )
    return strategy


def a_keys(state) -> set[str]:
    return {k for k in state if k.endswith(LORA_A_SUFFIX)}


def replies_for(strategy, server_round: int, g: torch.Generator) -> list[Message]:
    """Each sampled client uploads random B's and head of its rank (what a trained client sends)."""
    replies = []
    for msg in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid=None):
        node = strategy.nodes[msg.metadata.dst_node_id]
        received = from_record(msg.content[strategy.arrayrecord_key])
        upload = {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in received.items()}
        metrics = MetricRecord({"num-examples": node.num_examples, "rank": node.rank, "train-loss": 1.0})
        replies.append(
            Message(RecordDict({strategy.arrayrecord_key: to_record(upload), "metrics": metrics}), reply_to=msg)
        )
    return replies


# ------------------------------------------------------------------------------ invariant 4
def test_the_global_a_is_the_seeded_draw_not_the_initial_one():
    strategy = strategy_with({0: 4})

    expected = seeded_tensors(initial_adapter(4), sorted(a_keys(initial_adapter(4))), seed=strategy.a_seed)

    assert strategy.a_seed == 0 + 7919
    for key in a_keys(strategy.adapter):
        assert torch.equal(strategy.adapter[key], expected[key]) and not torch.equal(
            strategy.adapter[key], initial_adapter(4)[key]
        )
    assert torch.equal(strategy.adapter[HEAD], initial_adapter(4)[HEAD])
    assert all(
        torch.equal(FFALoRA(initial_adapter(4), clients_per_round=1, seed=0).adapter[k], strategy.adapter[k])
        for k in a_keys(strategy.adapter)
    )
    assert not torch.equal(
        FFALoRA(initial_adapter(4), clients_per_round=1, seed=1).adapter[f"{LAYERS[0]}.lora_A.weight"],
        strategy.adapter[f"{LAYERS[0]}.lora_A.weight"],
    )


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_no_payload_and_no_upload_holds_lora_a(rank):
    # Prepare
    strategy = strategy_with({0: rank})
    node = strategy.nodes[100]
    # Execute
    (msg,) = strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid=None)
    sent = protocol.decode_instruction(msg.content)
    # Assert: A is regenerated from the seed at r_max, frozen and never sent; B and head travel both ways
    plan = sent.plan
    assert not a_keys(sent.tensors) and not a_keys(strategy.upload_keys(node, plan))
    assert set(sent.tensors) == strategy.upload_keys(node, plan) == set(strategy.adapter) - a_keys(strategy.adapter)
    a_group = plan.group_of("m.q.lora_A.weight")
    assert (a_group.source, a_group.seed, a_group.seed_rank, a_group.train, a_group.upload) == (
        protocol.Source.SEED,
        strategy.a_seed,
        4,
        False,
        False,
    )
    assert plan.rank == rank
    assert all(sent.tensors[k].shape[1] == rank for k in sent.tensors if k.endswith(".lora_B.weight"))


def test_an_upload_holding_lora_a_is_rejected():
    # Prepare
    strategy = strategy_with({0: 2})
    (msg,) = strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid=None)
    upload = resize_rank(strategy.adapter, 2)  # B, head *and* A
    reply = Message(
        RecordDict(
            {strategy.arrayrecord_key: to_record(upload), "metrics": MetricRecord({"num-examples": 10, "rank": 2})}
        ),
        reply_to=msg,
    )
    before = {k: v.clone() for k, v in strategy.adapter.items()}
    # Execute
    arrays, _ = strategy.aggregate_train(1, [reply])
    # Assert
    assert arrays is None and "unexpected" in strategy.reports[1].rejected[0]["reason"]
    assert all(torch.equal(strategy.adapter[k], v) for k, v in before.items())


def test_every_client_rebuilds_the_servers_a_bit_for_bit_in_every_round():
    """The client's own code (fedpeft.clients.job.start_state) regenerates A from the plan."""
    from fedpeft.clients.job import start_state

    # Prepare
    ranks = {0: 1, 1: 2, 2: 3, 3: 4}
    strategy = strategy_with(ranks)
    server_a = {k: strategy.adapter[k].clone() for k in a_keys(strategy.adapter)}
    g = torch.Generator().manual_seed(3)
    for server_round in (1, 2, 3):
        # Execute
        messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid=None))
        for msg in messages:
            node = strategy.nodes[msg.metadata.dst_node_id]
            local = {
                k: torch.full_like(v, 99.0) for k, v in resize_rank(initial_adapter(4), node.rank).items()
            }  # stale client values
            sent = protocol.decode_instruction(msg.content)
            start = start_state(local, sent.tensors, plan=sent.plan, kept=None)
            # Assert: the first r_k rows of the server's r_max A, bit-identical
            for key, a in server_a.items():
                assert torch.equal(start[key], a[: node.rank])
        strategy.aggregate_train(server_round, replies_for(strategy, server_round, g))
        assert all(torch.equal(strategy.adapter[k], a) for k, a in server_a.items())  # A never changes


@SETTINGS
@given(max_rank=st.integers(1, 6), dim=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_seeded_a_of_a_smaller_rank_is_a_prefix_of_the_max_rank_draw(max_rank, dim, seed):
    state = {"m.q.lora_A.weight": torch.zeros(max_rank, dim), "m.q.lora_B.weight": torch.zeros(dim, max_rank)}

    full = seeded_tensors(state, ["m.q.lora_A.weight"], seed=seed)["m.q.lora_A.weight"]
    again = seeded_tensors(state, ["m.q.lora_A.weight"], seed=seed)["m.q.lora_A.weight"]

    assert torch.equal(full, again) and torch.count_nonzero(full) == full.numel()
    for rank in range(1, max_rank + 1):
        client = seeded_tensors(resize_rank(state, rank), ["m.q.lora_A.weight"], seed=seed, seed_rank=max_rank)[
            "m.q.lora_A.weight"
        ]
        assert torch.equal(client, full[:rank])


# ------------------------------------------------------------------------------ exactness
sizes = draw.sizes(spare=True)


@SETTINGS
@given(sz=sizes)
def test_b_bar_times_the_shared_a_is_the_ideal_update(sz):
    # Prepare: A shared (rank r_max), each client trains the B of its rank r_k and uses A[:r_k]
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    r_max = max(ranks) + sz["spare"]
    shared_a = torch.randn(r_max, sz["d_in"], generator=g, dtype=torch.float64)
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (len(ranks),), generator=g).double()
    weights = counts / counts.sum()
    # Execute
    b_bar = ffa_aggregate(lora_bs, weights, rank=r_max)
    # Assert
    ideal = ideal_delta([shared_a[:r] for r in ranks], lora_bs, weights, scalings=[1.0] * len(ranks))
    assert b_bar.shape == (sz["d_out"], r_max)
    torch.testing.assert_close(b_bar @ shared_a, ideal, rtol=0, atol=1e-10)


@SETTINGS
@given(sz=sizes)
def test_whole_adapter_rule_keeps_a_averages_b_and_heads_with_zero_residual(sz):
    # Prepare
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    r_max = max(ranks) + sz["spare"]
    shared = {
        "m.q.lora_A.weight": torch.randn(r_max, sz["d_in"], generator=g, dtype=torch.float64),
        "m.q.lora_B.weight": torch.randn(sz["d_out"], r_max, generator=g, dtype=torch.float64),
        HEAD: torch.randn(2, sz["d_in"], generator=g, dtype=torch.float64),
    }
    uploads = [
        {
            "m.q.lora_B.weight": torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64),
            HEAD: torch.randn(2, sz["d_in"], generator=g, dtype=torch.float64),
        }
        for r in ranks
    ]
    counts = torch.randint(1, 100, (len(ranks),), generator=g).double()
    weights = counts / counts.sum()
    # Execute
    out, residual = ffa(uploads, weights, shared=shared, rank=r_max)
    # Assert
    assert torch.equal(out["m.q.lora_A.weight"], shared["m.q.lora_A.weight"])
    assert torch.equal(
        out["m.q.lora_B.weight"], ffa_aggregate([u["m.q.lora_B.weight"] for u in uploads], weights, rank=r_max)
    )
    torch.testing.assert_close(
        out[HEAD], sum(p * u[HEAD] for p, u in zip(weights.tolist(), uploads)), rtol=0, atol=1e-12
    )
    assert residual < 1e-12


def test_aggregate_train_leaves_a_and_reports_a_zero_residual():
    # Prepare
    strategy = strategy_with({0: 2, 1: 4, 2: 3})
    before_a = {k: strategy.adapter[k].clone() for k in a_keys(strategy.adapter)}
    replies = replies_for(strategy, 1, torch.Generator().manual_seed(0))
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    assert not strategy.reports[1].rejected and len(strategy.reports[1].clients) == 3
    assert all(torch.equal(strategy.adapter[k], a) for k, a in before_a.items())
    assert set(from_record(arrays)) == set(strategy.adapter)
    assert strategy.reports[1].extra["residual"] < 1e-6  # float32 adapter


def test_state_dict_round_trip_keeps_the_a_seed():
    strategy = strategy_with({0: 2}, seed=5)
    other = strategy_with({0: 2}, seed=0)

    other.load_state_dict(strategy.state_dict())

    assert other.a_seed == strategy.a_seed == 5 + 7919
    assert all(torch.equal(other.adapter[k], v) for k, v in strategy.adapter.items())


# ------------------------------------------------------------------------------ communication
def test_uplink_is_about_half_of_fedits():
    # Prepare: square layers, so |A| = |B|; the head is the same for both rules
    adapter = initial_adapter(4, dim=8)
    ffa_rule, fedit_rule = FFALoRA(adapter, clients_per_round=1, seed=0), FedIT(adapter, clients_per_round=1, seed=0)
    head_bytes = state_nbytes({HEAD: adapter[HEAD]})
    for rank in (1, 2, 4):
        sized = resize_rank(adapter, rank)
        # Execute
        ffa_bytes = state_nbytes({k: sized[k] for k in draw.upload_keys_at(ffa_rule, rank)})
        fedit_bytes = state_nbytes({k: sized[k] for k in draw.upload_keys_at(fedit_rule, rank)})
        # Assert
        assert 2 * (ffa_bytes - head_bytes) == fedit_bytes - head_bytes
        assert 0.5 <= ffa_bytes / fedit_bytes < 0.75


def test_measured_uplink_and_downlink_bytes_exclude_a():
    strategy = strategy_with({0: 2, 1: 4})
    replies = replies_for(strategy, 1, torch.Generator().manual_seed(0))

    strategy.aggregate_train(1, replies)

    report = strategy.reports[1]
    for node_id, node in strategy.nodes.items():
        expected = state_nbytes(
            {k: v for k, v in resize_rank(strategy.adapter, node.rank).items() if not k.endswith(LORA_A_SUFFIX)}
        )
        assert report.bytes_up[node_id] == report.bytes_down[node_id] == expected
