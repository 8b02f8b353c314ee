"""Plumbing shared by every LoRA rule: seeded sampling, per-client ranks, reply checks, byte counts.

A rule subclasses :class:`LoRAStrategy` and overrides at most four hooks:

* :meth:`LoRAStrategy.payload` — the tensors and instructions one client receives;
* :meth:`LoRAStrategy.upload_keys` — the keys a client of rank r must send back;
* :meth:`LoRAStrategy.aggregate` — the rule's math on the accepted updates (tensors only);
* :meth:`LoRAStrategy.global_model` — the current global model, for evaluation and saving.

Everything that touches Flower messages lives here, so a rule file is its equations plus a few
lines of glue. Incoming messages are never mutated.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.records import State, from_record, resize_rank, split_state, state_nbytes, to_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeInfo:
    """What the server knows about one SuperNode after the handshake."""

    node_id: int
    partition_id: int
    rank: int
    num_examples: int


@dataclass
class ClientUpdate:
    """One accepted reply, converted to tensors."""

    node_id: int
    rank: int
    num_examples: int
    state: State
    metrics: dict[str, float]


@dataclass
class GlobalModel:
    """The global model: the base with ``base_updates`` merged in, then ``adapter`` on top.

    ``adapter`` holds LoRA factors at rank ``rank`` and the head. ``base_updates[t]`` is the
    update merged into W after round t+1, as stacked LoRA factors (keys like an adapter's, A of
    shape (Σr, d_in), B of shape (d_out, Σr); ΔW = B @ A via ``fedpeft.records.stack_to_delta``).
    Only FLoRA moves the base; for the other rules the list is empty.
    """

    adapter: State
    rank: int
    base_updates: list[State] = field(default_factory=list)


@dataclass
class RoundReport:
    """What happened in one round, for ``metrics.jsonl``."""

    sampled: list[int] = field(default_factory=list)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


def short_reason(reason: str, *, limit: int = 300) -> str:
    """The client's own exception message out of a Ray/Flower traceback, cut to ``limit`` characters."""
    marker = "Message: "
    if marker in reason:
        reason = reason[reason.rindex(marker) + len(marker) :]
    reason = reason.strip().strip("'>").strip()
    reason = reason.splitlines()[0] if reason else "unknown error"
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


class RejectedUpdate(ValueError):
    """A client reply that must not be aggregated; the message says why."""


