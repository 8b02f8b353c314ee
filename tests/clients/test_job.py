"""The three client steps on the embedded model, cut small: plans the four rules never send work too.

Two clients share one process (one cached model, as on a Ray worker); a group the plan keeps on
the node comes back to the same client only, and the evaluate handler evaluates the global or the
personal model.
"""

from __future__ import annotations

import os

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedpeft.cli.configs import compose_config
from fedpeft.clients.app import app
from fedpeft.clients.job import decode, encode, train_jobs
from fedpeft.config.schema import to_json
from fedpeft.models.adapters import cached_model, resolve_device
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, ClientPlan, Evaluate, GroupPlan, RunInfo, Source
from fedpeft.server.evaluation import initial_adapter
from tests import counters

CFG = compose_config(
    [
        "+exp=smoke",
        "num_clients=2",
        "data.max_samples=60",
        "model.max_length=16",
        "client.local_steps=2",
        "model.lora.r=2",
    ]
)


@pytest.fixture(scope="module")
def adapter():
    from fedpeft.data.partition import prepare

    data = prepare(CFG.data, seed=CFG.seed, num_clients=CFG.num_clients)
    cm = cached_model(CFG.model, num_labels=data.num_labels, device=resolve_device(CFG.device), seed=CFG.seed)
    return initial_adapter(cm, rank=2, seed=CFG.seed)


def message(run: RunInfo, plan: ClientPlan, tensors, *, kind=MessageType.TRAIN) -> Message:
    msg = Message(protocol.encode_instruction(run, plan, tensors), dst_node_id=1, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"m-{id(msg)}"
    return msg


def personal_b_plan(server_round: int) -> ClientPlan:
    """A shared A and head from the message; B the client's own, kept on the node (FedSA-LoRA's shape)."""
    return ClientPlan(
        groups=(
            GroupPlan(roles={LORA_A, OTHER}, source=Source.MESSAGE),
            GroupPlan(roles={LORA_B}, source=Source.NODE, fallback=Source.ZERO, keep=True, upload=True),
        ),
        server_round=server_round,
        rank=2,
    )


def test_kept_tensors_come_back_to_their_own_client_only(tmp_path, adapter):
    # Prepare
    run = RunInfo(config_json=to_json(CFG), sim_state_dir=str(tmp_path))
    contexts = [
        Context(run_id=1, node_id=k, node_config={"partition-id": k}, state=RecordDict(), run_config={})
        for k in range(2)
    ]
    sent = {k: v for k, v in adapter.items() if not k.endswith(".lora_B.weight")}
    # Execute: round 1 for both clients in one process, then round 2 decoded for each
    trained = {}
    for k, ctx in enumerate(contexts):
        job = decode(message(run, personal_b_plan(1), sent), ctx)
        assert all(
            torch.count_nonzero(v) == 0 for key, v in job.start.items() if key.endswith(".lora_B.weight")
        )  # the fallback: zero
        (result,) = train_jobs([job])
        reply = encode(job, result)
        trained[k], _ = protocol.decode_reply(reply.content)
    starts = {k: decode(message(run, personal_b_plan(2), sent), ctx).start for k, ctx in enumerate(contexts)}
    # Assert
    b_keys = [k for k in adapter if k.endswith(".lora_B.weight")]
    for k in range(2):
        assert all(torch.equal(starts[k][key], trained[k][key]) for key in b_keys)
    assert not any(torch.equal(trained[0][key], trained[1][key]) for key in b_keys)


def test_evaluate_handler_evaluates_the_global_or_the_personal_model(tmp_path, adapter):
    # Prepare
    run = RunInfo(config_json=to_json(CFG), sim_state_dir=str(tmp_path))
    ctx = Context(run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    keep_all = ClientPlan(groups=protocol.single_group(source=Source.MESSAGE, keep=True), server_round=1, rank=2)
    train_reply = app(message(run, keep_all, adapter), ctx)
    _, train_metrics = protocol.decode_reply(train_reply.content)
    personal = ClientPlan(
        groups=protocol.single_group(source=Source.NODE, fallback=Source.ZERO, train=False, upload=False),
        server_round=1,
        rank=2,
        evaluate=Evaluate.PERSONAL,
    )
    global_ = ClientPlan(
        groups=protocol.single_group(source=Source.MESSAGE, train=False, upload=False),
        server_round=1,
        rank=2,
        evaluate=Evaluate.GLOBAL,
    )
    # Execute
    personal_reply = app(message(run, personal, {}, kind=MessageType.EVALUATE), ctx)
    global_reply = app(message(run, global_, adapter, kind=MessageType.EVALUATE), ctx)
    # Assert
    _, pm = protocol.decode_reply(personal_reply.content, with_tensors=False)
    _, gm = protocol.decode_reply(global_reply.content, with_tensors=False)
    assert protocol.ARRAYS_RECORD not in personal_reply.content.array_records
    assert pm[protocol.EVALUATED] == 2 and gm[protocol.EVALUATED] == 1
    # the personal model is the one the client trained: the same validation loss as right after training
    assert pm[protocol.VAL_LOSS] == pytest.approx(train_metrics[protocol.VAL_LOSS], rel=1e-6)
    assert gm[protocol.VAL_LOSS] != pytest.approx(pm[protocol.VAL_LOSS], rel=1e-6)
    assert pm[protocol.VAL_EXAMPLES] == gm[protocol.VAL_EXAMPLES] > 0


def test_replies_carry_no_worker_counters_unless_the_tests_mod_adds_them(tmp_path, adapter):
    run = RunInfo(config_json=to_json(CFG), sim_state_dir=str(tmp_path))
    ctx = Context(run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    plan = ClientPlan(groups=protocol.single_group(source=Source.MESSAGE), server_round=1, rank=2)
    _, plain = protocol.decode_reply(app(message(run, plan, adapter), ctx).content)
    trained, counted = protocol.decode_reply(counters.app(message(run, plan, adapter), ctx).content)
    assert not {counters.BASE_LOADS, counters.WORKER_PID, counters.LORA_A_CRC32} & set(plain)
    assert counted[counters.WORKER_PID] == os.getpid() and counted[counters.BASE_LOADS] >= 1
    assert counted[counters.LORA_A_CRC32] == counters.lora_a_crc32(trained)  # every tensor travels: the A it trained


def test_a_plan_the_client_cannot_follow_fails_with_the_reason(tmp_path, adapter):
    run = RunInfo(config_json=to_json(CFG), sim_state_dir=str(tmp_path))
    ctx = Context(run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    plan = ClientPlan(groups=protocol.single_group(source=Source.MESSAGE), server_round=1, rank=2)
    with pytest.raises(protocol.ProtocolError, match="does not hold it"):
        decode(message(run, plan, {k: v for k, v in adapter.items() if not k.endswith(".lora_B.weight")}), ctx)
