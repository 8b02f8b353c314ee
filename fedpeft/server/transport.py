"""Messages between the server and its nodes over a Flower ``Grid``.

One exchange, and the handshake that opens a run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedpeft.config.schema import Config
from fedpeft.protocol import wire as protocol
from fedpeft.reporting.status import node_row, write_node_status
from fedpeft.server.errors import RunError
from fedpeft.strategies.types import NodeInfo


def exchange(grid: Grid, messages: list[Message], *, timeout: float, poll: float = 0.2) -> list[tuple[int, Message]]:
    """Send ``messages``; returns the replies that arrive within ``timeout`` s, each with its node.

    ``Grid.send_and_receive`` with two differences: a short poll (Flower's deployment grid sleeps
    3 s between pulls, which every exchange would pay for nothing), and a reply is attributed to
    the node its request went to — an error reply the SuperLink writes for a node that stopped
    sending heartbeats has the SuperLink, not that node, as its sender.
    """
    pending = set(grid.push_messages(messages))
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    replies: list[tuple[int, Message]] = []
    deadline = time.monotonic() + timeout
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend((sent_to[m.metadata.reply_to_message_id], m) for m in arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def handshake(
    grid: Grid, cfg: Config, run: protocol.RunInfo, *, timeout: float = 600.0, run_dir: Path | None = None
) -> list[NodeInfo]:
    """Wait for ``num_clients`` nodes, ask each for its partition, rank and data size; with ``run_dir``,
    write the node status table (``nodes.json``, and the log)."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise RunError(
                f"only {len(node_ids)} of num_clients={cfg.num_clients} nodes connected within {timeout:.0f} s"
            )
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    messages = [
        Message(protocol.encode_query(run), dst_node_id=n, message_type=MessageType.QUERY) for n in sorted(node_ids)
    ]
    nodes: list[NodeInfo] = []
    seen: dict[int, int] = {}  # partition id -> the node serving it
    status: list[dict[str, Any]] = []
    for node_id, reply in exchange(grid, messages, timeout=timeout):
        if reply.has_error():
            raise RunError(f"node {node_id} failed the handshake: {reply.error.reason}")
        hello = protocol.decode_query_reply(reply.content)
        info = NodeInfo(
            node_id=node_id, partition_id=hello.partition_id, rank=hello.rank, num_examples=hello.num_examples
        )
        if info.partition_id in seen:
            raise RunError(f"nodes {seen[info.partition_id]} and {node_id} both serve partition {info.partition_id}")
        seen[info.partition_id] = node_id
        nodes.append(info)
        status.append(node_row(node_id, hello, label_names=run.label_names))
    if run_dir is not None:
        write_node_status(status, run.label_names, run_dir)
    if len(nodes) < cfg.clients_per_round:
        raise RunError(
            f"{len(nodes)} nodes answered the handshake; clients_per_round={cfg.clients_per_round} needs more"
        )
    return sorted(nodes, key=lambda n: n.partition_id)
