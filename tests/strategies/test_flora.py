"""FLoRA stacking (the pure math): docs/methods.md, invariant 1 with heterogeneous ranks and scalings.

The strategy class (merge into the base, re-init, catch-up of missed stacks) is covered by
``test_flora_exact.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.protocol.records import exact_product
from fedpeft.strategies.flora import stack_pair, stacked_delta
from fedpeft.strategies.lora_math import ideal_delta

SETTINGS = settings(max_examples=50, deadline=None)

sizes = st.fixed_dictionaries(
    {
        "clients": st.integers(1, 5),
        "d_in": st.integers(1, 7),
        "d_out": st.integers(1, 7),
        "ranks": st.lists(st.integers(1, 6), min_size=5, max_size=5),
        "scalings": st.lists(st.floats(0.05, 8.0), min_size=5, max_size=5),
        "seed": st.integers(0, 10_000),
    }
)


def factors(sz):
    """Random float64 factors of heterogeneous ranks (both random), weights and scalings."""
    g = torch.Generator().manual_seed(sz["seed"])
    k = sz["clients"]
    ranks = sz["ranks"][:k]
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for r in ranks]
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (k,), generator=g).double()
    return lora_as, lora_bs, counts / counts.sum(), sz["scalings"][:k], ranks


@SETTINGS
@given(sz=sizes)
def test_stacked_product_is_the_ideal_update(sz):
    # Prepare
    lora_as, lora_bs, weights, scalings, ranks = factors(sz)
    # Execute
    a_stack, b_stack = stack_pair(lora_as, lora_bs, weights, scalings=scalings)
    delta_w = stacked_delta(a_stack, b_stack)
    # Assert
    assert a_stack.shape == (sum(ranks), sz["d_in"]) and b_stack.shape == (sz["d_out"], sum(ranks))
    expected = sum(p * s * (b @ a) for p, s, a, b in zip(weights.tolist(), scalings, lora_as, lora_bs))
    torch.testing.assert_close(delta_w, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(delta_w, ideal_delta(lora_as, lora_bs, weights, scalings=scalings), rtol=0, atol=1e-10)


@SETTINGS
@given(sz=sizes)
def test_blocks_keep_the_client_order_in_both_factors(sz):
    lora_as, lora_bs, weights, scalings, ranks = factors(sz)

    a_stack, b_stack = stack_pair(lora_as, lora_bs, weights, scalings=scalings)

    start = 0
    for p, s, a, b, r in zip(weights.tolist(), scalings, lora_as, lora_bs, ranks):
        torch.testing.assert_close(a_stack[start : start + r], (p * s) * a, rtol=0, atol=1e-15)
        assert torch.equal(b_stack[:, start : start + r], b)  # B travels as it is; p_k s_k is folded into A
        start += r


def test_stacking_a_shuffled_client_order_gives_the_same_update():
    sz = {
        "clients": 4,
        "d_in": 5,
        "d_out": 3,
        "ranks": [1, 3, 2, 4, 1],
        "scalings": [0.5, 2.0, 1.0, 4.0, 1.0],
        "seed": 11,
    }
    lora_as, lora_bs, weights, scalings, _ = factors(sz)
    perm = [2, 0, 3, 1]

    delta = stacked_delta(*stack_pair(lora_as, lora_bs, weights, scalings=scalings))
    delta_perm = stacked_delta(
        *stack_pair(
            [lora_as[i] for i in perm], [lora_bs[i] for i in perm], weights[perm], scalings=[scalings[i] for i in perm]
        )
    )

    torch.testing.assert_close(delta_perm, delta, rtol=0, atol=1e-12)


def test_one_client_with_unit_weight_and_scaling_stacks_to_itself():
    g = torch.Generator().manual_seed(0)
    lora_a, lora_b = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )

    a_stack, b_stack = stack_pair([lora_a], [lora_b], torch.ones(1, dtype=torch.float64), scalings=[1.0])

    assert torch.equal(a_stack, lora_a) and torch.equal(b_stack, lora_b)
    torch.testing.assert_close(stacked_delta(a_stack, b_stack), lora_b @ lora_a, rtol=0, atol=1e-12)


def test_a_rank_equal_to_a_dimension_is_not_mistaken_for_the_other_factor():
    """FederatedLLM tells A from B by ``shape[0] == rank``; here r = d_in = d_out for one client."""
    sz = {"clients": 2, "d_in": 3, "d_out": 3, "ranks": [3, 1, 1, 1, 1], "scalings": [2.0, 0.5, 1, 1, 1], "seed": 4}
    lora_as, lora_bs, weights, scalings, _ = factors(sz)

    delta = stacked_delta(*stack_pair(lora_as, lora_bs, weights, scalings=scalings))

    torch.testing.assert_close(delta, ideal_delta(lora_as, lora_bs, weights, scalings=scalings), rtol=0, atol=1e-12)


def test_stacked_delta_is_float64_and_bit_reproducible():
    g = torch.Generator().manual_seed(2)
    a_stack, b_stack = torch.randn(6, 4, generator=g), torch.randn(5, 6, generator=g)  # float32 on the wire

    delta = stacked_delta(a_stack, b_stack)

    assert delta.dtype == torch.float64
    assert torch.equal(delta, stacked_delta(a_stack.clone(), b_stack.clone())) and torch.equal(
        delta, exact_product(b_stack, a_stack)
    )
    torch.testing.assert_close(delta, b_stack.double() @ a_stack.double(), rtol=0, atol=1e-12)


def test_stack_pair_refuses_unnormalised_weights():
    lora_as, lora_bs = [torch.ones(1, 2), torch.ones(1, 2)], [torch.ones(2, 1), torch.ones(2, 1)]

    with pytest.raises(ValueError, match="sum to 1"):
        stack_pair(lora_as, lora_bs, torch.tensor([3.0, 5.0], dtype=torch.float64), scalings=[1.0, 1.0])
