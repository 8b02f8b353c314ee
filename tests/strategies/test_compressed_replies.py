"""ComPEFT replies: every rule decodes them onto the start the client trained from, and rejects bad ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedpeft.clients.job import start_state
from fedpeft.compression.compeft import ComPEFT, compress_uploads, decompress, payload_nbytes, unpack
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import state_nbytes
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, GroupPlan, Source
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.types import NodeInfo
from tests.strategies.test_rejections import NODE


def adapter() -> dict[str, torch.Tensor]:
    """Two LoRA layers: a seeded group is drawn key after key, so a second layer shows the order matters."""
    g = torch.Generator().manual_seed(0)
    return {
        "m.k.lora_A.weight": torch.randn(4, 6, generator=g),
        "m.k.lora_B.weight": torch.randn(5, 4, generator=g),
        "m.q.lora_A.weight": torch.randn(4, 6, generator=g),
        "m.q.lora_B.weight": torch.randn(5, 4, generator=g),
        "m.head.weight": torch.randn(3, 6, generator=g),
    }


METRICS = {"num-examples": NODE.num_examples, "rank": NODE.rank, "train-loss": 0.7}
CODEC = ComPEFT(density=0.25, scale="mean")


def with_node(rule: str):
    """The rule's strategy with one registered node: rank 2 below the global 4, or the global rank
    for a rule that needs every client there (FedEx-LoRA folds one shared residual)."""
    strategy = STRATEGIES[rule](adapter(), clients_per_round=1, seed=0)
    try:
        strategy.register_nodes([NODE])
        return strategy, NODE
    except ValueError:
        node = dataclasses.replace(NODE, rank=4)
        strategy.register_nodes([node])
        return strategy, node


def metrics(node: NodeInfo) -> dict:
    return {**METRICS, "rank": node.rank}


def client_round(strategy, node: NodeInfo = NODE):
    """What the real client step resolves as its start from the server's message, and a "trained" adapter."""
    msg = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid=None))[0]
    instruction = protocol.decode_instruction(msg.content)
    template = strategy.node_adapter(node)
    start = start_state(template, instruction.tensors, plan=instruction.plan, kept=None)
    g = torch.Generator().manual_seed(1)
    trained = {k: v + torch.randn(v.shape, generator=g) for k, v in start.items()}
    uploads = {k: trained[k] for k in instruction.plan.keys(list(trained), upload=True)}
    return msg, instruction.plan, start, uploads


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
def test_compressed_reply_decodes_onto_the_clients_own_start(rule):
    # Prepare
    strategy, node = with_node(rule)
    msg, plan, start, uploads = client_round(strategy, node)
    dense, packed, _ = compress_uploads(uploads, start, plan, CODEC)
    assert not dense and set(packed) == set(uploads)  # every rule's uploads start where the server can follow
    reply = Message(protocol.encode_reply(dense, metrics(node), packed=packed), reply_to=msg)
    # Execute
    update = strategy.check_reply(reply, 1)
    # Assert: the server holds start + Δ̂, with the start the client resolved (seeded A for FLoRA, zero B, ...)
    for key, tensor in update.state.items():
        expected = start[key].double() + decompress(unpack(packed[key])).double()
        assert torch.equal(tensor, expected.to(tensor.dtype)), key
    assert update.nbytes == payload_nbytes(packed) < state_nbytes(uploads)  # tiny tensors: the headers weigh
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is not None and strategy.reports[1].bytes_up[NODE.node_id] == payload_nbytes(packed)


def tamper(kind: str, packed: dict[str, np.ndarray], dense: dict, key: str) -> None:
    buf = bytearray(packed[key].tobytes())
    if kind == "nan scale":  # a 2-D float32 tensor: 4 header bytes, 2 x 4 shape, 4 count, then the scale
        buf[16:20] = np.float32(np.nan).tobytes()
    elif kind == "truncated":
        buf = buf[:-1]
    elif kind == "count beyond the tensor":
        buf[12:16] = np.uint32(10**6).tobytes()
    elif kind == "wrong shape":
        buf[4:8] = np.uint32(int(np.frombuffer(bytes(buf[4:8]), dtype=np.uint32)[0]) + 1).tobytes()
    elif kind == "not uint8":
        packed[key] = np.frombuffer(bytes(buf), dtype=np.uint8).astype(np.float32)
        return
    elif kind == "dense and compressed":
        dense[key] = torch.zeros(1)
        return
    elif kind == "unexpected key":
        packed["m.v.lora_B.weight"] = packed[key]
        return
    packed[key] = np.frombuffer(bytes(buf), dtype=np.uint8).copy()


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "kind",
    [
        "nan scale",
        "truncated",
        "count beyond the tensor",
        "wrong shape",
        "not uint8",
        "dense and compressed",
        "unexpected key",
    ],
)
def test_malformed_compressed_reply_is_rejected_and_never_touches_the_global_model(rule, kind):
    # Prepare
    strategy, node = with_node(rule)
    msg, plan, start, uploads = client_round(strategy, node)
    dense, packed, _ = compress_uploads(uploads, start, plan, CODEC)
    tamper(
        kind, packed, dense, "m.q.lora_B.weight" if "m.q.lora_B.weight" in packed else "m.q.lora_A.weight"
    )  # FedSA-LoRA uploads no B
    before = {k: v.clone() for k, v in strategy.global_model().adapter.items()}
    reply = Message(protocol.encode_reply(dense, metrics(node), packed=packed), reply_to=msg)
    # Execute
    arrays, _ = strategy.aggregate_train(1, [reply])
    # Assert
    report = strategy.reports[1]
    assert arrays is None and not report.clients and len(report.rejected) == 1, report.rejected
    assert all(torch.equal(strategy.global_model().adapter[k], v) for k, v in before.items())


def test_a_group_started_from_node_state_travels_dense_and_may_not_be_compressed():
    class PersonalB(STRATEGIES["fedavg"]):
        def groups(self, node, server_round):
            return (
                GroupPlan(roles={LORA_A, OTHER}, source=Source.MESSAGE),
                GroupPlan(roles={LORA_B}, source=Source.NODE, fallback=Source.ZERO, keep=True),
            )

    strategy = PersonalB(adapter(), clients_per_round=1, seed=0)
    strategy.register_nodes([NODE])
    msg, plan, start, uploads = client_round(strategy)
    dense, packed, _ = compress_uploads(uploads, start, plan, CODEC)
    assert set(dense) == {"m.k.lora_B.weight", "m.q.lora_B.weight"} and set(packed) == {
        "m.k.lora_A.weight",
        "m.q.lora_A.weight",
        "m.head.weight",
    }
    ok = strategy.check_reply(Message(protocol.encode_reply(dense, METRICS, packed=packed), reply_to=msg), 1)
    assert torch.equal(ok.state["m.q.lora_B.weight"], uploads["m.q.lora_B.weight"])
    # the client cheats: B's update compressed against a start the server cannot know
    _, forced, _ = compress_uploads(
        uploads, start, protocol.ClientPlan(groups=protocol.single_group(), server_round=1, rank=NODE.rank), CODEC
    )
    reply = Message(protocol.encode_reply({}, METRICS, packed=forced), reply_to=msg)
    strategy.aggregate_train(1, [reply])
    assert "starts from the node's own state" in strategy.reports[1].rejected[0]["reason"]
