"""The base class of the rules, :class:`LoRAStrategy`: seeded sampling, per-client ranks, plans, the moving base.

A rule subclasses :class:`LoRAStrategy` and overrides at most a few hooks:

* :meth:`LoRAStrategy.groups` — what each client does with each group of adapter tensors this
  round (a tuple of :class:`fedpeft.protocol.wire.GroupPlan`; default: one group, sent, trained and
  uploaded). The tensors a client receives and must send back follow from it.
* :meth:`LoRAStrategy.aggregate` — the rule's math on the accepted updates (tensors only);
* :meth:`LoRAStrategy.merge_into_base` (a call, not a hook) — a rule that moves the base records a
  round's stacked factors here; the base class sends every node the updates it has missed,
  checkpoints them and keeps the server's global model on the same base.

Everything that touches Flower messages lives here, in :mod:`fedpeft.strategies.validation` (whether
a reply may be aggregated) and in :mod:`fedpeft.protocol.wire`, so a rule file is its equations
plus a few lines of glue. Incoming messages are never mutated. The values passed around (nodes,
updates, the global model, round reports) are in :mod:`fedpeft.strategies.types`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft.config.schema import Config, StrategyConfig
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import State, resize_rank, split_state, state_nbytes, to_record
from fedpeft.protocol.wire import BasePlan, ClientPlan, Evaluate, GroupPlan, RunInfo, Source
from fedpeft.strategies import validation
from fedpeft.strategies.types import ClientUpdate, GlobalModel, NodeInfo, RoundReport
from fedpeft.strategies.validation import RejectedUpdate, short_reason

log = logging.getLogger(__name__)


class LoRAStrategy(FedAvg):
    """Base class of the rules (a Flower message-API strategy).

    Parameters
    ----------
    initial_adapter:
        The starting adapter (peft state dict) at the largest rank any client uses: LoRA factors
        and head, or any other peft method's trainable tensors.
    clients_per_round:
        Nodes sampled per round, uniformly without replacement from a generator seeded by ``seed``
        (Flower's own sampling is unseeded, so two runs would train different clients).
    min_clients:
        A round whose accepted replies are fewer than this leaves the global model untouched.
    """

    name = "base"
    has_global_model = True  # False: no model the server could evaluate or save (every client's is its own)
    config_class: type[StrategyConfig] = StrategyConfig  # a rule with options of its own subclasses it
    # The peft methods (``model.peft``) whose adapters this rule can federate; None: any. The
    # default is plain LoRA, as a rule that works on LoRA factors needs (DoRA's magnitude breaks B@A).
    peft_methods: tuple[str, ...] | None = ("lora",)
    # Whether the rule calls merge_into_base: checked at start (a quantized base cannot absorb a merge).
    moves_base: bool = False

    def __init__(self, initial_adapter: State, *, clients_per_round: int, seed: int, min_clients: int = 1) -> None:
        super().__init__(
            fraction_evaluate=0.0, min_train_nodes=clients_per_round, min_available_nodes=clients_per_round
        )
        pairs, _ = split_state(initial_adapter)
        if not initial_adapter:
            raise ValueError("the initial adapter holds no trainable tensors")
        if not pairs and self.peft_methods is not None and "lora" in self.peft_methods:
            raise ValueError(
                f"strategy {self.name!r} works on LoRA factors and the initial adapter has none "
                "(no '.lora_A.weight' keys)"
            )
        self.adapter: State = {k: v.detach().clone() for k, v in initial_adapter.items()}
        # Ranks exist only where there are LoRA factors; other peft methods have none.
        self.max_rank: int | None = initial_adapter[pairs[0].a_key].shape[0] if pairs else None
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.seed = seed
        self.rng = random.Random(seed)
        self.nodes: dict[int, NodeInfo] = {}
        self.reports: dict[int, RoundReport] = {}
        # The run every message belongs to (set by fedpeft.server.loop before round 1).
        self.run = RunInfo(config_json="")
        self.lineage = ""
        # The moving base (merge_into_base): base_updates[t] is merged after round t + 1; synced maps
        # a partition id to how many of them that node has received.
        self.base_updates: list[State] = []
        self.synced: dict[int, int] = {}
        self.sent: dict[int, ClientPlan] = {}  # node id -> the plan of its latest train message

    # ------------------------------------------------------------------ hooks for the rules

    @property
    def lora_rank(self) -> int:
        """The global LoRA rank, for a rule whose peft methods all have ranks (refused at start otherwise)."""
        if self.max_rank is None:
            raise ValueError(f"{self.name} works on LoRA factors, and this adapter has none")
        return self.max_rank

    def groups(self, node: NodeInfo, server_round: int) -> tuple[GroupPlan, ...]:
        """What ``node`` does with each group of adapter tensors in ``server_round``.

        Default: every tensor starts from the global adapter (sent in the message), trains and
        goes back up.
        """
        return protocol.single_group(source=Source.MESSAGE)

    def evaluate_after_training(self, node: NodeInfo, server_round: int) -> Evaluate:
        """What a training client evaluates on its validation slice (default: its trained model)."""
        return Evaluate.PERSONAL

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        """Fold the accepted updates into the global state; return extra per-round figures."""
        raise NotImplementedError

    def evaluation_plan(self, node: NodeInfo, server_round: int) -> ClientPlan | None:
        """The evaluation hook: what ``node`` evaluates on its validation slice after ``server_round``.

        None (the default): no federated evaluation round; the clients' accuracy after local
        training (in their train replies) is what ``metrics.jsonl`` summarises. A rule returns
        :meth:`global_evaluation` or :meth:`personal_evaluation`, or a plan of its own.
        """
        return None

    def global_evaluation(self, node: NodeInfo, server_round: int) -> ClientPlan:
        """Evaluate the global adapter (sent in the message) on the node's validation slice."""
        groups = protocol.single_group(source=Source.MESSAGE, train=False, upload=False)
        return ClientPlan(
            groups=groups,
            server_round=server_round,
            rank=self.node_rank(node),
            base=self.base_plan(node),
            evaluate=Evaluate.GLOBAL,
        )

    def personal_evaluation(
        self, node: NodeInfo, server_round: int, *, personal: frozenset[str], fallback: Source = Source.ZERO
    ) -> ClientPlan:
        """Evaluate the node's own model: roles in ``personal`` from its kept state (``fallback`` for a
        node that has none), the rest from the message."""
        groups = [GroupPlan(roles=personal, source=Source.NODE, fallback=fallback, train=False, upload=False)]
        if protocol.ALL_ROLES - personal:
            groups.append(
                GroupPlan(roles=protocol.ALL_ROLES - personal, source=Source.MESSAGE, train=False, upload=False)
            )
        return ClientPlan(
            groups=tuple(groups),
            server_round=server_round,
            rank=self.node_rank(node),
            base=self.base_plan(node),
            evaluate=Evaluate.PERSONAL,
        )

    def global_model(self) -> GlobalModel:
        return GlobalModel(
            adapter={k: v.clone() for k, v in self.adapter.items()},
            rank=self.max_rank,
            base_updates=list(self.base_updates),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this strategy exactly (for checkpoints)."""
        return {
            "adapter": self.adapter,
            "rng": self.rng.getstate(),
            "base_updates": self.base_updates,
            "synced": dict(self.synced),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.adapter = {k: v.clone() for k, v in state["adapter"].items()}
        self.rng.setstate(state["rng"])
        self.base_updates = [dict(u) for u in state["base_updates"]]
        self.synced = dict(state["synced"])

    # ------------------------------------------------------------------ the moving base
    def merge_into_base(self, stack: State) -> None:
        """Merge ``ΔW = B_stack @ A_stack`` into the global base after this round.

        ``stack`` holds, per adapted layer, ``<module>.lora_A.weight: (Σr, d_in)`` (scalings
        folded in) and ``<module>.lora_B.weight: (d_out, Σr)``. Every client is sent the stacks it
        has not seen with its next plan and merges them with peft's layer semantics
        (``fan_in_fan_out``), as does the server's evaluator; the ledger is checkpointed.
        """
        pairs, others = split_state(stack)
        if others or not pairs:
            raise ValueError(f"a base update holds LoRA stacks only; got other keys {others[:3]}")
        self.base_updates.append({k: v.detach().clone() for k, v in stack.items()})

    def base_plan(self, node: NodeInfo) -> BasePlan:
        """The base ``node`` must train on: every update so far, with those it has not received."""
        missed = range(self.synced.get(node.partition_id, 0), len(self.base_updates))
        return BasePlan(
            lineage=self.lineage, version=len(self.base_updates), updates={t + 1: self.base_updates[t] for t in missed}
        )

    # ------------------------------------------------------------------ plans and messages
    def node_rank(self, node: NodeInfo) -> int | None:
        """The rank ``node`` trains at; None for a peft method without ranks."""
        return node.rank if self.max_rank is not None else None

    def plan(self, node: NodeInfo, server_round: int, *, attempt: int = 0) -> ClientPlan:
        """The full plan of ``node`` for ``server_round``: the rule's groups, its rank and the base."""
        return ClientPlan(
            groups=self.groups(node, server_round),
            server_round=server_round,
            rank=self.node_rank(node),
            base=self.base_plan(node),
            evaluate=self.evaluate_after_training(node, server_round),
            attempt=attempt,
        )

    def node_adapter(self, node: NodeInfo) -> State:
        """The global adapter at ``node``'s rank (the shapes its tensors have)."""
        rank = self.node_rank(node)
        return resize_rank(self.adapter, rank) if rank is not None else {k: v.clone() for k, v in self.adapter.items()}

    def message_tensors(self, node: NodeInfo, plan: ClientPlan) -> State:
        """The tensors a plan sends: the global adapter's keys in message-sourced groups."""
        adapter = self.node_adapter(node)
        # A node-sourced group whose fallback is the message needs the value too, for a node with no state.
        sent = [k for k in adapter if Source.MESSAGE in (plan.group_of(k).source, plan.group_of(k).fallback)]
        return {k: adapter[k] for k in sorted(sent)}

    def upload_keys(self, node: NodeInfo, plan: ClientPlan) -> set[str]:
        """Keys ``node`` must send back under ``plan``."""
        return set(plan.keys(list(self.adapter), upload=True))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled node; ``config`` may carry the round's ``attempt``."""
        report = self.reports.setdefault(server_round, RoundReport())
        report.sampled = self.sample(server_round)
        attempt = int(cast(int, config.get(protocol.ATTEMPT, 0)))
        messages = []
        for node_id in report.sampled:
            node = self.nodes[node_id]
            plan = self.plan(node, server_round, attempt=attempt)
            tensors = self.message_tensors(node, plan)
            self.sent[node_id] = plan
            report.bytes_down[node_id] = state_nbytes(tensors) + sum(
                state_nbytes(t) for t in plan.base.updates.values()
            )
            content = protocol.encode_instruction(self.run, plan, tensors)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluate message per registered node that :meth:`evaluation_plan` gives a plan."""
        messages = []
        for node_id in sorted(self.nodes, key=self.order_key):
            node = self.nodes[node_id]
            plan = self.evaluation_plan(node, server_round)
            if plan is None:
                continue
            content = protocol.encode_instruction(self.run, plan, self.message_tensors(node, plan))
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each node's validation metrics in the round's report (errors are skipped and logged)."""
        report = self.reports.setdefault(server_round, RoundReport())
        for msg in replies:
            node = self.nodes.get(msg.metadata.src_node_id)
            if msg.has_error() or node is None:
                log.warning(
                    "round %d: evaluation on node %s failed: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    short_reason(msg.error.reason or "") if msg.has_error() else "unknown node",
                )
                continue
            try:
                _, metrics = protocol.decode_reply(msg.content, with_tensors=False)
            except protocol.ProtocolError as err:
                log.warning("round %d: evaluation reply of node %d refused: %s", server_round, node.node_id, err)
                continue
            report.evaluations.append({"node": node.node_id, "partition": node.partition_id, **metrics})
        return None

    # ------------------------------------------------------------------ Flower plumbing
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, before anything starts, a :class:`fedpeft.config.schema.Config` this rule cannot run.

        The default refuses none.
        """

    @classmethod
    def from_config(cls, cfg: Config, initial_adapter: State) -> LoRAStrategy:
        """Build from a :class:`fedpeft.config.schema.Config`; rules with options of their own override this."""
        return cls(initial_adapter, clients_per_round=cfg.clients_per_round, seed=cfg.seed, min_clients=cfg.min_clients)

    def register_nodes(self, nodes: Iterable[NodeInfo]) -> None:
        for node in nodes:
            if self.max_rank is not None and (node.rank is None or node.rank > self.max_rank):
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

    def check_reply(self, msg: Message, server_round: int) -> ClientUpdate:
        """Turn a reply into a :class:`ClientUpdate`, or raise :class:`RejectedUpdate` saying why.

        The checks are :func:`fedpeft.strategies.validation.check_reply`.
        """
        node_id = msg.metadata.src_node_id
        node = self.nodes.get(node_id)
        plan = self.sent.get(node_id)
        if node is None or plan is None:
            raise RejectedUpdate("reply from a node that was not registered or sent no plan")
        return validation.check_reply(
            msg, node, plan, adapter=self.node_adapter(node), expected=self.upload_keys(node, plan)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, aggregate the accepted ones; error replies are counted by the caller.

        Returns Flower's pair (the new global adapter, round metrics), or ``(None, None)`` when
        fewer than ``min_clients`` replies were accepted and the global model is unchanged.
        """
        report = self.reports.setdefault(server_round, RoundReport())
        updates: list[ClientUpdate] = []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                continue  # fedpeft.server.loop.train_round records it among the round's failures
            if node_id in self.nodes and node_id in self.sent:  # a node that replied holds the base it was sent
                self.synced[self.nodes[node_id].partition_id] = self.sent[node_id].base.version
            try:
                update = self.check_reply(msg, server_round)
            except RejectedUpdate as err:
                report.rejected.append({"node": node_id, "reason": str(err)})
                log.warning("round %d: rejected the update of node %d: %s", server_round, node_id, err)
                continue
            report.bytes_up[node_id] = update.nbytes if update.nbytes is not None else state_nbytes(update.state)
            rank = {} if update.rank is None else {"rank": update.rank}
            report.clients.append(
                {"node": node_id, "partition": self.nodes[node_id].partition_id, **rank, **update.metrics}
            )
            updates.append(update)
        if len(updates) < max(self.min_clients, 1):
            log.warning(
                "round %d: %d accepted updates < min_clients=%d; global model unchanged",
                server_round,
                len(updates),
                self.min_clients,
            )
            return None, None
        updates.sort(key=lambda u: self.order_key(u.node_id))  # never depends on arrival order
        counts = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights = counts / counts.sum()
        report.extra = self.aggregate(updates, weights, server_round)
        train_loss = float(
            sum(w * u.metrics.get(protocol.TRAIN_LOSS, float("nan")) for w, u in zip(weights.tolist(), updates))
        )
        metrics = MetricRecord(
            {
                protocol.TRAIN_LOSS: train_loss,
                protocol.NUM_EXAMPLES: int(counts.sum().item()),
                "clients-replied": len(updates),
            }
        )
        return to_record(self.adapter), metrics
