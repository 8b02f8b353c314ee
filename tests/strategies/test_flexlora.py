"""FlexLoRA: docs/methods.md, invariant 8 — the factored SVD is the dense SVD; each client gets G's best fit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import state_nbytes
from fedpeft.strategies.flexlora import FlexLoRA, factored_svd, rank_approximation
from fedpeft.strategies.flora import stack_pair
from tests.strategies import draw, replies

scalings = st.sampled_from([0.5, 1.0, 2.0, 16.0])


def global_update(sz, scaling):
    """``G = P Q`` stacked from random clients of heterogeneous ranks, and G dense (the oracle's input)."""
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for r in ranks]
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (len(ranks),), generator=g).double()
    weights = counts / counts.sum()
    q, p = stack_pair(lora_as, lora_bs, weights, scalings=[scaling] * len(ranks))
    dense = sum(w * scaling * (b @ a) for w, a, b in zip(weights.tolist(), lora_as, lora_bs))
    return p, q, dense


def dense_truncation(dense: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


# ------------------------------------------------------------------------------ invariant 8
@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings, rank=st.integers(1, 8))
def test_the_factored_svd_equals_the_dense_svd_and_its_truncation(sz, scaling, rank):
    # Prepare
    p, q, dense = global_update(sz, scaling)
    dense_sigma = torch.linalg.svdvals(dense)
    scale = max(1.0, float(dense_sigma[0]))
    # Execute
    u, sigma, vh = factored_svd(p, q)
    # Assert: the same singular values, the same matrix, orthonormal singular vectors
    m = min(sz["d_out"], sz["d_in"], p.shape[1])
    assert sigma.shape == (m,) and u.shape == (sz["d_out"], m) and vh.shape == (m, sz["d_in"])
    torch.testing.assert_close(sigma, dense_sigma[:m], rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(u @ torch.diag(sigma) @ vh, dense, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(u.T @ u, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(vh @ vh.T, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-10)
    # the truncation is unique only when σ_rank > σ_rank+1
    k = min(rank, m)
    assume(k == m or float(dense_sigma[k - 1] - dense_sigma[k]) > 1e-6 * scale)
    truncated = u[:, :k] @ torch.diag(sigma[:k]) @ vh[:k]
    torch.testing.assert_close(truncated, dense_truncation(dense, k), rtol=0, atol=1e-8 * scale)


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings, client_scaling=scalings, rank=st.integers(1, 8))
def test_a_clients_approximation_error_is_the_tail_of_the_spectrum(sz, scaling, client_scaling, rank):
    # Prepare
    p, q, dense = global_update(sz, scaling)
    dense_sigma = torch.linalg.svdvals(dense)
    # Execute
    lora_a, lora_b = rank_approximation(*factored_svd(p, q), rank=rank, scaling=client_scaling)
    # Assert: ‖G − s_k B_k A_k‖²_F = Σ_{i>r_k} σ_i²  (Eckart-Young)
    assert lora_a.shape == (rank, sz["d_in"]) and lora_b.shape == (sz["d_out"], rank)
    error = float((dense - client_scaling * lora_b @ lora_a).pow(2).sum())
    tail = float(dense_sigma[rank:].pow(2).sum())
    assert error == pytest.approx(tail, abs=1e-9 * max(1.0, float(dense_sigma[0]) ** 2))


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings, client_scaling=scalings, spare=st.integers(0, 3))
def test_a_client_whose_rank_reaches_rank_g_receives_g_exactly(sz, scaling, client_scaling, spare):
    # Prepare: rank(G) ≤ min(d_out, d_in, Σ r_k)
    p, q, dense = global_update(sz, scaling)
    rank = min(sz["d_out"], sz["d_in"], p.shape[1]) + spare
    # Execute
    lora_a, lora_b = rank_approximation(*factored_svd(p, q), rank=rank, scaling=client_scaling)
    # Assert
    torch.testing.assert_close(
        client_scaling * lora_b @ lora_a, dense, rtol=0, atol=1e-10 * max(1.0, float(dense.norm()))
    )


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings, client_scaling=scalings, rank=st.integers(1, 8))
def test_sigma_is_split_evenly_between_the_factors(sz, scaling, client_scaling, rank):
    # The convention of the docstring: component i of both factors has norm sqrt(σ_i / s_k).
    p, q, dense = global_update(sz, scaling)
    dense_sigma = torch.linalg.svdvals(dense)

    lora_a, lora_b = rank_approximation(*factored_svd(p, q), rank=rank, scaling=client_scaling)

    k = min(rank, dense_sigma.shape[0])
    expected = (dense_sigma[:k] / client_scaling).sqrt()
    torch.testing.assert_close(lora_b.norm(dim=0)[:k], expected, rtol=0, atol=1e-7 * max(1.0, float(expected.max())))
    torch.testing.assert_close(lora_a.norm(dim=1)[:k], expected, rtol=0, atol=1e-7 * max(1.0, float(expected.max())))
    assert torch.count_nonzero(lora_a[k:]) == 0 and torch.count_nonzero(lora_b[:, k:]) == 0


