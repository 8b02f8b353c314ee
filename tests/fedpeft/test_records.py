"""Adapter tensors <-> Flower records, pairing by exact key, rank resizing, deterministic A."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.protocol.records import (
    exact_product,
    fresh_lora,
    from_record,
    resize_rank,
    seeded_tensors,
    split_state,
    stack_to_delta,
    state_nbytes,
    to_record,
)


def adapter(rank: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.layer0.q.lora_A.weight": torch.randn(rank, 6, generator=g),
        "m.layer0.q.lora_B.weight": torch.randn(5, rank, generator=g),
        # a module whose name contains "lora" must not confuse the pairing (peft issue #3433)
        "m.lora_head.lora_A.weight": torch.randn(rank, 4, generator=g),
        "m.lora_head.lora_B.weight": torch.randn(4, rank, generator=g),
        "m.classifier.weight": torch.randn(3, 4, generator=g),
        "m.classifier.bias": torch.randn(3, generator=g),
    }


def test_record_round_trip_copies_and_preserves_values():
    state = adapter(3)
    record = to_record(state)
    back = from_record(record)
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]) and back[key].dtype == state[key].dtype
    back["m.classifier.bias"].add_(1.0)  # the record and the source are untouched
    assert torch.equal(from_record(record)["m.classifier.bias"], state["m.classifier.bias"])


def test_split_state_pairs_by_exact_suffix():
    pairs, others = split_state(adapter(2))
    assert [p.module for p in pairs] == ["m.layer0.q", "m.lora_head"]
    assert others == ["m.classifier.bias", "m.classifier.weight"]


def test_split_state_rejects_lonely_factor():
    state = adapter(2)
    del state["m.layer0.q.lora_B.weight"]
    with pytest.raises(ValueError, match="without their partner"):
        split_state(state)


def test_resize_rank_tells_factors_apart_by_key_even_when_the_rank_equals_a_dimension():
    state = adapter(4)  # rank 4 == d_in and d_out of lora_head: shape-based A/B detection would break
    cut = resize_rank(state, 2)
    assert cut["m.lora_head.lora_A.weight"].shape == (2, 4) and cut["m.lora_head.lora_B.weight"].shape == (4, 2)
    assert torch.equal(cut["m.lora_head.lora_B.weight"], state["m.lora_head.lora_B.weight"][:, :2])


def test_state_nbytes_is_numel_times_itemsize():
    state = adapter(2)
    assert state_nbytes(state) == sum(t.numel() for t in state.values()) * 4


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(1, 6), new_rank=st.integers(1, 9))
def test_resize_rank_keeps_leading_components_and_padding_keeps_product(rank, new_rank):
    state = {k: v.double() for k, v in adapter(rank).items()}
    resized = resize_rank(state, new_rank)
    a, b = resized["m.layer0.q.lora_A.weight"], resized["m.layer0.q.lora_B.weight"]
    assert a.shape == (new_rank, 6) and b.shape == (5, new_rank)
    keep = min(rank, new_rank)
    assert torch.equal(a[:keep], state["m.layer0.q.lora_A.weight"][:keep])
    if new_rank >= rank:
        original = state["m.layer0.q.lora_B.weight"] @ state["m.layer0.q.lora_A.weight"]
        torch.testing.assert_close(b @ a, original, rtol=0, atol=1e-12)


def test_fresh_lora_draws_a_deterministically_zeroes_b_and_keeps_the_head():
    full = fresh_lora(adapter(8), seed=11)
    again = fresh_lora(adapter(8, seed=3), seed=11)
    assert torch.equal(full["m.layer0.q.lora_A.weight"], again["m.layer0.q.lora_A.weight"])
    assert not torch.equal(
        full["m.layer0.q.lora_A.weight"], fresh_lora(adapter(8), seed=12)["m.layer0.q.lora_A.weight"]
    )
    assert torch.equal(full["m.classifier.weight"], adapter(8)["m.classifier.weight"])  # only A and B are reset
    assert torch.count_nonzero(full["m.layer0.q.lora_B.weight"]) == 0
    bound = 1 / 6**0.5
    assert 0 < full["m.layer0.q.lora_A.weight"].abs().max() <= bound
    # a smaller rank drawn at seed_rank 8 is the prefix of the rank-8 draw
    small = seeded_tensors(adapter(3), ["m.layer0.q.lora_A.weight", "m.lora_head.lora_A.weight"], seed=11, seed_rank=8)
    assert torch.equal(small["m.layer0.q.lora_A.weight"], full["m.layer0.q.lora_A.weight"][:3])


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(1, 8), seed=st.integers(0, 1000))
def test_exact_product_equals_matmul(rank, seed):
    g = torch.Generator().manual_seed(seed)
    b, a = (
        torch.randn(7, rank, generator=g, dtype=torch.float64),
        torch.randn(rank, 5, generator=g, dtype=torch.float64),
    )
    torch.testing.assert_close(exact_product(b, a), b @ a, rtol=1e-12, atol=1e-12)


def test_stack_to_delta_maps_modules():
    state = {k: v for k, v in adapter(3).items() if "lora" in k.split(".")[-2]}
    deltas = stack_to_delta(state)
    assert set(deltas) == {"m.layer0.q", "m.lora_head"}
    torch.testing.assert_close(
        deltas["m.layer0.q"], (state["m.layer0.q.lora_B.weight"] @ state["m.layer0.q.lora_A.weight"]).double()
    )
