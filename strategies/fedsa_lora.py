"""FedSA-LoRA: only A is shared; each client keeps its own B on its node between rounds.

"Selective Aggregation for Low-Rank Adaptation in Federated Learning", Guo et al., ICLR 2025,
https://arxiv.org/abs/2410.01463

The paper finds that the A matrices learn what is general across clients and the B matrices
what is client-specific. Server: ``Ā = Σ_k p_k A_k`` (heterogeneous ranks zero-padded to r_max;
client k takes back ``Ā[:r_k]``). B_k never leaves node k: it starts at zero on a node that never
trained and is otherwise the B the node trained last, read from the node's state. There is no
global B: client k's model is ``W + s B_k Ā``, so evaluation is personalised only — every client
evaluates its own model on its own held-out slice and the server reports the example-weighted
mean and its spread. Up 0.5×, down 0.5× (A and the head; the head is averaged like A).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from fedpeft.config.schema import Config, StrategyConfig
from fedpeft.protocol.records import State, resize_factor, split_state
from fedpeft.protocol.wire import (
    LORA_A,
    LORA_B,
    OTHER,
    VAL_ACCURACY,
    VAL_EXAMPLES,
    ClientPlan,
    Evaluate,
    GroupPlan,
    Source,
)
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import check_weights, weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo


def fedsa_aggregate(lora_as: Sequence[torch.Tensor], weights: torch.Tensor, *, rank: int) -> torch.Tensor:
    """``Ā = Σ_k p_k pad(A_k)``: ``lora_as[k]: (r_k, d_in)`` -> ``(rank, d_in)``."""
    return weighted_sum([resize_factor(a, rank, dim=0) for a in lora_as], weights)


def personal_summary(values: Sequence[float], weights: torch.Tensor) -> tuple[float, float]:
    """Example-weighted mean and standard deviation of the clients' own evaluation figures.

    ``values[k]`` is client k's figure (e.g. accuracy of ``W + s B_k Ā`` on its held-out slice),
    ``weights[k] = n_k / Σ n_j`` over the clients that evaluated; returns ``(mean, spread)`` with
    ``spread = sqrt(Σ_k p_k (v_k − mean)²)``.
    """
    check_weights(weights, count=len(values))
    v = torch.tensor(list(values), dtype=torch.float64)
    mean = float((weights * v).sum())
    return mean, float((weights * (v - mean) ** 2).sum().sqrt())


# ---------------------------------------------------------------------------------- the strategy
@dataclass
class FedSALoRAConfig(StrategyConfig):
    """FedSA-LoRA's options (arXiv 2410.01463)."""

    name: str = "fedsa_lora"
    keep_head: bool = field(
        default=True, metadata={"help": "Keep the head on each node with B (the paper); false: average it like A."}
    )


class FedSALoRA(LoRAStrategy):
    """Ā shared, B_k (and, with ``keep_head``, the head) personal and kept in node k's state.

    There is no global model (``has_global_model = False``): the server evaluates and saves
    nothing itself. After every round each node evaluates its own model, ``W + s B_k Ā`` with its
    kept B_k (B = 0 on a node that never trained), on its validation slice (:meth:`evaluation_plan`);
    ``client_val_accuracy_mean`` / ``_std`` in ``metrics.jsonl`` are their example-weighted mean and
    spread. ``personal_accuracy`` is the same over the round's training clients, right after training.
    """

    name = "fedsa_lora"
    config_class = FedSALoRAConfig
    has_global_model = False

    def __init__(self, initial_adapter: State, *, keep_head: bool = True, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        if self.max_rank is None:
            raise ValueError(
                "fedsa_lora shares LoRA A factors and the adapter has none; use fedavg for other peft methods"
            )
        self.keep_head = keep_head

    def groups(self, node: NodeInfo, server_round: int) -> tuple[GroupPlan, ...]:
        # B_k lives on the node: from its state (zero on a node that never trained), never uploaded.
        personal = GroupPlan(
            roles=frozenset({LORA_B}), source=Source.NODE, fallback=Source.ZERO, upload=False, keep=True
        )
        if self.keep_head:  # the head too, starting from the initial head the message carries
            return (
                GroupPlan(roles=frozenset({LORA_A}), source=Source.MESSAGE),
                personal,
                GroupPlan(
                    roles=frozenset({OTHER}), source=Source.NODE, fallback=Source.MESSAGE, upload=False, keep=True
                ),
            )
        return (GroupPlan(roles=frozenset({LORA_A, OTHER}), source=Source.MESSAGE), personal)

    def evaluation_plan(self, node: NodeInfo, server_round: int) -> ClientPlan:
        # Ā from the message; B_k (and the head) from the node's state, as in training.
        groups = [g for g in self.groups(node, server_round)]
        frozen = tuple(
            GroupPlan(roles=g.roles, source=g.source, fallback=g.fallback, train=False, upload=False) for g in groups
        )
        return ClientPlan(
            groups=frozen,
            server_round=server_round,
            rank=self.node_rank(node),
            base=self.base_plan(node),
            evaluate=Evaluate.PERSONAL,
        )

    @classmethod
    def from_config(cls, cfg: Config, initial_adapter: State) -> FedSALoRA:
        return cls(
            initial_adapter,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            min_clients=cfg.min_clients,
            keep_head=cast(FedSALoRAConfig, cfg.strategy).keep_head,  # composed with this rule's schema
        )

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        pairs, heads = split_state(self.adapter)
        for pair in pairs:
            self.adapter[pair.a_key] = fedsa_aggregate(
                [u.state[pair.a_key] for u in updates], weights, rank=self.lora_rank
            )
        if not self.keep_head:
            for key in heads:
                self.adapter[key] = weighted_sum([u.state[key] for u in updates], weights)
        accuracies = [(u.metrics.get(VAL_ACCURACY), u.metrics.get(VAL_EXAMPLES, 0)) for u in updates]
        evaluated = [(a, n) for a, n in accuracies if a is not None and n]
        if not evaluated:
            return {}
        counts = torch.tensor([float(n) for _, n in evaluated], dtype=torch.float64)
        mean, spread = personal_summary([a for a, _ in evaluated], counts / counts.sum())
        return {"personal_accuracy": mean, "personal_accuracy_spread": spread}
