"""METHODS.md invariants as hypothesis properties (float64, both factors random), per rule."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.records import state_nbytes
from strategies.fedavg import FedIT, fedit
from strategies.ffa_lora import FFALoRA, ffa
from strategies.flora import stack_pair, stacked_delta
from strategies.lora_fair import fair_correction_cosine, fair_correction_frobenius, lora_fair
from strategies.lora_math import check_weights, ideal_delta
from strategies.base import NodeInfo

SETTINGS = settings(max_examples=40, deadline=None)

sizes = st.fixed_dictionaries(
    {
        "clients": st.integers(1, 5),
        "d_in": st.integers(2, 9),
        "d_out": st.integers(2, 9),
        "seed": st.integers(0, 10_000),
        "ranks": st.lists(st.integers(1, 5), min_size=5, max_size=5),
    }
)


def draw(sz, *, equal_ranks: bool = False):
    g = torch.Generator().manual_seed(sz["seed"])
    k = sz["clients"]
    ranks = [sz["ranks"][0]] * k if equal_ranks else sz["ranks"][:k]
    lora_as = [torch.randn(r, sz["d_in"], generator=g, dtype=torch.float64) for r in ranks]
    lora_bs = [torch.randn(sz["d_out"], r, generator=g, dtype=torch.float64) for r in ranks]
    counts = torch.randint(1, 100, (k,), generator=g).double()
    return lora_as, lora_bs, counts / counts.sum(), ranks


def as_states(lora_as, lora_bs, *, head=None):
    states = []
    for i, (a, b) in enumerate(zip(lora_as, lora_bs)):
        s = {"m.q.lora_A.weight": a, "m.q.lora_B.weight": b}
        if head is not None:
            s["m.head.weight"] = head[i]
        states.append(s)
    return states


# ------------------------------------------------------------------------------ invariant 1
@SETTINGS
@given(sz=sizes, scal=st.lists(st.floats(0.1, 4.0), min_size=5, max_size=5))
def test_stacking_is_exact_with_heterogeneous_ranks_and_scalings(sz, scal):
    lora_as, lora_bs, w, ranks = draw(sz)
    scalings = scal[: len(ranks)]
    a_stack, b_stack = stack_pair(lora_as, lora_bs, w, scalings=scalings)
    assert a_stack.shape == (sum(ranks), sz["d_in"]) and b_stack.shape == (sz["d_out"], sum(ranks))
    torch.testing.assert_close(stacked_delta(a_stack, b_stack), ideal_delta(lora_as, lora_bs, w, scalings=scalings), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ invariant 3
@SETTINGS
@given(sz=sizes, factor=st.floats(0.01, 100.0))
def test_fedavg_is_order_and_scale_invariant(sz, factor):
    lora_as, lora_bs, w, ranks = draw(sz)
    r_max = max(ranks)
    out, _ = fedit(as_states(lora_as, lora_bs), w, rank=r_max)
    perm = torch.randperm(len(ranks), generator=torch.Generator().manual_seed(sz["seed"])).tolist()
    out_perm, _ = fedit(as_states([lora_as[i] for i in perm], [lora_bs[i] for i in perm]), w[perm], rank=r_max)
    scaled = (w * factor) / (w * factor).sum()  # weights are normalised counts: scaling all counts changes nothing
    out_scaled, _ = fedit(as_states(lora_as, lora_bs), scaled, rank=r_max)
    for key in out:
        torch.testing.assert_close(out_perm[key], out[key], rtol=0, atol=1e-12)
        torch.testing.assert_close(out_scaled[key], out[key], rtol=0, atol=1e-12)


@SETTINGS
@given(sz=sizes)
def test_fedavg_of_one_client_is_that_client_and_padding_gives_back_the_prefix(sz):
    lora_as, lora_bs, _, ranks = draw(sz)
    out, residual = fedit(as_states(lora_as[:1], lora_bs[:1]), torch.ones(1, dtype=torch.float64), rank=ranks[0])
    assert torch.equal(out["m.q.lora_A.weight"], lora_as[0]) and torch.equal(out["m.q.lora_B.weight"], lora_bs[0])
    assert residual == 0.0
    padded, _ = fedit(as_states(lora_as[:1], lora_bs[:1]), torch.ones(1, dtype=torch.float64), rank=ranks[0] + 2)
    assert torch.equal(padded["m.q.lora_A.weight"][: ranks[0]], lora_as[0])
    assert torch.count_nonzero(padded["m.q.lora_A.weight"][ranks[0] :]) == 0


@SETTINGS
@given(sz=sizes)
def test_fedavg_is_exact_when_all_a_are_equal(sz):
    lora_as, lora_bs, w, ranks = draw(sz, equal_ranks=True)
    shared = [lora_as[0]] * len(lora_as)
    _, residual = fedit(as_states(shared, lora_bs), w, rank=ranks[0])
    assert residual < 1e-12


# ------------------------------------------------------------------------------ invariant 4
@SETTINGS
@given(sz=sizes)
def test_ffa_is_exact_with_a_shared_a(sz):
    lora_as, lora_bs, w, ranks = draw(sz)
    r_max = max(ranks)
    g = torch.Generator().manual_seed(1)
    shared = {"m.q.lora_A.weight": torch.randn(r_max, sz["d_in"], generator=g, dtype=torch.float64), "m.q.lora_B.weight": torch.zeros(sz["d_out"], r_max, dtype=torch.float64)}
    uploads = [{"m.q.lora_B.weight": b} for b in lora_bs]
    out, residual = ffa(uploads, w, shared=shared, rank=r_max)
    assert torch.equal(out["m.q.lora_A.weight"], shared["m.q.lora_A.weight"])
    assert residual < 1e-12


def test_ffa_payload_and_upload_never_hold_a_and_halve_the_bytes():
    adapter = {"m.q.lora_A.weight": torch.randn(4, 32), "m.q.lora_B.weight": torch.zeros(32, 4), "m.head.weight": torch.randn(3, 32)}
    ffa_strategy = FFALoRA(adapter, clients_per_round=1, seed=0)
    fedit_strategy = FedIT(adapter, clients_per_round=1, seed=0)
    node = NodeInfo(node_id=1, partition_id=0, rank=2, num_examples=5)
    tensors, instructions = ffa_strategy.payload(node, 1)
    assert not any(k.endswith("lora_A.weight") for k in tensors) and instructions["train-a"] is False
    assert not any(k.endswith("lora_A.weight") for k in ffa_strategy.upload_keys(2))
    lora_only = lambda keys: {k: adapter[k] for k in keys if "lora" in k}  # noqa: E731
    assert state_nbytes(lora_only(ffa_strategy.upload_keys(4))) * 2 == state_nbytes(lora_only(fedit_strategy.upload_keys(4)))
    # A is a pure function of the seed: the same in every strategy instance (= every client)
    again = FFALoRA(adapter, clients_per_round=1, seed=0)
    assert torch.equal(again.adapter["m.q.lora_A.weight"], ffa_strategy.adapter["m.q.lora_A.weight"])


# ------------------------------------------------------------------------------ invariant 5
@SETTINGS
@given(sz=sizes, lam=st.sampled_from([0.0, 0.01, 1.0]), method=st.sampled_from(["cosine", "frobenius"]))
def test_lora_fair_never_increases_the_residual(sz, lam, method):
    lora_as, lora_bs, w, ranks = draw(sz)
    _, residual, fedavg_residual = lora_fair(as_states(lora_as, lora_bs), w, rank=max(ranks), method=method, lam=lam, steps=30, lr=0.05)
    assert residual <= fedavg_residual + 1e-12


@SETTINGS
@given(sz=sizes, method=st.sampled_from(["cosine", "frobenius"]))
def test_lora_fair_correction_is_zero_for_identical_clients(sz, method):
    lora_as, lora_bs, w, ranks = draw(sz)
    same_a, same_b = [lora_as[0]] * len(ranks), [lora_bs[0]] * len(ranks)
    a, b = lora_as[0], lora_bs[0]
    delta_w = ideal_delta(same_a, same_b, w, scalings=[1.0] * len(ranks))
    if method == "frobenius":
        delta_b = fair_correction_frobenius(delta_w, a, b, lam=0.01)
        assert delta_b.abs().max() < 1e-10
    else:
        delta_b = fair_correction_cosine(delta_w, a, b, lam=0.01, steps=30, lr=0.05)
        assert torch.count_nonzero(delta_b) == 0


@SETTINGS
@given(sz=sizes, lam=st.sampled_from([0.01, 1.0]))
def test_frobenius_correction_solves_its_normal_equations(sz, lam):
    lora_as, lora_bs, w, ranks = draw(sz)
    r = max(ranks)
    out, _, _ = lora_fair(as_states(lora_as, lora_bs), w, rank=r, method="frobenius", lam=lam, steps=0, lr=0.01)
    from strategies.fedavg import fedit_pair

    a, b = fedit_pair(lora_as, lora_bs, w, rank=r)
    delta_w = ideal_delta(lora_as, lora_bs, w, scalings=[1.0] * len(ranks))
    delta_b = out["m.q.lora_B.weight"] - b
    # gradient of ‖ΔW − (B̄+ΔB)Ā‖² + λ‖ΔB‖² vanishes
    grad = -(delta_w - (b + delta_b) @ a) @ a.T + lam * delta_b
    assert grad.abs().max() < 1e-8 * max(1.0, float(delta_w.abs().max()) * float(a.abs().max()))


# ------------------------------------------------------------------------------ invariant 6
def test_weights_must_sum_to_one():
    import pytest

    with pytest.raises(ValueError, match="sum to 1"):
        check_weights(torch.tensor([0.5, 0.6], dtype=torch.float64), count=2)
    with pytest.raises(ValueError, match="non-negative"):
        check_weights(torch.tensor([1.5, -0.5], dtype=torch.float64), count=2)
