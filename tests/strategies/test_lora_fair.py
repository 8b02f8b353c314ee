"""LoRA-FAIR: docs/methods.md, invariant 5 for both corrections, the closed form, and the strategy class."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.protocol.records import from_record, resize_rank, to_record
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.fedavg import fedit, fedit_pair
from fedpeft.strategies.lora_fair import (
    LoRAFAIR,
    cosine_dissimilarity,
    fair_correction_cosine,
    fair_correction_frobenius,
    lora_fair,
)
from fedpeft.strategies.lora_math import ideal_delta
from fedpeft.strategies.types import NodeInfo
from tests.strategies import draw

SETTINGS = settings(max_examples=40, deadline=None)
A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.head.weight"
STEPS, LR = 25, 0.05  # fewer steps than the default 50 keep the properties fast; the guarantees hold for any

sizes = draw.sizes()


def factors(sz, *, equal_ranks: bool = False):
    """Random float64 factors (both random) of the clients' ranks, and normalised weights."""
    g = torch.Generator().manual_seed(sz["seed"])
    k = sz["clients"]
    ranks = [sz["ranks"][0]] * k if equal_ranks else sz["ranks"][:k]
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for r in ranks]
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (k,), generator=g).double()
    return lora_as, lora_bs, counts / counts.sum(), ranks


def layer(sz, *, equal_ranks: bool = False):
    """(ΔW, Ā, B̄) of one layer, zero-padded to the largest rank."""
    lora_as, lora_bs, weights, ranks = factors(sz, equal_ranks=equal_ranks)
    lora_a, lora_b = fedit_pair(lora_as, lora_bs, weights, rank=max(ranks))
    return ideal_delta(lora_as, lora_bs, weights, scalings=[1.0] * len(ranks)), lora_a, lora_b


def correct(method: str, delta_w, lora_a, lora_b, *, lam: float):
    if method == "frobenius":
        return fair_correction_frobenius(delta_w, lora_a, lora_b, lam=lam)
    return fair_correction_cosine(delta_w, lora_a, lora_b, lam=lam, steps=STEPS, lr=LR)


def residual(delta_w, lora_a, lora_b) -> float:
    return float((delta_w - lora_b @ lora_a).norm())


# ------------------------------------------------------------------------------ invariant 5
@SETTINGS
@given(sz=sizes, lam=st.sampled_from([0.0, 0.01, 1.0]), method=st.sampled_from(["cosine", "frobenius"]))
def test_the_corrected_residual_is_never_larger_than_fedavgs(sz, lam, method):
    # Prepare
    lora_as, lora_bs, weights, ranks = factors(sz)
    states = [{A: a, B: b} for a, b in zip(lora_as, lora_bs)]
    # Execute
    out, fair_residual, fedavg_residual = lora_fair(
        states, weights, rank=max(ranks), method=method, lam=lam, steps=STEPS, lr=LR
    )
    # Assert
    _, plain_residual = fedit(states, weights, rank=max(ranks))
    assert fedavg_residual == pytest.approx(plain_residual, abs=1e-12)
    assert fair_residual <= fedavg_residual + 1e-12


@SETTINGS
@given(sz=sizes, lam=st.sampled_from([0.0, 0.01, 1.0]))
def test_the_cosine_correction_never_lowers_the_cosine(sz, lam):
    delta_w, lora_a, lora_b = layer(sz)

    delta_b = fair_correction_cosine(delta_w, lora_a, lora_b, lam=lam, steps=STEPS, lr=LR)

    assert delta_b.shape == lora_b.shape and delta_b.dtype == torch.float64
    assert (
        cosine_dissimilarity(delta_w, (lora_b + delta_b) @ lora_a)
        <= cosine_dissimilarity(delta_w, lora_b @ lora_a) + 1e-12
    )


@SETTINGS
@given(sz=sizes, method=st.sampled_from(["cosine", "frobenius"]), lam=st.sampled_from([0.0, 0.01]))
def test_the_correction_is_exactly_zero_when_all_clients_are_identical(sz, method, lam):
    # Prepare
    lora_as, lora_bs, weights, ranks = factors(sz)
    states = [{A: lora_as[0], B: lora_bs[0], HEAD: lora_as[0][:1]}] * len(ranks)
    same_a, same_b = [lora_as[0]] * len(ranks), [lora_bs[0]] * len(ranks)
    lora_a, lora_b = fedit_pair(same_a, same_b, weights, rank=ranks[0])
    delta_w = ideal_delta(same_a, same_b, weights, scalings=[1.0] * len(ranks))
    # Execute
    delta_b = correct(method, delta_w, lora_a, lora_b, lam=lam)
    out, fair_residual, _ = lora_fair(states, weights, rank=ranks[0], method=method, lam=lam, steps=STEPS, lr=LR)
    # Assert
    assert torch.count_nonzero(delta_b) == 0
    assert torch.equal(out[B], lora_b) and torch.equal(out[A], lora_a)
    assert fair_residual < 1e-12


