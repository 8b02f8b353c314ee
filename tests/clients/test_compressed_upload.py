"""The client's encode step under ``compression=compeft``: what travels, and error feedback through the node store."""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedpeft.cli.configs import compose_config
from fedpeft.clients.job import decode, encode, train_jobs
from fedpeft.clients.state import NodeStore
from fedpeft.compression.compeft import decode_update, payload_nbytes
from fedpeft.config.schema import to_json
from fedpeft.models.adapters import cached_model, resolve_device
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import state_nbytes
from fedpeft.protocol.wire import ClientPlan, RunInfo, Source
from fedpeft.server.evaluation import initial_adapter

CFG_OVERRIDES = [
    "+exp=smoke",
    "num_clients=2",
    "data.max_samples=60",
    "model.max_length=16",
    "client.local_steps=2",
    "model.lora.r=2",
    "compression=compeft",
    "compression.density=0.1",
    "compression.error_feedback=true",
]
CFG = compose_config(CFG_OVERRIDES)


def one_round(run: RunInfo, context: Context, sent: dict, server_round: int):
    plan = ClientPlan(groups=protocol.single_group(source=Source.MESSAGE), server_round=server_round, rank=2)
    msg = Message(protocol.encode_instruction(run, plan, sent), dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m-{server_round}"
    job = decode(msg, context)
    (result,) = train_jobs([job])
    return job, result, encode(job, result)


def test_uploads_travel_compressed_and_error_feedback_loses_nothing(tmp_path):
    # Prepare
    from fedpeft.data.partition import prepare

    data = prepare(CFG.data, seed=CFG.seed, num_clients=CFG.num_clients)
    cm = cached_model(CFG.model, num_labels=data.num_labels, device=resolve_device(CFG.device), seed=CFG.seed)
    sent = initial_adapter(cm, rank=2, seed=CFG.seed)
    run = RunInfo(config_json=to_json(CFG), sim_state_dir=str(tmp_path))
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    store = NodeStore(tmp_path / "node-0")
    residual = {k: torch.zeros_like(v) for k, v in sent.items()}
    for server_round in (1, 2):
        # Execute
        job, result, reply = one_round(run, context, sent, server_round)
        dense, _ = protocol.decode_reply(reply.content)
        packed = protocol.decode_packed(reply.content)
        # Assert: every upload compressed, ~10x smaller than dense
        assert not dense and set(packed) == set(sent)
        assert payload_nbytes(packed) < state_nbytes(result.state) / 8
        # Assert: Δ̂_t + e_t = Δ_t + e_{t-1} (what compression drops is kept, not lost)
        decoded = decode_update(packed, job.start)
        kept = store.load_residual(job.plan.base.lineage)
        for key in sent:
            sent_delta = decoded[key].double() - job.start[key].double()
            lhs = sent_delta + kept[key].double()
            rhs = result.state[key].double() - job.start[key].double() + residual[key].double()
            torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-6)
        assert any(torch.count_nonzero(v) for v in kept.values())
        residual, sent = kept, decoded  # the next round starts from what the server rebuilt


def test_dp_clients_compress_the_noised_update(tmp_path):
    """DP-SGD trains (and accounts) first; compression then encodes the noised result: ε is the plain DP round's."""
    from fedpeft.data.partition import prepare

    cfg = compose_config(
        [*CFG_OVERRIDES, "client.dp.enabled=true", "client.dp.noise_multiplier=1.0", "client.batch_size=8"]
    )
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients)
    cm = cached_model(cfg.model, num_labels=data.num_labels, device=resolve_device(cfg.device), seed=cfg.seed)
    sent = initial_adapter(cm, rank=2, seed=cfg.seed)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    job, result, reply = one_round(RunInfo(config_json=to_json(cfg), sim_state_dir=str(tmp_path)), context, sent, 1)
    _, metrics = protocol.decode_reply(reply.content)
    packed = protocol.decode_packed(reply.content)
    assert set(packed) == set(sent) and metrics[protocol.EPSILON] > 0 and metrics[protocol.DP_ROUNDS] == 1
    decoded = decode_update(packed, job.start)
    changed = [k for k in sent if not torch.equal(decoded[k], job.start[k])]
    assert changed  # the noised update travelled, sparsified