class LoRAStrategy(FedAvg):
    """Base class of the LoRA rules (a Flower message-API strategy).

    Parameters
    ----------
    initial_adapter:
        The starting adapter at the largest rank any client uses (LoRA factors and head).
    clients_per_round:
        Nodes sampled per round, uniformly without replacement from a generator seeded by ``seed``
        (Flower's own sampling is unseeded, so two runs would train different clients).
    min_clients:
        A round whose accepted replies are fewer than this leaves the global model untouched.
    """

    name = "base"

    def __init__(
        self,
        initial_adapter: State,
        *,
        clients_per_round: int,
        seed: int,
        min_clients: int = 1,
        train_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fraction_evaluate=0.0, min_train_nodes=clients_per_round, min_available_nodes=clients_per_round)
        pairs, _ = split_state(initial_adapter)
        if not pairs:
            raise ValueError("the initial adapter holds no LoRA factors (no '.lora_A.weight' keys)")
        self.adapter: State = {k: v.detach().clone() for k, v in initial_adapter.items()}
        self.max_rank = initial_adapter[pairs[0].a_key].shape[0]
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.seed = seed
        self.rng = random.Random(seed)
        self.nodes: dict[int, NodeInfo] = {}
        self.train_config = dict(train_config or {})
        self.reports: dict[int, RoundReport] = {}

    # ------------------------------------------------------------------ hooks for the rules
    def payload(self, node: NodeInfo, server_round: int) -> tuple[State, dict[str, Any]]:
        """Tensors and instructions for one client: by default the global adapter at its rank."""
        return resize_rank(self.adapter, node.rank), {"lora-init": "load"}

    def extra_payload(self, node: NodeInfo, server_round: int) -> dict[str, State]:
        """Further named records for one client (FLoRA: the base updates it has not seen)."""
        return {}

    def upload_keys(self, rank: int) -> set[str]:
        """Keys a rank-``rank`` client must send back (default: every adapter tensor)."""
        return set(self.adapter)

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        """Fold the accepted updates into the global state; return extra per-round figures."""
        raise NotImplementedError

    def global_model(self) -> GlobalModel:
        return GlobalModel(adapter={k: v.clone() for k, v in self.adapter.items()}, rank=self.max_rank)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this strategy exactly (for checkpoints)."""
        return {"adapter": self.adapter, "rng": self.rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.adapter = {k: v.clone() for k, v in state["adapter"].items()}
        self.rng.setstate(state["rng"])

    # ------------------------------------------------------------------ Flower plumbing
    @classmethod
    def from_config(cls, cfg: Any, initial_adapter: State) -> "LoRAStrategy":
        """Build from a :class:`fedpeft.config.Config`; rules with options of their own override this."""
        return cls(initial_adapter, clients_per_round=cfg.clients_per_round, seed=cfg.seed, min_clients=cfg.min_clients)

    def register_nodes(self, nodes: Iterable[NodeInfo]) -> None:
        for node in nodes:
            if node.rank > self.max_rank:
                raise ValueError(f"node {node.node_id} asks for rank {node.rank} > the global rank {self.max_rank}")
            self.nodes[node.node_id] = node

    def sample(self, server_round: int) -> list[int]:
        # Sample over partition ids, not node ids: node ids are random per run, partition ids are not.
        candidates = sorted(self.nodes, key=self.order_key)
        if len(candidates) < self.clients_per_round:
            raise RuntimeError(f"round {server_round}: {len(candidates)} nodes known, {self.clients_per_round} needed")
        return sorted(self.rng.sample(candidates, self.clients_per_round), key=self.order_key)

    def order_key(self, node_id: int) -> int:
        """Clients are sampled and aggregated in partition order, so the float sums are reproducible."""
        return self.nodes[node_id].partition_id

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        report = self.reports.setdefault(server_round, RoundReport())
        report.sampled = self.sample(server_round)
        messages = []
        for node_id in report.sampled:
            node = self.nodes[node_id]
            tensors, instructions = self.payload(node, server_round)
            extra = self.extra_payload(node, server_round)
            cfg = ConfigRecord({**dict(config), **self.train_config, **instructions, "server-round": server_round, "rank": node.rank})
            report.bytes_down[node_id] = state_nbytes(tensors) + sum(state_nbytes(t) for t in extra.values())
            content = RecordDict({self.arrayrecord_key: to_record(tensors), self.configrecord_key: cfg, **{k: to_record(v) for k, v in extra.items()}})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def check_reply(self, msg: Message, server_round: int) -> ClientUpdate:
        """Turn a reply into a :class:`ClientUpdate`, or raise :class:`RejectedUpdate` saying why."""
        node_id = msg.metadata.src_node_id
        node = self.nodes.get(node_id)
        if node is None:
            raise RejectedUpdate("reply from a node that was not registered")
        content = msg.content
        if self.arrayrecord_key not in content.array_records or not content.metric_records:
            raise RejectedUpdate("reply has no adapter tensors or no metrics")
        metrics = dict(next(iter(content.metric_records.values())))
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(float(v)) for v in values):
                raise RejectedUpdate(f"metric {key!r} is not finite ({value})")
        num_examples = metrics.get("num-examples")
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise RejectedUpdate(f"num-examples must be a positive integer, got {num_examples!r}")
        if num_examples != node.num_examples:
            raise RejectedUpdate(f"num-examples {num_examples} differs from the {node.num_examples} the node declared")
        if metrics.get("rank") != node.rank:
            raise RejectedUpdate(f"rank {metrics.get('rank')} differs from the assigned rank {node.rank}")
        state = from_record(content.array_records[self.arrayrecord_key])
        expected = self.upload_keys(node.rank)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RejectedUpdate(f"adapter keys differ: missing {missing[:2]}{'...' if len(missing) > 2 else ''}, unexpected {extra[:2]}")
        reference = resize_rank(self.adapter, node.rank)
        for key, tensor in state.items():
            ref = reference[key]
            if tensor.shape != ref.shape:
                raise RejectedUpdate(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(ref.shape)} (rank {node.rank})")
            if tensor.dtype != ref.dtype:
                raise RejectedUpdate(f"{key}: dtype {tensor.dtype}, expected {ref.dtype}")
            if not torch.isfinite(tensor).all():
                raise RejectedUpdate(f"{key}: contains NaN or Inf")
        return ClientUpdate(node_id=node_id, rank=node.rank, num_examples=num_examples, state=state, metrics=metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.reports.setdefault(server_round, RoundReport())
        updates: list[ClientUpdate] = []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                reason = short_reason(msg.error.reason)
                report.failures.append({"node": node_id, "reason": reason})
                log.warning("round %d: node %d failed: %s", server_round, node_id, reason)
                continue
            try:
                update = self.check_reply(msg, server_round)
            except RejectedUpdate as err:
                report.rejected.append({"node": node_id, "reason": str(err)})
                log.warning("round %d: rejected the update of node %d: %s", server_round, node_id, err)
                continue
            report.bytes_up[node_id] = state_nbytes(update.state)
            report.clients.append({"node": node_id, "partition": self.nodes[node_id].partition_id, "rank": update.rank, **update.metrics})
            updates.append(update)
        if len(updates) < max(self.min_clients, 1):
            log.warning("round %d: %d accepted updates < min_clients=%d; global model unchanged", server_round, len(updates), self.min_clients)
            return None, None
        updates.sort(key=lambda u: self.order_key(u.node_id))  # never depends on arrival order
        counts = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights = counts / counts.sum()
        report.extra = self.aggregate(updates, weights, server_round)
        train_loss = float(sum(w * u.metrics.get("train-loss", float("nan")) for w, u in zip(weights.tolist(), updates)))
        metrics = MetricRecord({"train-loss": train_loss, "num-examples": int(counts.sum().item()), "clients-replied": len(updates)})
        return to_record(self.adapter), metrics