def test_a_known_rank_one_update():
    # G = 6 · e_1 f_1ᵀ with s_k = 1.5: the client gets B = 2 e_1, A = 2 f_1ᵀ (up to a common sign)
    p = torch.tensor([[3.0], [0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)

    lora_a, lora_b = rank_approximation(*factored_svd(p, q), rank=2, scaling=1.5)

    sign = torch.sign(lora_b[0, 0])
    assert torch.allclose(lora_b, sign * torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        lora_a, sign * torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64), atol=1e-12
    )
    assert math.isclose(float(1.5 * (lora_b @ lora_a)[0, 1]), 6.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="do not form a product"):
        factored_svd(torch.zeros(3, 2), torch.zeros(3, 4))
    u, sigma, vh = factored_svd(torch.ones(3, 1, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        rank_approximation(u, sigma, vh, rank=0, scaling=1.0)
    with pytest.raises(ValueError, match="scaling > 0"):
        rank_approximation(u, sigma, vh, rank=1, scaling=0.0)


# ------------------------------------------------------------------------------ the strategy
def flex_with(ranks, *, clients_per_round: int, scaling: float = 2.0) -> FlexLoRA:
    strategy = FlexLoRA(
        replies.initial_adapter(max(ranks)), clients_per_round=clients_per_round, seed=3, scaling=scaling
    )
    strategy.register_nodes(replies.nodes(ranks))
    return strategy


def test_each_client_starts_from_the_best_rank_r_k_fit_of_the_last_global_update():
    # Prepare: heterogeneous ranks, every node in every round
    ranks = [4, 1, 3, 2]
    strategy = flex_with(ranks, clients_per_round=4)
    g = torch.Generator().manual_seed(5)
    messages, sent = replies.play_round(strategy, 1, g)
    uploads = [protocol.decode_reply(r.content)[0] for r in sent]
    counts = torch.tensor(
        [float(strategy.nodes[m.metadata.dst_node_id].num_examples) for m in messages], dtype=torch.float64
    )
    weights = counts / counts.sum()
    s = strategy.scaling
    dense = {
        m: sum(
            p * s * u[f"{m}.lora_B.weight"].double() @ u[f"{m}.lora_A.weight"].double()
            for p, u in zip(weights.tolist(), uploads)
        )
        for m in replies.LAYERS
    }
    # Execute
    round_two = replies.train_messages(strategy, 2)
    # Assert: s B_k A_k = G_{r_k}, the dense SVD truncation; ‖G − s B_k A_k‖² = Σ_{i>r_k} σ_i²
    for msg in round_two:
        node = strategy.nodes[msg.metadata.dst_node_id]
        tensors = protocol.decode_instruction(msg.content).tensors
        for m, G in dense.items():
            a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
            assert a.shape == (node.rank, 8) and b.shape == (6, node.rank)
            got = s * b.double() @ a.double()
            torch.testing.assert_close(got, dense_truncation(G, node.rank), rtol=0, atol=1e-4 * float(G.norm()))
            tail = float(torch.linalg.svdvals(G)[node.rank :].pow(2).sum())
            assert float((G - got).pow(2).sum()) == pytest.approx(tail, rel=1e-3, abs=1e-6 * float(G.norm()) ** 2)
    # the global model is W + G itself, at rank Σ r_k
    global_model = strategy.global_model()
    assert global_model.rank == sum(ranks) and not global_model.base_updates
    for m, G in dense.items():
        got = (
            s
            * global_model.adapter[f"{m}.lora_B.weight"].double()
            @ global_model.adapter[f"{m}.lora_A.weight"].double()
        )
        torch.testing.assert_close(got, G, rtol=0, atol=1e-5 * float(G.norm()))
    assert strategy.reports[1].extra["residual"] < 1e-6
    assert strategy.reports[1].extra["truncation"] > 0.0  # r_max = 4 < rank(G)


def test_flexlora_bytes_are_one_adapter_each_way_and_state_survives_a_checkpoint():
    strategy = flex_with([4, 2], clients_per_round=2)
    g = torch.Generator().manual_seed(6)
    messages, sent = replies.play_round(strategy, 1, g)
    for msg, rep in zip(messages, sent):
        node = msg.metadata.dst_node_id
        assert strategy.reports[1].bytes_down[node] == state_nbytes(protocol.decode_instruction(msg.content).tensors)
        assert strategy.reports[1].bytes_up[node] == state_nbytes(protocol.decode_reply(rep.content)[0])
    copy = flex_with([4, 2], clients_per_round=2)
    copy.load_state_dict(strategy.state_dict())
    a, b = copy.global_model(), strategy.global_model()
    assert a.rank == b.rank == 6 and all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
