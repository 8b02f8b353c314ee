"""The values the rules and the server loop pass around: a node, an accepted update, the global model, a round's report.

Plain dataclasses, no behaviour: :mod:`fedpeft.strategies.base` fills them, the rules and
:mod:`fedpeft.server` read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedpeft.protocol.records import State


@dataclass(frozen=True)
class NodeInfo:
    """What the server knows about one SuperNode after the handshake."""

    node_id: int
    partition_id: int
    rank: int | None  # None: a peft method without ranks
    num_examples: int


@dataclass
class ClientUpdate:
    """One accepted reply, converted to tensors."""

    node_id: int
    rank: int | None
    num_examples: int
    state: State
    metrics: dict[str, float]
    nbytes: int | None = None  # bytes the upload took on the wire (compressed or dense)


@dataclass
class GlobalModel:
    """The global model: the base with ``base_updates`` merged in, then ``adapter`` on top.

    ``adapter`` holds LoRA factors at rank ``rank`` and the head. ``base_updates[t]`` is the
    update merged into W after round t+1, as stacked LoRA factors (keys like an adapter's, A of
    shape (Σr, d_in), B of shape (d_out, Σr); ΔW = B @ A via ``fedpeft.protocol.records.stack_to_delta``).
    Empty for a rule that never calls :meth:`fedpeft.strategies.base.LoRAStrategy.merge_into_base`.
    """

    adapter: State
    rank: int | None
    base_updates: list[State] = field(default_factory=list)


@dataclass
class RoundReport:
    """What happened in one round, for ``metrics.jsonl``."""

    sampled: list[int] = field(default_factory=list)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # federated evaluation replies (metrics)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
