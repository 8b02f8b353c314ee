"""FedEx-LoRA: docs/methods.md, invariant 7 — the global model is exactly W_prev + Σ p_k s B_k A_k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import stack_to_delta, state_nbytes
from fedpeft.strategies.fedex_lora import FedExLoRA, fedex_average, fedex_pair, residual_stack
from tests.strategies import draw, replies

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
    w_prev = torch.randn(
        sz["d_out"], sz["d_in"], generator=torch.Generator().manual_seed(sz["seed"] + 1), dtype=torch.float64
    )
    # Execute
    lora_a, lora_b, a_stack, b_stack = fedex_pair(lora_as, lora_bs, weights, scaling=scaling)
    new_base = w_prev + b_stack @ a_stack
    global_model = new_base + scaling * lora_b @ lora_a
    # Assert
    torch.testing.assert_close(
        global_model, w_prev + explicit_update(lora_as, lora_bs, weights, scaling), rtol=0, atol=1e-10
    )


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
        subset = data.draw(
            st.lists(st.integers(0, pool - 1), min_size=1, max_size=pool, unique=True), label=f"round {t + 1}"
        )
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
        residual_stack(
            [a2, a2], [b2, b2], torch.tensor([1.0, 1.0], dtype=torch.float64), lora_a=a2, lora_b=b2, scaling=1.0
        )


# ------------------------------------------------------------------------------ the strategy
def fedex_with(ranks, *, clients_per_round: int, scaling: float = 2.0) -> FedExLoRA:
    strategy = FedExLoRA(
        replies.initial_adapter(max(ranks)), clients_per_round=clients_per_round, seed=3, scaling=scaling
    )
    strategy.register_nodes(replies.nodes(ranks))
    return strategy


def dense_global(strategy: FedExLoRA, w0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W_0 + Σ_t ΔW_t (the ledger) + s B̄ Ā, per layer, in float64."""
    out = {m: w.clone() for m, w in w0.items()}
    for update in strategy.base_updates:
        for module, delta in stack_to_delta(update).items():
            out[module] = out[module] + delta
    for module in out:
        a, b = (
            strategy.adapter[f"{module}.lora_A.weight"].double(),
            strategy.adapter[f"{module}.lora_B.weight"].double(),
        )
        out[module] = out[module] + strategy.scaling * b @ a
    return out


def test_heterogeneous_ranks_are_refused_before_round_one():
    strategy = FedExLoRA(replies.initial_adapter(4), clients_per_round=2, seed=0)

    with pytest.raises(
        ValueError, match=r"fedex_lora needs the same LoRA rank on every client, got ranks \[2, 4\].*flexlora"
    ):
        strategy.register_nodes(replies.nodes([4, 2, 4]))
    with pytest.raises(ValueError, match="no LoRA factors|has none"):
        FedExLoRA({"m.prompt.weight": torch.zeros(3, 4)}, clients_per_round=1, seed=0)


def test_every_round_moves_the_global_model_by_exactly_the_weighted_products_under_partial_participation():
    # Prepare: 4 nodes, 2 per round
    strategy = fedex_with([3, 3, 3, 3], clients_per_round=2)
    g = torch.Generator().manual_seed(1)
    w0 = {layer: torch.randn(6, 8, generator=g, dtype=torch.float64) for layer in replies.LAYERS}
    for server_round in range(1, 5):
        before = dense_global(strategy, w0)
        base_before = {
            m: before[m]
            - strategy.scaling
            * strategy.adapter[f"{m}.lora_B.weight"].double()
            @ strategy.adapter[f"{m}.lora_A.weight"].double()
            for m in w0
        }
        # Execute
        messages, sent = replies.play_round(strategy, server_round, g)
        # Assert: global_t = W_{t-1} + Σ_k p_k s B_k A_k for the clients of this round
        uploads = [protocol.decode_reply(r.content)[0] for r in sent]
        counts = torch.tensor(
            [float(strategy.nodes[m.metadata.dst_node_id].num_examples) for m in messages], dtype=torch.float64
        )
        weights = counts / counts.sum()
        after = dense_global(strategy, w0)
        for m in w0:
            expected = base_before[m] + sum(
                p * strategy.scaling * u[f"{m}.lora_B.weight"].double() @ u[f"{m}.lora_A.weight"].double()
                for p, u in zip(weights.tolist(), uploads)
            )
            torch.testing.assert_close(after[m], expected, rtol=0, atol=1e-5)
        assert len(strategy.base_updates) == server_round
        assert (
            strategy.reports[server_round].extra["residual"]
            < 1e-6
            < strategy.reports[server_round].extra["fedavg_residual"]
        )


