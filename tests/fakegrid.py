"""An in-process Flower ``Grid`` that hands each message straight to a ClientApp.

The server loop (:func:`fedpeft.server.loop.run_federated`) runs unchanged over it, and every client
step is the real one; only Ray and the network are left out. Node ids are arbitrary and differ
from partition ids, as in a real run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


def set_task_identity() -> None:
    """Messages built outside a running ServerApp need a run id (Flower reads it from the process)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        if getattr(TaskIdentity, name) is None:
            setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict[str, Any]]) -> None:
        set_task_identity()
        self.app = client_app
        self.contexts = {
            1000 + 37 * k: Context(
                run_id=1, node_id=1000 + 37 * k, node_config=dict(cfg), state=RecordDict(), run_config={}
            )
            for k, cfg in enumerate(node_configs)
        }
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    # --- the Grid methods fedpeft.server.loop uses
    @property
    def run(self):  # pragma: no cover - not used by fedpeft
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # pragma: no cover
        pass

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # what Flower does with a ClientApp exception
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: Message: {err}"), reply_to=msg)
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