def test_the_cosine_correction_is_zero_when_there_is_no_direction_to_match():
    g = torch.Generator().manual_seed(0)
    lora_a, lora_b = (
        torch.randn(2, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 2, generator=g, dtype=torch.float64),
    )
    # B̄ = 0 exactly: two equally weighted clients with opposite B and different A, so ΔW ≠ 0 = B̄Ā
    other_a = torch.randn(2, 4, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    a_bar, b_bar = fedit_pair([lora_a, other_a], [lora_b, -lora_b], weights, rank=2)
    delta_w = ideal_delta([lora_a, other_a], [lora_b, -lora_b], weights, scalings=[1.0, 1.0])
    assert torch.count_nonzero(b_bar) == 0 and delta_w.norm() > 0

    assert torch.count_nonzero(fair_correction_cosine(delta_w, a_bar, b_bar, lam=0.01, steps=STEPS, lr=LR)) == 0
    assert (
        torch.count_nonzero(
            fair_correction_cosine(torch.zeros(3, 4, dtype=torch.float64), lora_a, lora_b, lam=0.01, steps=STEPS, lr=LR)
        )
        == 0
    )
    assert torch.count_nonzero(fair_correction_cosine(delta_w, lora_a, lora_b, lam=0.01, steps=0, lr=LR)) == 0


def test_the_cosine_correction_improves_a_generic_round():
    # Prepare: three clients with different A and B, so B̄Ā is off the ideal update
    delta_w, lora_a, lora_b = layer({"clients": 3, "d_in": 8, "d_out": 6, "ranks": [2] * 5, "seed": 1})
    # Execute
    delta_b = fair_correction_cosine(delta_w, lora_a, lora_b, lam=0.01, steps=50, lr=0.01)
    # Assert
    before, after = (
        cosine_dissimilarity(delta_w, lora_b @ lora_a),
        cosine_dissimilarity(delta_w, (lora_b + delta_b) @ lora_a),
    )
    assert after < 0.9 * before
    assert residual(delta_w, lora_a, lora_b + delta_b) < residual(delta_w, lora_a, lora_b)


# ------------------------------------------------------------------------------ the closed form
@SETTINGS
@given(sz=sizes, lam=st.sampled_from([1e-3, 0.01, 1.0, 10.0]))
def test_the_frobenius_correction_solves_its_normal_equations(sz, lam):
    # Prepare
    delta_w, lora_a, lora_b = layer(sz)
    # Execute
    delta_b = fair_correction_frobenius(delta_w, lora_a, lora_b, lam=lam)
    # Assert: ∇_ΔB (‖ΔW − (B̄+ΔB)Ā‖² + λ‖ΔB‖²) / 2 = −(ΔW − (B̄+ΔB)Ā)Āᵀ + λΔB = 0
    grad = -(delta_w - (lora_b + delta_b) @ lora_a) @ lora_a.T + lam * delta_b
    scale = max(1.0, float(delta_w.norm()) * float(lora_a.norm()))
    assert float(grad.abs().max()) < 1e-9 * scale


@SETTINGS
@given(sz=sizes)
def test_frobenius_without_regulariser_reaches_the_best_fit_in_the_row_space_of_a_bar(sz):
    # Prepare: min_B ‖ΔW − BĀ‖ is reached at BĀ = ΔW P, P = Ā⁺Ā the projector on Ā's row space
    delta_w, lora_a, lora_b = layer(sz)
    projector = torch.linalg.pinv(lora_a) @ lora_a
    best = float((delta_w - delta_w @ projector).norm())
    tol = 1e-7 * max(1.0, float(delta_w.norm()))
    # Execute
    exact = fair_correction_frobenius(delta_w, lora_a, lora_b, lam=0.0)
    tiny = fair_correction_frobenius(delta_w, lora_a, lora_b, lam=1e-10)
    # Assert
    torch.testing.assert_close((lora_b + exact) @ lora_a, delta_w @ projector, rtol=0, atol=tol)
    assert residual(delta_w, lora_a, lora_b + exact) == pytest.approx(best, abs=tol)
    assert residual(delta_w, lora_a, lora_b + tiny) == pytest.approx(best, abs=1e-4 * max(1.0, float(delta_w.norm())))


@SETTINGS
@given(sz=sizes)
def test_frobenius_residual_grows_with_the_regulariser(sz):
    delta_w, lora_a, lora_b = layer(sz)

    residuals = [
        residual(delta_w, lora_a, lora_b + fair_correction_frobenius(delta_w, lora_a, lora_b, lam=lam))
        for lam in (1e-3, 0.1, 10.0, 1e3)
    ]

    assert all(x <= y + 1e-10 for x, y in zip(residuals, residuals[1:]))
    assert residuals[-1] <= residual(delta_w, lora_a, lora_b) + 1e-12


# ------------------------------------------------------------------------------ the strategy
def initial_adapter(rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        A: torch.randn(rank, 6, generator=g, dtype=torch.float64),
        B: torch.randn(5, rank, generator=g, dtype=torch.float64),
        HEAD: torch.randn(3, 6, generator=g, dtype=torch.float64),
    }


def test_lora_fair_is_registered_and_validates_its_options():
    assert STRATEGIES["lora_fair"] is LoRAFAIR and LoRAFAIR.name == "lora_fair"
    with pytest.raises(ValueError, match="cosine.*frobenius"):
        LoRAFAIR(initial_adapter(), clients_per_round=1, seed=0, method="cosin")
    for bad in ({"lam": -0.1}, {"steps": -1}, {"lr": 0.0}):
        with pytest.raises(ValueError, match="LoRA-FAIR needs"):
            LoRAFAIR(initial_adapter(), clients_per_round=1, seed=0, **bad)


def test_from_config_reads_the_strategy_options():
    strategy_cfg = SimpleNamespace(method="frobenius", lam=0.5, steps=7, lr=0.2)
    cfg = SimpleNamespace(clients_per_round=2, seed=3, min_clients=1, strategy=strategy_cfg)

    strategy = LoRAFAIR.from_config(cfg, initial_adapter())

    assert (strategy.method, strategy.lam, strategy.steps, strategy.lr) == ("frobenius", 0.5, 7, 0.2)
    assert (strategy.clients_per_round, strategy.seed) == (2, 3)


@pytest.mark.parametrize("method", ["cosine", "frobenius"])
def test_aggregate_train_applies_the_rule_to_the_accepted_replies(method):
    # Prepare: heterogeneous ranks, real reply Messages
    ranks, counts = (1, 3, 4), (4, 9, 20)
    strategy = LoRAFAIR(initial_adapter(4), clients_per_round=3, seed=0, method=method, steps=STEPS, lr=LR)
    strategy.register_nodes(
        [
            NodeInfo(node_id=50 + p, partition_id=p, rank=r, num_examples=n)
            for p, (r, n) in enumerate(zip(ranks, counts))
        ]
    )
    g = torch.Generator().manual_seed(9)
    uploads = {
        p: {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in resize_rank(strategy.adapter, r).items()}
        for p, r in enumerate(ranks)
    }
    replies = []
    for msg in strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid=None):
        node = strategy.nodes[msg.metadata.dst_node_id]
        sent = from_record(msg.content[strategy.arrayrecord_key])
        assert set(sent) == {A, B, HEAD} and torch.equal(
            sent[A], strategy.adapter[A][: node.rank]
        )  # clients start from the stored adapter
        metrics = MetricRecord({"num-examples": node.num_examples, "rank": node.rank, "train-loss": 1.0})
        replies.append(
            Message(
                RecordDict({strategy.arrayrecord_key: to_record(uploads[node.partition_id]), "metrics": metrics}),
                reply_to=msg,
            )
        )
    weights = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    expected, fair_residual, fedavg_residual = lora_fair(
        [uploads[p] for p in range(3)], weights, rank=4, method=method, lam=0.01, steps=STEPS, lr=LR
    )
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    assert all(torch.equal(strategy.adapter[k], v) for k, v in expected.items())
    assert all(torch.equal(from_record(arrays)[k], v) for k, v in expected.items())
    extra = strategy.reports[1].extra
    assert extra["residual"] == pytest.approx(fair_residual) and extra["fedavg_residual"] == pytest.approx(
        fedavg_residual
    )
    assert extra["residual"] < extra["fedavg_residual"]
