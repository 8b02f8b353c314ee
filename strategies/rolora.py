"""RoLoRA: alternating optimisation — B-rounds train B with A frozen, A-rounds train A with B frozen.

"Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", Chen et al.,
NeurIPS 2025, https://arxiv.org/abs/2409.02346

Odd rounds: every client starts from the shared ``(Ā, B̄)``, trains B with A frozen at Ā, uploads
B; the server sets ``B̄ ← Σ_k p_k B_k``. Even rounds: B frozen at B̄, A trains and is uploaded,
``Ā ← Σ_k p_k A_k``. One factor is always common, so the aggregate is exact every round:
``B̄ Ā = Σ_k p_k B_k Ā`` (B-round) and ``B̄ Ā = Σ_k p_k B̄ A_k`` (A-round). Up 0.5×.
Heterogeneous ranks keep this exact: client k uses the first r_k components of the frozen shared
factor, its trained factor is zero-padded to r_max, and a zero-padded component meets only the
shared factor's components the client never used.
Reference pitfall: a multi-method repository trains its RoLoRA clients on one shared model object,
so each client starts from the previous client's factors; here every client starts from the
message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.config.schema import StrategyConfig
from fedpeft.protocol.records import State, exact_product, resize_factor, split_state
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, GroupPlan, Source
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo

FACTORS = ("lora_B", "lora_A")


def trained_factor(server_round: int) -> str:
    """``"lora_B"`` in odd rounds (1, 3, …), ``"lora_A"`` in even rounds: the factor that trains."""
    if server_round < 1:
        raise ValueError(f"rounds count from 1, got {server_round}")
    return FACTORS[(server_round - 1) % 2]


def rolora_aggregate(trained: Sequence[torch.Tensor], weights: torch.Tensor, *, factor: str, rank: int) -> torch.Tensor:
    """The average of the factor trained this round, zero-padded to ``rank``.

    ``factor == "lora_B"``: ``trained[k]: (d_out, r_k)`` -> ``B̄: (d_out, rank)``;
    ``factor == "lora_A"``: ``trained[k]: (r_k, d_in)`` -> ``Ā: (rank, d_in)``.
    """
    if factor == "lora_B":
        return weighted_sum([resize_factor(b, rank, dim=1) for b in trained], weights)
    if factor == "lora_A":
        return weighted_sum([resize_factor(a, rank, dim=0) for a in trained], weights)
    raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")


# ---------------------------------------------------------------------------------- the strategy
@dataclass
class RoLoRAConfig(StrategyConfig):
    """RoLoRA has no options of its own (odd rounds train B, even rounds A)."""

    name: str = "rolora"


FACTOR_ROLE = {"lora_B": LORA_B, "lora_A": LORA_A}


class RoLoRA(LoRAStrategy):
    """Odd rounds train and upload B (A frozen at Ā), even rounds A (B frozen at B̄); the head every round."""

    name = "rolora"
    config_class = RoLoRAConfig

    def __init__(self, initial_adapter: State, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        if self.max_rank is None:
            raise ValueError(
                "rolora alternates LoRA A and B and the adapter has none; use fedavg for other peft methods"
            )

    def groups(self, node: NodeInfo, server_round: int) -> tuple[GroupPlan, ...]:
        trained = FACTOR_ROLE[trained_factor(server_round)]
        frozen = LORA_A if trained == LORA_B else LORA_B
        return (
            GroupPlan(roles=frozenset({frozen}), source=Source.MESSAGE, train=False, upload=False),
            GroupPlan(roles=frozenset({trained, OTHER}), source=Source.MESSAGE),
        )

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        factor = trained_factor(server_round)
        pairs, heads = split_state(self.adapter)
        parts = []
        for pair in pairs:
            shared_key, trained_key = (pair.a_key, pair.b_key) if factor == "lora_B" else (pair.b_key, pair.a_key)
            trained = [u.state[trained_key] for u in updates]
            self.adapter[trained_key] = rolora_aggregate(trained, weights, factor=factor, rank=self.lora_rank)
            # the clients' products, each with its prefix of the shared factor, against B̄Ā
            shared = self.adapter[shared_key]
            if factor == "lora_B":
                lora_as, lora_bs = [resize_factor(shared, t.shape[1], dim=0) for t in trained], trained
            else:
                lora_as, lora_bs = trained, [resize_factor(shared, t.shape[0], dim=1) for t in trained]
            target = ideal_delta(lora_as, lora_bs, weights, scalings=[1.0] * len(updates))
            parts.append(residual_parts(target, exact_product(self.adapter[pair.b_key], self.adapter[pair.a_key])))
        for key in heads:
            self.adapter[key] = weighted_sum([u.state[key] for u in updates], weights)
        return {"residual": relative_residual(parts), "trained_factor_is_b": float(factor == "lora_B")}
