"""FedSA-LoRA: Ā is the example-weighted average of the A uploads; personalised evaluation summary.

METHODS.md invariant 9 (B never uploaded, a node's B bit-identical across rounds and resume) is
checked over the strategy and the node state below the math tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.fedsa_lora import fedsa_aggregate, personal_summary
from tests.strategies import draw


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
        expected = sum((p * a[i] for p, a in zip(weights.tolist(), lora_as) if i < a.shape[0]), torch.zeros(sz["d_in"], dtype=torch.float64))
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
    torch.testing.assert_close(fedsa_aggregate(lora_as, scaled / scaled.sum(), rank=max(ranks)), plain, rtol=0, atol=1e-12)


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
    assert spread == pytest.approx((sum(n * (v - expected) ** 2 for n, v in zip(counts.tolist(), values)) / float(counts.sum())) ** 0.5, abs=1e-9)


def test_the_personal_summary_of_known_values():
    mean, spread = personal_summary([0.5, 1.0], torch.tensor([0.5, 0.5], dtype=torch.float64))

    assert mean == pytest.approx(0.75) and spread == pytest.approx(0.25)
    assert personal_summary([0.8, 0.8, 0.8], torch.full((3,), 1 / 3, dtype=torch.float64))[1] == pytest.approx(0.0, abs=1e-12)
