"""The fedpeft ClientApp: the Flower handlers, each a thin shell over the three client steps.

This module must be imported, never run as ``__main__``: Ray pickles a ClientApp defined in
``__main__`` by value, which would drop the per-process caches and reload the base model for
every client (a GPU round took 36 s instead of 15 s that way).

* ``query``: the handshake. Replies with the node's partition id, rank, number of examples, label
  counts and tier (for the server's node status table).
* ``train`` and ``evaluate``: :func:`fedpeft.clients.job.decode` the message's plan into a job,
  :func:`fedpeft.clients.job.train_jobs` runs it, :func:`fedpeft.clients.job.encode` writes the
  reply. What to start from, what to train, upload, keep and evaluate is all in the plan
  (:mod:`fedpeft.protocol.wire`); nothing here knows which aggregation rule the server runs.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.clients.job import decode, encode, train_jobs
from fedpeft.clients.node import local_data, node_rank, partition_id
from fedpeft.config.schema import from_json
from fedpeft.data.encoding import label_counts
from fedpeft.protocol import wire as protocol

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: which partition, rank and how many training examples this node has."""
    run = protocol.run_info(msg.content)
    cfg = from_json(run.config_json)
    torch.set_num_threads(max(1, int(cfg.client.num_cpus)))
    pid = partition_id(context)
    num_labels, train_examples, _ = local_data(cfg, pid, context, run)
    labels = label_counts([e["labels"] for e in train_examples], num_labels) if cfg.model.task == "seq_cls" else []
    tier = context.node_config.get(protocol.NODE_TIER) or (
        cfg.strategy.client_tiers[pid] if cfg.strategy.client_tiers and not cfg.strategy.ranks else None
    )
    hello = protocol.NodeHello(
        partition_id=pid, rank=node_rank(cfg, pid, context.node_config), num_examples=len(train_examples),
        label_counts=tuple(labels), tier=None if tier is None else str(tier),
    )  # fmt: skip
    return Message(protocol.encode_query_reply(hello), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local work as the message's plan says."""
    job = decode(msg, context)
    (result,) = train_jobs([job])
    return encode(job, result)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model the plan builds (global, or the node's personal one) on the validation slice."""
    job = decode(msg, context)
    (result,) = train_jobs([job])
    return encode(job, result)
