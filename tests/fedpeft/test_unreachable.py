"""Per round, ``metrics.jsonl`` names the nodes that were unreachable: gone (the SuperLink's
``NODE_UNAVAILABLE``) or silent past ``round_timeout``; a node that answered with an error failed
but was reachable. Over the in-process Grid with the real client steps."""

from __future__ import annotations

from flwr.app import Error, Message, MessageType
from flwr.common.constant import ErrorCode

from fedpeft.clients.app import app
from fedpeft.server.loop import run_federated
from tests.fakegrid import InProcessGrid
from tests.fedpeft.test_config import compose_cfg

GONE, SILENT, RAISES = 0, 1, 2  # partitions; partition 3 trains normally


class FlakyGrid(InProcessGrid):
    """After the handshake: partition 0 is gone, 1 never answers, 2 answers with an error."""

    def push_messages(self, messages):
        messages = list(messages)
        normal = [m for m in messages if m.metadata.message_type != MessageType.TRAIN or self.partition(m) == 3]
        ids = list(super().push_messages(normal))
        for msg in (m for m in messages if m not in normal):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            if self.partition(msg) == SILENT:
                continue
            code, reason = (
                (ErrorCode.NODE_UNAVAILABLE, "Node Unavailable")
                if self.partition(msg) == GONE
                else (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: boom")
            )
            reply = Message(Error(code=code, reason=reason), reply_to=msg)
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            self.replies[msg.metadata.message_id] = reply
        return ids

    def partition(self, msg: Message) -> int:
        return int(self.contexts[msg.metadata.dst_node_id].node_config["partition-id"])


def test_gone_and_silent_nodes_are_unreachable_a_failing_one_is_not(tmp_path):
    # Prepare
    cfg = compose_cfg([
        "num_rounds=1", "num_clients=4", "clients_per_round=4", "min_clients=1", "round_timeout=1", "save_adapter=false",
        "data.max_samples=100", "data.partitioner=iid", "model.max_length=16", "client.local_steps=1",
    ])  # fmt: skip
    grid = FlakyGrid(app, [{"partition-id": k} for k in range(4)])
    # Execute
    (row,) = run_federated(cfg, grid, tmp_path)
    # Assert
    by_partition = {int(c.node_config["partition-id"]): node for node, c in grid.contexts.items()}
    assert row["clients_replied"] == 1 and row["clients_failed"] == 3
    assert row["unreachable"] == [
        {"node": by_partition[GONE], "partition": GONE},
        {"node": by_partition[SILENT], "partition": SILENT},
    ]
    assert {f["node"] for f in row["failures"]} == {by_partition[p] for p in (GONE, SILENT, RAISES)}
