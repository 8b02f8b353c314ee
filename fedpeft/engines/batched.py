"""``engine=batched``: simulate the clients in the server process, several per pass over one base copy.

A Flower :class:`~flwr.serverapp.Grid` whose nodes live in this process. The server loop
(:func:`fedpeft.server.loop.run_federated`) runs over it unchanged: it pushes a round's messages, and
the grid answers each one with the ClientApp's own steps — :func:`fedpeft.clients.job.decode` the message
into a job with the node's context (partition id, state folder), train, :func:`fedpeft.clients.job.encode`
the reply — where the training of up to ``engine.clients_per_pass`` jobs shares one pass
(:mod:`clients.batched`). Replies carry what the Ray engine's replies carry, node state goes
through the same node store, so strategies, reply checks, metrics, checkpoints and resume do not
know which engine ran.

A client that fails (its decode raises, its loss diverges) gets an error reply, as from a Ray
worker: a pass that raises is run again one job at a time, so only the failing job fails.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.clients.app import app as client_app
from fedpeft.clients.batched import passes, train_pass
from fedpeft.clients.job import Job, JobResult, decode, encode, run_job
from fedpeft.config.schema import Config
from fedpeft.server.loop import run_federated

log = logging.getLogger("fedpeft")

SUPERLINK_NODE_ID = 1  # what Flower's own in-process grids use as the sender of instructions


class BatchedGrid(Grid):
    """``num_nodes`` simulated SuperNodes (partition ids 0..n-1) answered in this process."""

    def __init__(self, *, num_nodes: int, clients_per_pass: int, seed: int = 0) -> None:
        if clients_per_pass < 1:
            raise ValueError(f"engine.clients_per_pass must be >= 1, got {clients_per_pass}")
        self.clients_per_pass = clients_per_pass
        # Node ids are arbitrary and differ from partition ids, as in Flower's simulation.
        ids = random.Random(seed).sample(range(10**8, 10**9), num_nodes)
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for k, node_id in enumerate(ids)
        }
        self.replies: dict[str, Message] = {}
        self.passes: list[int] = []  # jobs per pass, for reports and tests

    # --- the Grid interface
    @property
    def run(self) -> Run:
        raise NotImplementedError("BatchedGrid has no Flower run object: fedpeft's server loop does not need one")

    def set_run(self, run: Run) -> None:
        pass

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"message to node {msg.metadata.dst_node_id}, which this grid does not have")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's InMemoryGrid does
        for msg, reply in zip(messages, self.answer(messages)):
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            self.replies[msg.metadata.message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # --- the clients
    def answer(self, messages: list[Message]) -> list[Message]:
        """One reply per message: decode all, train the passable jobs in passes and the rest alone, encode."""
        replies: list[Message | None] = [None] * len(messages)
        jobs: dict[int, Job] = {}
        for i, msg in enumerate(messages):
            context = self.contexts[msg.metadata.dst_node_id]
            if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
                replies[i] = self._guard(
                    msg, functools.partial(client_app, msg, context)
                )  # the handshake: the ClientApp's own handler
                continue
            try:
                jobs[i] = decode(msg, context)
            except Exception as err:  # noqa: BLE001 - a client's failure is its reply
                replies[i] = error_reply(msg, err)
        order = list(jobs)
        # decode set this process to client.num_cpus threads (a Ray worker's share); the engine
        # owns the process, so a pass uses every core it may run on.
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        results: dict[int, JobResult | Exception] = {}
        for idx in passes([jobs[i] for i in order], clients_per_pass=self.clients_per_pass):
            members = [order[j] for j in idx]
            try:
                results.update(zip(members, train_pass([jobs[i] for i in members])))
                self.passes.append(len(members))
            except Exception as err:  # noqa: BLE001
                log.warning("a batched pass of %d clients failed (%s); running them one at a time", len(members), err)
        for i in order:
            if i not in results:
                try:
                    results[i] = run_job(jobs[i])
                except Exception as err:  # noqa: BLE001
                    results[i] = err
        for i in order:
            result = results[i]
            replies[i] = (
                error_reply(messages[i], result)
                if isinstance(result, Exception)
                else self._guard(messages[i], functools.partial(encode, jobs[i], result))
            )
        return replies  # type: ignore[return-value]

    @staticmethod
    def _guard(msg: Message, make: Callable[[], Message]) -> Message:
        try:
            return make()
        except Exception as err:  # noqa: BLE001
            return error_reply(msg, err)


def error_reply(msg: Message, err: Exception) -> Message:
    """The error reply a ClientApp exception gets (the reason names the exception, as Flower's does)."""
    return Message(Error(code=0, reason=f"{type(err).__name__}: Message: {err}"), reply_to=msg)


def check_batched(cfg: Config) -> None:
    """What the batched engine refuses before anything starts."""
    if cfg.mode != "simulation":
        raise ValueError(
            f"engine=batched simulates clients in the server process; it needs mode=simulation, got mode={cfg.mode!r}"
        )
    if cfg.faults.crash_prob > 0 or cfg.faults.hang_prob > 0:
        raise ValueError(
            "engine=batched runs the clients in the server process: faults.crash_prob / faults.hang_prob would kill "
            "or stall the server; use engine=ray"
        )
    if cfg.ray.address:
        raise ValueError("ray.address is for engine=ray; engine=batched runs in the server process")


def run_batched(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Run the federated loop over a :class:`BatchedGrid`; returns the metrics rows."""

    check_batched(cfg)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    # Messages read their run id from the process's task identity, which Flower sets for a ServerApp.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        grid = BatchedGrid(num_nodes=cfg.num_clients, clients_per_pass=cfg.engine.clients_per_pass, seed=cfg.seed)
        return run_federated(cfg, grid, run_dir)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
