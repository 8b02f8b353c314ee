"""fedpeft.strategies.lora_math: weighted sums, weight checks, rank padding, the ideal update, the residual."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.protocol.records import resize_factor
from fedpeft.strategies.lora_math import check_weights, ideal_delta, relative_residual, residual_parts, weighted_sum


def pad_a(lora_a, rank):
    return resize_factor(lora_a, rank, dim=0)


def pad_b(lora_b, rank):
    return resize_factor(lora_b, rank, dim=1)


SETTINGS = settings(max_examples=40, deadline=None)


def random_weights(count: int, g: torch.Generator) -> torch.Tensor:
    counts = torch.randint(1, 100, (count,), generator=g).double()
    return counts / counts.sum()


# ------------------------------------------------------------------------------ check_weights
def test_check_weights_accepts_normalised_weights_and_returns_them():
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)

    assert check_weights(weights, count=2) is weights


@pytest.mark.parametrize(
    ("weights", "count", "match"),
    [
        (torch.tensor([0.5, 0.5]), 3, "expected 3 weights"),
        (torch.tensor([[0.5, 0.5]]), 2, "expected 2 weights"),
        (torch.tensor([0.5, float("nan")]), 2, "finite and non-negative"),
        (torch.tensor([float("inf"), 0.0]), 2, "finite and non-negative"),
        (torch.tensor([1.5, -0.5]), 2, "finite and non-negative"),
        (torch.tensor([0.5, 0.6]), 2, "sum to 1"),
        (torch.tensor([2.0, 3.0]), 2, "sum to 1"),  # raw counts, not normalised
    ],
)
def test_check_weights_rejects_bad_weights(weights, count, match):
    with pytest.raises(ValueError, match=match):
        check_weights(weights.double(), count=count)


# ------------------------------------------------------------------------------ weighted_sum
@SETTINGS
@given(k=st.integers(1, 5), rows=st.integers(1, 6), cols=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_weighted_sum_matches_the_explicit_sum(k, rows, cols, seed):
    # Prepare
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(rows, cols, generator=g, dtype=torch.float64) for _ in range(k)]
    weights = random_weights(k, g)
    # Execute
    out = weighted_sum(tensors, weights)
    # Assert
    expected = sum(w * t for w, t in zip(weights.tolist(), tensors))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_weighted_sum_accumulates_in_float64_and_returns_the_input_dtype():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 3, generator=g) for _ in range(3)]
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)

    out = weighted_sum(tensors, weights)

    reference = sum(w * t.double() for w, t in zip(weights.tolist(), tensors)).float()
    assert out.dtype == torch.float32
    assert torch.equal(out, reference)


def test_weighted_sum_with_a_one_hot_weight_returns_that_tensor():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(3)]

    out = weighted_sum(tensors, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))

    assert torch.equal(out, tensors[1])


def test_weighted_sum_refuses_tensors_of_different_shapes_and_wrong_weights():
    tensors = [torch.zeros(2, 3), torch.zeros(3, 2)]

    with pytest.raises(ValueError, match="different shapes"):
        weighted_sum(tensors, torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="expected 2 weights"):
        weighted_sum([torch.zeros(2), torch.zeros(2)], torch.ones(1, dtype=torch.float64))


# ------------------------------------------------------------------------------ resize_factor (pad / cut)
@SETTINGS
@given(
    r=st.integers(1, 5),
    extra=st.integers(0, 4),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_padding_appends_zeros_and_keeps_the_product(r, extra, d_in, d_out, seed):
    # Prepare
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    lora_b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    # Execute
    a_pad, b_pad = pad_a(lora_a, r + extra), pad_b(lora_b, r + extra)
    # Assert
    assert a_pad.shape == (r + extra, d_in) and b_pad.shape == (d_out, r + extra)
    assert torch.equal(a_pad[:r], lora_a) and torch.equal(b_pad[:, :r], lora_b)
    assert torch.count_nonzero(a_pad[r:]) == 0 and torch.count_nonzero(b_pad[:, r:]) == 0
    torch.testing.assert_close(b_pad @ a_pad, lora_b @ lora_a, rtol=0, atol=1e-12)


@SETTINGS
@given(r=st.integers(1, 6), cut=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_cutting_keeps_the_first_components(r, cut, seed):
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(r, 3, generator=g, dtype=torch.float64)
    lora_b = torch.randn(4, r, generator=g, dtype=torch.float64)
    rank = min(cut, r)

    a_cut, b_cut = pad_a(lora_a, rank), pad_b(lora_b, rank)

    assert torch.equal(a_cut, lora_a[:rank]) and torch.equal(b_cut, lora_b[:, :rank])


def test_padding_keeps_dtype():
    assert pad_a(torch.ones(2, 3, dtype=torch.float32), 4).dtype == torch.float32
    assert pad_b(torch.ones(3, 2, dtype=torch.float64), 4).dtype == torch.float64


# ------------------------------------------------------------------------------ ideal_delta
@SETTINGS
@given(k=st.integers(1, 4), seed=st.integers(0, 10_000), scalings=st.lists(st.floats(0.1, 4.0), min_size=4, max_size=4))
def test_ideal_delta_is_the_weighted_sum_of_scaled_products(k, seed, scalings):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, 5, (k,), generator=g).tolist()
    lora_as = [torch.randn(r, 5, generator=g, dtype=torch.float64) for r in ranks]
    lora_bs = [torch.randn(3, r, generator=g, dtype=torch.float64) for r in ranks]
    weights = random_weights(k, g)

    delta = ideal_delta(lora_as, lora_bs, weights, scalings=scalings[:k])

    expected = sum(p * s * (b @ a) for p, s, a, b in zip(weights.tolist(), scalings, lora_as, lora_bs))
    assert delta.dtype == torch.float64
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ residual
def test_relative_residual_known_values():
    delta_w = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # ‖ΔW‖ = 5

    assert relative_residual([residual_parts(delta_w, delta_w)]) == 0.0
    assert relative_residual([residual_parts(delta_w, torch.zeros(2, 2))]) == 1.0
    assert relative_residual([residual_parts(delta_w, delta_w / 2)]) == pytest.approx(0.5)
    # two layers: sqrt((25/4 + 0) / (25 + 25))
    both = [residual_parts(delta_w, delta_w / 2), residual_parts(delta_w, delta_w)]
    assert relative_residual(both) == pytest.approx(math.sqrt(6.25 / 50))


def test_relative_residual_of_zero_updates_is_zero():
    zero = torch.zeros(3, 3, dtype=torch.float64)

    assert relative_residual([residual_parts(zero, torch.ones(3, 3))]) == 0.0
    assert relative_residual([]) == 0.0


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_relative_residual_is_scale_free(seed, scale):
    g = torch.Generator().manual_seed(seed)
    delta_w, approx = (
        torch.randn(4, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 5, generator=g, dtype=torch.float64),
    )

    plain = relative_residual([residual_parts(delta_w, approx)])
    scaled = relative_residual([residual_parts(scale * delta_w, scale * approx)])

    assert scaled == pytest.approx(plain, rel=1e-12)
    assert plain == pytest.approx(float((delta_w - approx).norm() / delta_w.norm()), rel=1e-12)
