"""Worker counters on client replies, for tests only: a Flower client mod and the ClientApp that carries it.

Production replies carry what the server aggregates and reports, nothing about the process that
answered. The end-to-end tests need three facts about that process, so the ClientApp they run
(:data:`app`: fedpeft's own handlers with the :func:`worker_counters` mod, installed by the
``worker_counters`` fixture in ``tests/conftest.py``) adds them to every train and evaluate reply's
metrics; ``metrics.jsonl``'s per-client rows show them with ``_`` for ``-``:

* ``base-loads``: how many times the worker process has loaded base weights from disk (the base
  is loaded once per worker, not once per client or round);
* ``worker-pid``: the worker's process id (workers are reused across clients and rounds);
* ``lora-a-crc32`` (train replies): a CRC-32 of the adapter's LoRA A tensors after the round,
  uploaded or not (a frozen, seeded A is the same on every client).

The app is defined in this importable module, not in a test: Ray pickles it with its mod by
reference, and each worker imports this module (and fedpeft's caches) once.
"""

from __future__ import annotations

import os
import zlib

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

import fedpeft.clients.app as fedpeft_app
from fedpeft.clients.job import worker_model
from fedpeft.clients.node import local_data, partition_id
from fedpeft.config.schema import from_json
from fedpeft.models import adapters as models
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import State, resize_rank

BASE_LOADS = "base-loads"
WORKER_PID = "worker-pid"
LORA_A_CRC32 = "lora-a-crc32"


def worker_counters(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: the handler's reply, with this worker's counters added to its metrics."""
    reply = call_next(msg, context)
    kind = msg.metadata.message_type
    if reply.has_error() or kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        return reply
    metrics = reply.content.metric_records[protocol.METRICS_RECORD]
    metrics[BASE_LOADS] = models.BASE_MODEL_LOADS
    metrics[WORKER_PID] = os.getpid()
    if kind == MessageType.TRAIN:
        rank = metrics.get(protocol.RANK)
        metrics[LORA_A_CRC32] = lora_a_crc32(
            trained_adapter(msg, context, rank=rank if isinstance(rank, int) else None)
        )
    return reply


def trained_adapter(msg: Message, context: Context, *, rank: int | None) -> State:
    """The adapter the job of ``msg`` left on this worker's cached model, at the rank it replied with."""
    instruction = protocol.decode_instruction(msg.content)
    cfg = from_json(instruction.run.config_json)
    num_labels, _, _ = local_data(cfg, partition_id(context), context, instruction.run)  # cached in the worker
    state = worker_model(cfg, num_labels).adapter_state(instruction.plan.rank)
    return resize_rank(state, rank) if rank is not None and rank != instruction.plan.rank else state


def lora_a_crc32(state: State) -> int:
    """CRC-32 of the LoRA A tensors' bytes, in key order."""
    a_keys = protocol.keys_with_roles(list(state), frozenset({protocol.LORA_A}))
    return zlib.crc32(b"".join(state[k].numpy().tobytes() for k in a_keys))


app = ClientApp(mods=[worker_counters])
app.query()(fedpeft_app.query)
app.train()(fedpeft_app.train)
app.evaluate()(fedpeft_app.evaluate)