def test_the_residual_travels_as_factors_and_a_node_that_skipped_rounds_gets_every_missed_stack():
    # Prepare: one client per round out of three, so most nodes miss rounds
    strategy = fedex_with([2, 2, 2], clients_per_round=1)
    g = torch.Generator().manual_seed(2)
    for server_round in range(1, 6):
        messages = replies.train_messages(strategy, server_round)
        (msg,) = messages
        node = strategy.nodes[msg.metadata.dst_node_id]
        plan = protocol.decode_instruction(msg.content).plan
        missed = list(range(strategy.synced.get(node.partition_id, 0) + 1, len(strategy.base_updates) + 1))
        # Assert: the node receives exactly the stacks it has not seen, as (K+1) r factors, never dense
        assert sorted(plan.base.updates) == missed
        for stack in plan.base.updates.values():
            for key, tensor in stack.items():
                assert tensor.shape in {(2 * 2, 8), (6, 2 * 2)}, key  # K = 1 client: (K+1) r = 4
        tensors = protocol.decode_instruction(msg.content).tensors
        assert strategy.reports[server_round].bytes_down[node.node_id] == state_nbytes(tensors) + sum(
            state_nbytes(s) for s in plan.base.updates.values()
        )
        strategy.aggregate_train(server_round, [replies.reply(strategy, msg, g)])
        upload = protocol.decode_reply(replies.reply(strategy, msg, g).content)[0]
        assert (
            strategy.reports[server_round].bytes_up[node.node_id]
            == state_nbytes(upload)
            == state_nbytes(strategy.adapter)
        )


def test_workers_that_skipped_rounds_land_on_the_servers_base_and_the_global_model_is_exact(tmp_path):
    """The real client code (``fedpeft.clients.job.sync_base``) merges the stacks into worker models."""
    import random

    from fedpeft.clients.job import store_base_updates, sync_base
    from fedpeft.clients.state import NodeStore
    from tests.strategies.test_flora_exact import tiny_cached_model

    # Prepare: 4 nodes of rank 4, 2 per round, two workers that see the nodes in a shuffled order
    server_cm = tiny_cached_model()
    server_cm.activate(4)
    strategy = FedExLoRA(server_cm.adapter_state(4), clients_per_round=2, seed=1, scaling=2.0)
    strategy.lineage = "run-x"
    strategy.register_nodes(replies.nodes([4, 4, 4, 4]))
    modules = list(server_cm.base_layers())
    workers = [tiny_cached_model(), tiny_cached_model()]
    stores = {n.node_id: NodeStore(tmp_path / f"node-{n.partition_id}") for n in strategy.nodes.values()}
    shuffler, g = random.Random(0), torch.Generator().manual_seed(0)
    for server_round in range(1, 6):
        messages = replies.train_messages(strategy, server_round)
        for msg in messages:
            plan = protocol.decode_instruction(msg.content).plan
            worker = shuffler.choice(workers)
            # Execute: the node stores the stacks it missed, the worker merges them
            store_base_updates(stores[msg.metadata.dst_node_id], plan)
            sync_base(worker, stores[msg.metadata.dst_node_id], plan)
            # Assert: the same base as the server's evaluator, bit for bit, whatever the node missed
            missing = strategy.base_updates[
                server_cm.base_version if server_cm.base_lineage == "run-x" else 0 :
            ]  # as the evaluator does
            server_cm.use_base("run-x", [stack_to_delta(u) for u in missing], version=len(strategy.base_updates))
            for name, layer in worker.base_layers().items():
                assert torch.equal(layer.weight, server_cm.base_layers()[name].weight), (server_round, name)
        base_before = {m: server_cm.base_layers()[m].weight.detach().double().clone() for m in modules}
        sent = [replies.reply(strategy, m, g) for m in messages]
        strategy.aggregate_train(server_round, sent)
        # the new global model, base + s B̄Ā, is the previous base plus Σ_k p_k s B_k A_k
        uploads = [protocol.decode_reply(r.content)[0] for r in sent]
        counts = torch.tensor(
            [float(strategy.nodes[m.metadata.dst_node_id].num_examples) for m in messages], dtype=torch.float64
        )
        weights = (counts / counts.sum()).tolist()
        delta = stack_to_delta(strategy.base_updates[-1])
        for m in modules:
            a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
            expected = base_before[m] + sum(p * 2.0 * u[b].double() @ u[a].double() for p, u in zip(weights, uploads))
            got = base_before[m] + delta[m] + 2.0 * strategy.adapter[b].double() @ strategy.adapter[a].double()
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert strategy.reports[server_round].extra["fedavg_residual"] > 1e-3  # there was a residual to fold
