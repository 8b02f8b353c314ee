"""FedSVD: docs/methods.md, invariant 11 — B_new A_new = B̄ A exactly and A_new has orthonormal rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fedpeft.protocol import wire as protocol
from fedpeft.strategies.fedsvd import FedSVD, fedsvd_pair, svd_refactor
from tests.strategies import draw, replies


def layer(sz):
    """A shared A (r_max ≤ d_in) and clients' B of ranks r_k ≤ r_max, both random; weights."""
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    r_max = max(ranks)
    assume(r_max <= sz["d_in"])
    lora_a = torch.randn(r_max, sz["d_in"], generator=g, dtype=torch.float64)
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (len(ranks),), generator=g).double()
    return lora_a, lora_bs, counts / counts.sum()


def b_bar_times_a(lora_a, lora_bs, weights):
    """Oracle: Σ_k p_k B_k A[:r_k] (dense, one client at a time)."""
    return sum(p * (b @ lora_a[: b.shape[1]]) for p, b in zip(weights.tolist(), lora_bs))


sizes = draw.sizes().map(lambda sz: {**sz, "d_in": sz["d_in"] + 4})  # mostly r_max ≤ d_in


# ------------------------------------------------------------------------------ invariant 11
@draw.SETTINGS
@given(sz=sizes)
def test_the_refactored_product_is_b_bar_a_and_a_is_orthonormal(sz):
    # Prepare
    lora_a, lora_bs, weights = layer(sz)
    r = lora_a.shape[0]
    # Execute
    a_new, b_new = fedsvd_pair(lora_bs, weights, lora_a=lora_a)
    # Assert
    assert a_new.shape == lora_a.shape and b_new.shape == (sz["d_out"], r)
    torch.testing.assert_close(b_new @ a_new, b_bar_times_a(lora_a, lora_bs, weights), rtol=0, atol=1e-10)
    torch.testing.assert_close(a_new @ a_new.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)


@draw.SETTINGS
@given(sz=sizes, keep=st.integers(1, 5))
def test_a_prefix_of_the_new_factors_is_the_best_low_rank_fit(sz, keep):
    # Prepare: a rank-r_k client takes the first r_k singular directions
    lora_a, lora_bs, weights = layer(sz)
    target = b_bar_times_a(lora_a, lora_bs, weights)
    sigma = torch.linalg.svdvals(target)
    k = min(keep, lora_a.shape[0])
    # Execute
    a_new, b_new = fedsvd_pair(lora_bs, weights, lora_a=lora_a)
    # Assert: ‖B̄A − B[:, :k] A[:k]‖² = Σ_{i>k} σ_i²
    error = float((target - b_new[:, :k] @ a_new[:k]).pow(2).sum())
    assert error == pytest.approx(float(sigma[k:].pow(2).sum()), abs=1e-9 * max(1.0, float(sigma[0]) ** 2))


@draw.SETTINGS
@given(sz=sizes)
def test_refactoring_twice_changes_nothing(sz):
    # A fixed point: once A is the right singular basis, another SVD keeps the product and orthonormality
    lora_a, lora_bs, weights = layer(sz)
    a_new, b_new = fedsvd_pair(lora_bs, weights, lora_a=lora_a)

    a_again, b_again = svd_refactor(b_new, a_new)

    torch.testing.assert_close(b_again @ a_again, b_new @ a_new, rtol=0, atol=1e-10)
    torch.testing.assert_close(a_again @ a_again.T, torch.eye(a_new.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


def test_a_rank_above_d_in_and_mismatched_factors_are_refused():
    with pytest.raises(ValueError, match="rank <= d_in"):
        svd_refactor(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="different ranks"):
        svd_refactor(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="sum to 1"):
        fedsvd_pair(
            [torch.zeros(3, 2, dtype=torch.float64)] * 2,
            torch.ones(2, dtype=torch.float64),
            lora_a=torch.zeros(2, 5, dtype=torch.float64),
        )


# ------------------------------------------------------------------------------ the strategy (mock replies)
def fedsvd_with(ranks, *, clients_per_round: int) -> FedSVD:
    strategy = FedSVD(replies.initial_adapter(max(ranks)), clients_per_round=clients_per_round, seed=3)
    strategy.register_nodes(replies.nodes(ranks))
    return strategy


def test_a_is_seeded_then_the_svd_basis_and_never_trained_nor_uploaded():
    # Prepare
    strategy = fedsvd_with([4, 2, 3], clients_per_round=2)
    g = torch.Generator().manual_seed(4)
    for server_round in range(1, 4):
        before = {k: v.clone() for k, v in strategy.adapter.items()}
        # Execute
        messages, sent = replies.play_round(strategy, server_round, g)
        # Assert: round 1 regenerates A from the seed (nothing sent); later rounds send the SVD basis
        for msg, rep in zip(messages, sent):
            node = strategy.nodes[msg.metadata.dst_node_id]
            instruction = protocol.decode_instruction(msg.content)
            group = instruction.plan.group_of("m.layer0.q.lora_A.weight")
            assert (group.train, group.upload) == (False, False)
            assert group.source == (protocol.Source.SEED if server_round == 1 else protocol.Source.MESSAGE)
            assert set(protocol.decode_reply(rep.content)[0]) == {f"{m}.lora_B.weight" for m in replies.LAYERS} | {
                replies.HEAD
            }
            if server_round > 1:
                assert torch.equal(
                    instruction.tensors["m.layer0.q.lora_A.weight"], before["m.layer0.q.lora_A.weight"][: node.rank]
                )
        # the new factors: B_new A_new = B̄ A_prev, rows of A orthonormal
        uploads = [protocol.decode_reply(r.content)[0] for r in sent]
        counts = torch.tensor(
            [float(strategy.nodes[m.metadata.dst_node_id].num_examples) for m in messages], dtype=torch.float64
        )
        weights = counts / counts.sum()
        for m in replies.LAYERS:
            a_prev = before[f"{m}.lora_A.weight"].double()
            target = sum(
                p * u[f"{m}.lora_B.weight"].double() @ a_prev[: u[f"{m}.lora_B.weight"].shape[1]]
                for p, u in zip(weights.tolist(), uploads)
            )
            a, b = strategy.adapter[f"{m}.lora_A.weight"].double(), strategy.adapter[f"{m}.lora_B.weight"].double()
            torch.testing.assert_close(b @ a, target, rtol=0, atol=1e-5 * max(1.0, float(target.norm())))
            torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-6)
        assert strategy.reports[server_round].extra["a_orthogonality_error"] < 1e-6


def test_a_rank_above_a_layers_input_width_is_refused_at_start():
    with pytest.raises(ValueError, match=r"fedsvd needs rank <= d_in.*rank 9"):
        FedSVD(replies.initial_adapter(9, d_in=8), clients_per_round=1, seed=0)


def test_fedsvd_state_survives_a_checkpoint():
    strategy = fedsvd_with([4, 4], clients_per_round=2)
    replies.play_round(strategy, 1, torch.Generator().manual_seed(0))
    copy = fedsvd_with([4, 4], clients_per_round=2)

    copy.load_state_dict(strategy.state_dict())

    assert copy.refactored and copy.a_seed == strategy.a_seed
    assert all(torch.equal(copy.adapter[k], v) for k, v in strategy.adapter.items())
    plan = copy.plan(copy.nodes[100], 2)
    assert plan.group_of("m.layer0.q.lora_A.weight").source == protocol.Source.MESSAGE
