"""Adapter tensors <-> Flower records, pairing by exact key, rank resizing, deterministic A."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.records import exact_product, from_record, lora_rank, resize_rank, seeded_lora_a, split_state, stack_to_delta, state_nbytes, to_record


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


def test_lora_rank_reads_rank_even_when_it_equals_a_dimension():
    state = adapter(4)  # rank 4 == d_in of lora_head: shape-based A/B detection would break
    assert lora_rank(state) == 4


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


def test_seeded_lora_a_is_deterministic_and_prefix_consistent():
    full = seeded_lora_a(adapter(8), seed=11)
    again = seeded_lora_a(adapter(8, seed=3), seed=11)
    assert torch.equal(full["m.layer0.q.lora_A.weight"], again["m.layer0.q.lora_A.weight"])
    assert not torch.equal(full["m.layer0.q.lora_A.weight"], seeded_lora_a(adapter(8), seed=12)["m.layer0.q.lora_A.weight"])
    assert torch.equal(full["m.classifier.weight"], adapter(8)["m.classifier.weight"])  # only A is redrawn
    bound = 1 / 6**0.5
    assert full["m.layer0.q.lora_A.weight"].abs().max() <= bound


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(1, 8), seed=st.integers(0, 1000))
def test_exact_product_equals_matmul(rank, seed):
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(7, rank, generator=g, dtype=torch.float64), torch.randn(rank, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(exact_product(b, a), b @ a, rtol=1e-12, atol=1e-12)


def test_stack_to_delta_maps_modules():
    state = {k: v for k, v in adapter(3).items() if "lora" in k.split(".")[-2]}
    deltas = stack_to_delta(state)
    assert set(deltas) == {"m.layer0.q", "m.lora_head"}
    torch.testing.assert_close(deltas["m.layer0.q"], (state["m.layer0.q.lora_B.weight"] @ state["m.layer0.q.lora_A.weight"]).double())
