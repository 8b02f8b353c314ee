"""RoLoRA: docs/methods.md, invariant 10 — one factor trains per round, alternating; the aggregate is exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedpeft.protocol import wire as protocol
from fedpeft.strategies.rolora import RoLoRA, rolora_aggregate, trained_factor
from tests.strategies import draw, replies


def explicit(weights, products):
    return sum(p * m for p, m in zip(weights.tolist(), products))


def weights_for(g, k):
    counts = torch.randint(1, 100, (k,), generator=g).double()
    return counts / counts.sum()


# ------------------------------------------------------------------------------ alternation
def test_odd_rounds_train_b_and_even_rounds_train_a():
    assert [trained_factor(t) for t in range(1, 7)] == ["lora_B", "lora_A"] * 3
    with pytest.raises(ValueError, match="count from 1"):
        trained_factor(0)
    with pytest.raises(ValueError, match="factor must be one of"):
        rolora_aggregate([torch.zeros(2, 2)], torch.ones(1, dtype=torch.float64), factor="lora_C", rank=2)


# ------------------------------------------------------------------------------ invariant 10: exactness
@draw.SETTINGS
@given(sz=draw.sizes())
def test_a_b_round_is_exact_with_the_shared_a(sz):
    # Prepare: A frozen at the shared Ā (r_max); client k uses its first r_k rows and trains B_k
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    shared_a = torch.randn(max(ranks), sz["d_in"], generator=g, dtype=torch.float64)
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    weights = weights_for(g, len(ranks))
    # Execute
    lora_b = rolora_aggregate(lora_bs, weights, factor="lora_B", rank=max(ranks))
    # Assert
    assert lora_b.shape == (sz["d_out"], max(ranks))
    torch.testing.assert_close(
        lora_b @ shared_a, explicit(weights, [b @ shared_a[: b.shape[1]] for b in lora_bs]), rtol=0, atol=1e-10
    )


@draw.SETTINGS
@given(sz=draw.sizes())
def test_an_a_round_is_exact_with_the_shared_b(sz):
    # Prepare: B frozen at the shared B̄ (r_max); client k uses its first r_k columns and trains A_k
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    shared_b = torch.randn(sz["d_out"], max(ranks), generator=g, dtype=torch.float64)
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for r in ranks]
    weights = weights_for(g, len(ranks))
    # Execute
    lora_a = rolora_aggregate(lora_as, weights, factor="lora_A", rank=max(ranks))
    # Assert
    assert lora_a.shape == (max(ranks), sz["d_in"])
    torch.testing.assert_close(
        shared_b @ lora_a, explicit(weights, [shared_b[:, : a.shape[0]] @ a for a in lora_as]), rtol=0, atol=1e-10
    )


@draw.SETTINGS
@given(sz=draw.sizes(), rounds=st.integers(2, 6))
def test_over_alternating_rounds_the_frozen_factor_never_moves_and_every_round_is_exact(sz, rounds):
    # Prepare: clients move only the factor of the round, from the shared one
    g = torch.Generator().manual_seed(sz["seed"])
    r, k = sz["ranks"][0], sz["clients"]
    lora_a = torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64)
    lora_b = torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64)
    for t in range(1, rounds + 1):
        factor = trained_factor(t)
        weights = weights_for(g, k)
        shared = lora_a if factor == "lora_B" else lora_b
        moving = lora_b if factor == "lora_B" else lora_a
        trained = [moving + torch.randn(moving.shape, generator=g, dtype=torch.float64) for _ in range(k)]
        # Execute
        new = rolora_aggregate(trained, weights, factor=factor, rank=r)
        # Assert
        if factor == "lora_B":
            torch.testing.assert_close(
                new @ shared, explicit(weights, [b @ shared for b in trained]), rtol=0, atol=1e-10
            )
            lora_b = new
        else:
            torch.testing.assert_close(
                shared @ new, explicit(weights, [shared @ a for a in trained]), rtol=0, atol=1e-10
            )
            lora_a = new
        assert (lora_a if factor == "lora_B" else lora_b) is shared  # the frozen factor is the same object


# ------------------------------------------------------------------------------ the strategy (mock replies)
def rolora_with(ranks, *, clients_per_round: int) -> RoLoRA:
    strategy = RoLoRA(replies.initial_adapter(max(ranks)), clients_per_round=clients_per_round, seed=3)
    strategy.register_nodes(replies.nodes(ranks))
    return strategy


def test_each_round_uploads_exactly_one_factor_and_sends_the_other_identically_to_all():
    # Prepare: heterogeneous ranks, 3 of 4 nodes per round
    strategy = rolora_with([4, 2, 3, 1], clients_per_round=3)
    g = torch.Generator().manual_seed(2)
    for server_round in range(1, 7):
        trained = ".lora_B.weight" if server_round % 2 else ".lora_A.weight"
        frozen = ".lora_A.weight" if server_round % 2 else ".lora_B.weight"
        before = {k: v.clone() for k, v in strategy.adapter.items()}
        # Execute
        messages, sent = replies.play_round(strategy, server_round, g)
        # Assert: uploads hold the trained factor (and head) only; the frozen one is the server's, prefix by prefix
        for msg, rep in zip(messages, sent):
            node = strategy.nodes[msg.metadata.dst_node_id]
            instruction = protocol.decode_instruction(msg.content)
            group = instruction.plan.group_of(f"m.layer0.q{frozen}")
            assert (group.train, group.upload) == (False, False)
            assert {k for k in strategy.upload_keys(node, instruction.plan) if "lora" in k} == {
                f"{m}{trained}" for m in replies.LAYERS
            }
            assert set(protocol.decode_reply(rep.content)[0]) == {f"{m}{trained}" for m in replies.LAYERS} | {
                replies.HEAD
            }
            for m in replies.LAYERS:
                dim = 0 if frozen == ".lora_A.weight" else 1
                assert torch.equal(
                    instruction.tensors[f"{m}{frozen}"], before[f"{m}{frozen}"].narrow(dim, 0, node.rank)
                )
        for m in replies.LAYERS:  # the frozen factor did not move on the server
            assert torch.equal(strategy.adapter[f"{m}{frozen}"], before[f"{m}{frozen}"])
        assert strategy.reports[server_round].extra["residual"] < 1e-6  # exact every round
        assert strategy.reports[server_round].extra["trained_factor_is_b"] == float(server_round % 2)
