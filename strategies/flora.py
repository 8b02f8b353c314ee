"""FLoRA: stacking heterogeneous LoRA adapters, merged into the base every round.

"FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
Wang et al., NeurIPS 2024, https://arxiv.org/abs/2409.05976

Server (Eq. 5-6 of the paper, scalings folded into A):
``A_stack = [p_1 s_1 A_1; …; p_K s_K A_K]`` (Σ r_k × d_in), ``B_stack = [B_1 | … | B_K]``
(d_out × Σ r_k), so ``B_stack A_stack = Σ_k p_k s_k B_k A_k`` exactly, whatever the ranks. The
round's ΔW is merged into the base (``W ← W + ΔW_t``) and every client starts the next round with
a fresh LoRA (seeded A, B = 0). A client that skipped rounds receives every stack it missed, so
all clients train on ``W_0 + Σ_τ ΔW_τ`` (FederatedLLM issue #4); downlink bytes are those stacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.config.schema import Config, StrategyConfig
from fedpeft.protocol.records import State, exact_product, fresh_lora, round_seed, split_state
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, GroupPlan, Source
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import check_weights, ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo


def stack_pair(
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    scalings: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one layer's factors: ``lora_as[k]: (r_k, d_in)``, ``lora_bs[k]: (d_out, r_k)``.

    Returns ``(a_stack: (Σ r_k, d_in), b_stack: (d_out, Σ r_k))`` with ``b_stack @ a_stack ==
    Σ_k weights[k] * scalings[k] * lora_bs[k] @ lora_as[k]``; blocks keep the client order.
    """
    check_weights(weights, count=len(lora_as))
    a_blocks = [(p * s) * a.to(torch.float64) for p, s, a in zip(weights.tolist(), scalings, lora_as)]
    a_stack = torch.cat(a_blocks, dim=0).to(lora_as[0].dtype)
    b_stack = torch.cat(list(lora_bs), dim=1)
    return a_stack, b_stack


def stacked_delta(a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """``ΔW = b_stack @ a_stack`` (d_out, d_in) in float64, bit-reproducible in every process."""
    return exact_product(b_stack, a_stack)


@dataclass
class FLoRAConfig(StrategyConfig):
    """FLoRA has no options of its own (its scaling is the model's ``lora.alpha / lora.r``)."""

    name: str = "flora"


class FLoRA(LoRAStrategy):
    """Stack the clients' adapters, merge the product into the global base, restart LoRA each round.

    ``scaling`` is peft's ``s = lora_alpha / r`` (the same for every rank: alpha scales with the rank).
    """

    name = "flora"
    config_class = FLoRAConfig
    moves_base = True

    def __init__(self, initial_adapter: State, *, scaling: float = 1.0, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        self.scaling = scaling
        self.adapter = fresh_lora(self.adapter, seed=round_seed(self.seed, 1))

    def groups(self, node: NodeInfo, server_round: int) -> tuple[GroupPlan, ...]:
        # A fresh LoRA every round on the merged base: A from the round's seed (drawn at r_max, so
        # every rank shares its rows), B = 0; only the head travels down.
        return (
            GroupPlan(
                roles=frozenset({LORA_A}),
                source=Source.SEED,
                seed=round_seed(self.seed, server_round),
                seed_rank=self.max_rank,
            ),
            GroupPlan(roles=frozenset({LORA_B}), source=Source.ZERO),
            GroupPlan(roles=frozenset({OTHER}), source=Source.MESSAGE),
        )

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        pairs, heads = split_state(updates[0].state)
        stack: State = {}
        parts = []
        for pair in pairs:
            lora_as = [u.state[pair.a_key] for u in updates]
            lora_bs = [u.state[pair.b_key] for u in updates]
            a_stack, b_stack = stack_pair(lora_as, lora_bs, weights, scalings=[self.scaling] * len(updates))
            stack[pair.a_key], stack[pair.b_key] = a_stack, b_stack
            target = ideal_delta(lora_as, lora_bs, weights, scalings=[self.scaling] * len(updates))
            parts.append(residual_parts(target, stacked_delta(a_stack, b_stack)))
        self.merge_into_base(stack)
        for key in heads:
            self.adapter[key] = weighted_sum([u.state[key] for u in updates], weights)
        self.adapter = fresh_lora(self.adapter, seed=round_seed(self.seed, server_round + 1))
        return {
            "residual": relative_residual(parts),
            "stack_rank": float(sum(u.rank for u in updates if u.rank is not None)),
        }

    @classmethod
    def from_config(cls, cfg: Config, initial_adapter: State) -> FLoRA:
        return cls(
            initial_adapter,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            min_clients=cfg.min_clients,
            scaling=cfg.model.lora.alpha / cfg.model.lora.r,
        )
