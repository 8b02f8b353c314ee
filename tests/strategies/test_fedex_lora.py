"""FedEx-LoRA: METHODS.md invariant 7 — the global model is exactly W_prev + Σ p_k s B_k A_k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.fedex_lora import fedex_average, fedex_pair, residual_stack
from tests.strategies import draw

scalings = st.sampled_from([0.5, 1.0, 2.0, 16.0])


def factors(sz, *, clients: int | None = None, seed_offset: int = 0):
    """Random float64 factors (both random) at one rank, and normalised example weights."""
    g = torch.Generator().manual_seed(sz["seed"] + seed_offset)
    k, r = clients or sz["clients"], sz["ranks"][0]
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for _ in range(k)]
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for _ in range(k)]
    counts = torch.randint(1, 100, (k,), generator=g).double()
    return lora_as, lora_bs, counts / counts.sum()


def explicit_update(lora_as, lora_bs, weights, scaling):
    """Oracle: Σ_k p_k s B_k A_k, one dense product at a time."""
    total = torch.zeros(lora_bs[0].shape[0], lora_as[0].shape[1], dtype=torch.float64)
    for p, a, b in zip(weights.tolist(), lora_as, lora_bs):
        total += p * scaling * (b @ a)
    return total


# ------------------------------------------------------------------------------ invariant 7
@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings)
def test_the_global_model_after_a_round_is_w_prev_plus_the_weighted_products(sz, scaling):
    # Prepare
    lora_as, lora_bs, weights = factors(sz)
    w_prev = torch.randn(sz["d_out"], sz["d_in"], generator=torch.Generator().manual_seed(sz["seed"] + 1), dtype=torch.float64)
    # Execute
    lora_a, lora_b, a_stack, b_stack = fedex_pair(lora_as, lora_bs, weights, scaling=scaling)
    new_base = w_prev + b_stack @ a_stack
    global_model = new_base + scaling * lora_b @ lora_a
    # Assert
    torch.testing.assert_close(global_model, w_prev + explicit_update(lora_as, lora_bs, weights, scaling), rtol=0, atol=1e-10)


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings)
def test_the_residual_travels_as_stacked_factors_of_rank_k_plus_one_times_r(sz, scaling):
    # Prepare
    lora_as, lora_bs, weights = factors(sz)
    k, r = len(lora_as), sz["ranks"][0]
    # Execute
    lora_a, lora_b, a_stack, b_stack = fedex_pair(lora_as, lora_bs, weights, scaling=scaling)
    # Assert: [B_1 | … | B_K | B̄], [p_1 s A_1; …; p_K s A_K; −s Ā] — never a dense d_out × d_in
    assert a_stack.shape == ((k + 1) * r, sz["d_in"]) and b_stack.shape == (sz["d_out"], (k + 1) * r)
    for i, (p, a, b) in enumerate(zip(weights.tolist(), lora_as, lora_bs)):
        assert torch.equal(b_stack[:, i * r : (i + 1) * r], b)
        torch.testing.assert_close(a_stack[i * r : (i + 1) * r], p * scaling * a, rtol=0, atol=1e-14)
    assert torch.equal(b_stack[:, k * r :], lora_b)
    torch.testing.assert_close(a_stack[k * r :], -scaling * lora_a, rtol=0, atol=1e-14)
    residual = explicit_update(lora_as, lora_bs, weights, scaling) - scaling * (lora_b @ lora_a)
    torch.testing.assert_close(b_stack @ a_stack, residual, rtol=0, atol=1e-10)


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings)
def test_the_averages_are_fedit_weighted_by_examples(sz, scaling):
    lora_as, lora_bs, weights = factors(sz)

    lora_a, lora_b = fedex_average(lora_as, lora_bs, weights)

    assert abs(float(weights.sum()) - 1.0) < 1e-12
    torch.testing.assert_close(lora_a, sum(p * a for p, a in zip(weights.tolist(), lora_as)), rtol=0, atol=1e-12)
    torch.testing.assert_close(lora_b, sum(p * b for p, b in zip(weights.tolist(), lora_bs)), rtol=0, atol=1e-12)


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings, rounds=st.integers(1, 4), data=st.data())
def test_any_participation_pattern_and_any_skipped_rounds_land_on_the_same_model(sz, scaling, rounds, data):
    # Prepare: a pool of 5 clients; each round a random non-empty subset replies with random factors
    pool = 5
    w0 = torch.randn(sz["d_out"], sz["d_in"], generator=torch.Generator().manual_seed(sz["seed"]), dtype=torch.float64)
    base, ledger, bases = w0.clone(), [], [w0.clone()]
    for t in range(rounds):
        subset = data.draw(st.lists(st.integers(0, pool - 1), min_size=1, max_size=pool, unique=True), label=f"round {t + 1}")
        lora_as, lora_bs, _ = factors(sz, clients=pool, seed_offset=100 * (t + 1))
        counts = torch.randint(1, 50, (pool,), generator=torch.Generator().manual_seed(t)).double()[subset]
        weights = counts / counts.sum()
        chosen_as, chosen_bs = [lora_as[i] for i in subset], [lora_bs[i] for i in subset]
        # Execute
        lora_a, lora_b, a_stack, b_stack = fedex_pair(chosen_as, chosen_bs, weights, scaling=scaling)
        w_prev = base
        base = base + b_stack @ a_stack
        ledger.append((a_stack, b_stack))
        bases.append(base)
        # Assert: this round's global model is exact for this subset
        expected = w_prev + explicit_update(chosen_as, chosen_bs, weights, scaling)
        torch.testing.assert_close(base + scaling * lora_b @ lora_a, expected, rtol=0, atol=1e-10)
    # Assert: a node last synced at version v replays the stacks it missed and lands on the server's base
    for v in range(rounds + 1):
        replay = bases[v].clone()
        for a_stack, b_stack in ledger[v:]:
            replay = replay + b_stack @ a_stack
        assert torch.equal(replay, base)


@draw.SETTINGS
@given(sz=draw.sizes(), scaling=scalings)
def test_one_client_leaves_no_residual(sz, scaling):
    lora_as, lora_bs, weights = factors(sz, clients=1)

    lora_a, lora_b, a_stack, b_stack = fedex_pair(lora_as, lora_bs, weights, scaling=scaling)

    assert torch.equal(lora_a, lora_as[0]) and torch.equal(lora_b, lora_bs[0])
    torch.testing.assert_close(b_stack @ a_stack, torch.zeros_like(b_stack @ a_stack), rtol=0, atol=1e-10)


def test_a_square_layer_gets_the_residual_not_its_transpose():
    # Prepare: the authors' code adds R.T, which is a different matrix for a square nn.Linear
    g = torch.Generator().manual_seed(3)
    lora_as = [torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    lora_bs = [torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    # Execute
    lora_a, lora_b, a_stack, b_stack = fedex_pair(lora_as, lora_bs, weights, scaling=2.0)
    # Assert
    residual = explicit_update(lora_as, lora_bs, weights, 2.0) - 2.0 * lora_b @ lora_a
    torch.testing.assert_close(b_stack @ a_stack, residual, rtol=0, atol=1e-12)
    assert (residual - residual.T).abs().max() > 1e-3  # the transpose would be wrong here


def test_different_ranks_and_bad_weights_are_refused():
    a2, a3 = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    b2, b3 = torch.zeros(5, 2, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)

    with pytest.raises(ValueError, match="one rank for every client"):
        fedex_pair([a2, a3], [b2, b3], half, scaling=1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        residual_stack([a2, a2], [b2, b2], torch.tensor([1.0, 1.0], dtype=torch.float64), lora_a=a2, lora_b=b2, scaling=1.0)
