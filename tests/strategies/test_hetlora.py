"""HetLoRA: sparsity weights ∝ n_k ‖s_k B_k A_k‖_F from the factors, normalised; zero-padded average."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedpeft.protocol import wire as protocol
from fedpeft.strategies.hetlora import HetLoRA, client_norm, hetlora, product_norm, sparsity_weights
from tests.strategies import draw, replies


def clients(sz):
    g = torch.Generator().manual_seed(sz["seed"])
    ranks = sz["ranks"][: sz["clients"]]
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for r in ranks]
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (len(ranks),), generator=g).tolist()
    return lora_as, lora_bs, counts


@draw.SETTINGS
@given(sz=draw.sizes())
def test_the_norm_from_factors_is_the_dense_frobenius_norm(sz):
    lora_as, lora_bs, _ = clients(sz)

    for a, b in zip(lora_as, lora_bs):
        assert product_norm(a, b) == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-10, abs=1e-12)


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=st.sampled_from([0.5, 2.0, 16.0]))
def test_sparsity_weights_sum_to_one_and_follow_examples_times_update_norm(sz, scaling):
    # Prepare: two layers per client, the oracle from dense products
    lora_as, lora_bs, counts = clients(sz)
    states = [
        {"m.q.lora_A.weight": a, "m.q.lora_B.weight": b, "m.v.lora_A.weight": 2 * a, "m.v.lora_B.weight": b}
        for a, b in zip(lora_as, lora_bs)
    ]
    dense = [
        scaling * float(torch.cat([(b @ a).flatten(), (b @ (2 * a)).flatten()]).norm())
        for a, b in zip(lora_as, lora_bs)
    ]
    # Execute
    weights = sparsity_weights([client_norm(s, scaling=scaling) for s in states], counts)
    # Assert
    assert weights.dtype == torch.float64 and float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    raw = [n * d for n, d in zip(counts, dense)]
    for w, x in zip(weights.tolist(), raw):
        assert w == pytest.approx(x / sum(raw), rel=1e-9)


def test_all_zero_updates_fall_back_to_data_weights_and_bad_input_is_refused():
    assert torch.equal(sparsity_weights([0.0, 0.0], [1, 3]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.equal(sparsity_weights([2.0, 0.0], [1, 3]), torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="one norm per client"):
        sparsity_weights([1.0], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        sparsity_weights([1.0, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="different ranks"):
        product_norm(torch.zeros(2, 3), torch.zeros(4, 3))


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=st.sampled_from([0.5, 2.0]))
def test_the_global_adapter_is_the_sparsity_weighted_zero_padded_average(sz, scaling):
    # Prepare
    lora_as, lora_bs, counts = clients(sz)
    states = [{draw.A: a, draw.B: b, draw.HEAD: a[:1]} for a, b in zip(lora_as, lora_bs)]
    r_max = max(a.shape[0] for a in lora_as)
    raw = [n * scaling * float(torch.linalg.matrix_norm(b @ a)) for n, a, b in zip(counts, lora_as, lora_bs)]
    oracle = [x / sum(raw) for x in raw]
    # Execute
    out, weights = hetlora(states, counts, scaling=scaling, rank=r_max)
    # Assert
    torch.testing.assert_close(weights, torch.tensor(oracle, dtype=torch.float64), rtol=1e-9, atol=0)
    pad_a = [torch.cat([a, torch.zeros(r_max - a.shape[0], a.shape[1], dtype=torch.float64)]) for a in lora_as]
    pad_b = [torch.cat([b, torch.zeros(b.shape[0], r_max - b.shape[1], dtype=torch.float64)], dim=1) for b in lora_bs]
    torch.testing.assert_close(out[draw.A], sum(w * a for w, a in zip(oracle, pad_a)), rtol=0, atol=1e-10)
    torch.testing.assert_close(out[draw.B], sum(w * b for w, b in zip(oracle, pad_b)), rtol=0, atol=1e-10)
    torch.testing.assert_close(out[draw.HEAD], sum(w * a[:1] for w, a in zip(oracle, lora_as)), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ the strategy (mock replies)
def test_aggregate_train_uses_the_sparsity_weights_and_each_client_gets_its_prefix():
    # Prepare
    ranks = [4, 1, 3]
    strategy = HetLoRA(replies.initial_adapter(4), clients_per_round=3, seed=0, scaling=2.0)
    strategy.register_nodes(replies.nodes(ranks))
    g = torch.Generator().manual_seed(7)
    # Execute
    messages, sent = replies.play_round(strategy, 1, g)
    # Assert
    uploads = [protocol.decode_reply(r.content)[0] for r in sent]
    counts = [strategy.nodes[m.metadata.dst_node_id].num_examples for m in messages]
    expected, weights = hetlora(uploads, counts, scaling=2.0, rank=4)
    assert all(torch.equal(strategy.adapter[k], v) for k, v in expected.items())
    assert strategy.reports[1].extra["max_weight"] == pytest.approx(float(weights.max()))
    for msg in replies.train_messages(strategy, 2):
        node = strategy.nodes[msg.metadata.dst_node_id]
        tensors = protocol.decode_instruction(msg.content).tensors
        assert torch.equal(tensors["m.layer0.q.lora_A.weight"], expected["m.layer0.q.lora_A.weight"][: node.rank])
        assert torch.equal(tensors["m.layer0.q.lora_B.weight"], expected["m.layer0.q.lora_B.weight"][:, : node.rank])
