"""Mock clients for the rule tests: plans decoded with the real protocol, random non-zero uploads.

A reply holds exactly the keys the plan uploads, at the client's rank, with random values (a
fresh adapter's B = 0 would make every product check pass trivially).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import resize_rank
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.types import NodeInfo

LAYERS = ("m.layer0.q", "m.layer0.v", "m.layer1.q")
HEAD = "m.head.weight"


def initial_adapter(rank: int = 4, *, d_in: int = 8, d_out: int = 6, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Both factors random, a head; non-square layers so a transposed matrix cannot pass."""
    g = torch.Generator().manual_seed(0)
    state = {HEAD: torch.randn(3, d_in, generator=g, dtype=dtype)}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, d_in, generator=g, dtype=dtype)
        state[f"{layer}.lora_B.weight"] = torch.randn(d_out, rank, generator=g, dtype=dtype)
    return state


def nodes(ranks: list[int]) -> list[NodeInfo]:
    return [NodeInfo(node_id=100 + 7 * p, partition_id=p, rank=r, num_examples=10 + 7 * p) for p, r in enumerate(ranks)]


def train_messages(strategy: LoRAStrategy, server_round: int) -> list[Message]:
    return list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid=None))


def reply(
    strategy: LoRAStrategy, msg: Message, g: torch.Generator, *, upload: dict | None = None, **metrics
) -> Message:
    """What a client of the message's node sends back: random values for exactly the uploaded keys."""
    node = strategy.nodes[msg.metadata.dst_node_id]
    plan = protocol.decode_instruction(msg.content).plan
    if upload is None:
        template = resize_rank(strategy.adapter, node.rank)
        upload = {
            k: torch.randn(template[k].shape, generator=g, dtype=template[k].dtype)
            for k in strategy.upload_keys(node, plan)
        }
    values = {protocol.NUM_EXAMPLES: node.num_examples, protocol.RANK: node.rank, protocol.TRAIN_LOSS: 1.0, **metrics}
    return Message(protocol.encode_reply(upload, values), reply_to=msg)


def play_round(
    strategy: LoRAStrategy, server_round: int, g: torch.Generator, **metrics
) -> tuple[list[Message], list[Message]]:
    """One round of mock clients: (the train messages, the replies aggregated)."""
    messages = train_messages(strategy, server_round)
    replies = [reply(strategy, m, g, **metrics) for m in messages]
    strategy.aggregate_train(server_round, replies)
    return messages, replies
