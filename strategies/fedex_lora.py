"""FedEx-LoRA: FedAvg of the factors plus the exact residual, folded into the base every round.

"Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models", Singhal et al.,
ACL 2025, https://arxiv.org/abs/2410.09432

Server (Eq. 6-8 of the paper, weighted by ``p_k = n_k / Σ n_j``, one scaling ``s`` for all clients):

    Ā = Σ_k p_k A_k,   B̄ = Σ_k p_k B_k,   R = Σ_k p_k s B_k A_k − s B̄ Ā,   W ← W + R

and every client starts the next round from ``(Ā, B̄)`` on the new base, so the global model is
exactly ``W_prev + Σ_k p_k s B_k A_k``. R is never formed as a dense ``d_out × d_in`` matrix on the
wire: it travels as stacked factors of rank (K+1)r,

    B_R = [B_1 | … | B_K | B̄]          (d_out, (K+1) r)
    A_R = [p_1 s A_1; …; p_K s A_K; −s Ā]   ((K+1) r, d_in)

and a client that skipped rounds receives every stack it missed, as FLoRA's base updates.
Ranks must be equal: with zero-padding a rank-r_k client would start from the first r_k
components of (Ā, B̄) and no longer hold the exact global model, so the rule refuses them at start.

Reference pitfalls avoided: the authors' code adds ``R.T`` (right only for GPT-2's Conv1D, silently
wrong for a square ``nn.Linear``) and takes unweighted means. Here R has peft's ``nn.Linear``
layout ``(d_out, d_in)``, the same as ``lora_b @ lora_a``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.config.schema import Config, StrategyConfig
from fedpeft.protocol.records import State, exact_product, split_state
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import check_weights, ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo


def fedex_average(
    lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedIT's ``(Ā, B̄) = (Σ p_k A_k, Σ p_k B_k)``; ``lora_as[k]: (r, d_in)``, ``lora_bs[k]: (d_out, r)``."""
    ranks = {a.shape[0] for a in lora_as} | {b.shape[1] for b in lora_bs}
    if len(ranks) != 1:
        raise ValueError(f"FedEx-LoRA needs one rank for every client, got ranks {sorted(ranks)}")
    return weighted_sum(lora_as, weights), weighted_sum(lora_bs, weights)


def residual_stack(
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``R = Σ_k p_k s B_k A_k − s B̄ Ā`` as stacked factors (never dense).

    ``lora_as[k]: (r, d_in)``, ``lora_bs[k]: (d_out, r)``, ``lora_a = Ā: (r, d_in)``,
    ``lora_b = B̄: (d_out, r)`` -> ``(a_stack: ((K+1) r, d_in), b_stack: (d_out, (K+1) r))`` with
    ``b_stack @ a_stack == R``: ``b_stack = [B_1 | … | B_K | B̄]``,
    ``a_stack = [p_1 s A_1; …; p_K s A_K; −s Ā]``, client order kept. The A blocks are scaled in
    float64 and cast back to the factors' dtype.
    """
    check_weights(weights, count=len(lora_as))
    if len(lora_bs) != len(lora_as):
        raise ValueError(f"{len(lora_as)} lora_A but {len(lora_bs)} lora_B")
    a_blocks = [(p * scaling) * a.to(torch.float64) for p, a in zip(weights.tolist(), lora_as)]
    a_blocks.append(-scaling * lora_a.to(torch.float64))
    a_stack = torch.cat(a_blocks, dim=0).to(lora_a.dtype)
    b_stack = torch.cat([*lora_bs, lora_b], dim=1)
    return a_stack, b_stack


def fedex_pair(
    lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor], weights: torch.Tensor, *, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of FedEx-LoRA: ``(Ā, B̄, a_stack, b_stack)`` with ``b_stack @ a_stack = R``.

    The new global model of the layer is ``W + b_stack @ a_stack + s B̄ Ā = W + Σ_k p_k s B_k A_k``.
    """
    lora_a, lora_b = fedex_average(lora_as, lora_bs, weights)
    a_stack, b_stack = residual_stack(lora_as, lora_bs, weights, lora_a=lora_a, lora_b=lora_b, scaling=scaling)
    return lora_a, lora_b, a_stack, b_stack


# ---------------------------------------------------------------------------------- the strategy
@dataclass
class FedExLoRAConfig(StrategyConfig):
    """FedEx-LoRA has no options of its own.

    Its scaling is the model's ``lora.alpha / lora.r``; ranks must be equal.
    """

    name: str = "fedex_lora"


class FedExLoRA(LoRAStrategy):
    """FedIT of A and B, plus the exact residual merged into the base through the moving-base ledger.

    ``scaling`` is peft's ``s = lora_alpha / r``. Clients train every tensor from the message
    (Ā, B̄ and the head) on the base the ledger describes; only a node's missed stacks travel on
    top of the adapter.
    """

    name = "fedex_lora"
    moves_base = True  # the residual is merged into W every round
    config_class = FedExLoRAConfig

    def __init__(self, initial_adapter: State, *, scaling: float = 1.0, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        if self.max_rank is None:
            raise ValueError(
                "fedex_lora aggregates LoRA factors and the adapter has none; use fedavg for other peft methods"
            )
        self.scaling = scaling

    def register_nodes(self, nodes: Iterable[NodeInfo]) -> None:
        nodes = list(nodes)
        check_equal_ranks(self.name, [n.rank for n in nodes if n.rank is not None], max_rank=self.max_rank)
        super().register_nodes(nodes)

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        pairs, heads = split_state(updates[0].state)
        stack: State = {}
        parts, fedavg_parts = [], []
        for pair in pairs:
            lora_as = [u.state[pair.a_key] for u in updates]
            lora_bs = [u.state[pair.b_key] for u in updates]
            lora_a, lora_b, a_stack, b_stack = fedex_pair(lora_as, lora_bs, weights, scaling=self.scaling)
            self.adapter[pair.a_key], self.adapter[pair.b_key] = lora_a, lora_b
            stack[pair.a_key], stack[pair.b_key] = a_stack, b_stack
            target = ideal_delta(lora_as, lora_bs, weights, scalings=[self.scaling] * len(updates))
            fedavg = self.scaling * exact_product(lora_b, lora_a)
            parts.append(residual_parts(target, exact_product(b_stack, a_stack) + fedavg))
            fedavg_parts.append(residual_parts(target, fedavg))
        self.merge_into_base(stack)
        for key in heads:
            self.adapter[key] = weighted_sum([u.state[key] for u in updates], weights)
        return {
            "residual": relative_residual(parts),
            "fedavg_residual": relative_residual(fedavg_parts),
            "stack_rank": float(a_stack.shape[0]),
        }

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        from fedpeft.models.adapters import client_ranks  # local: keeps transformers off the import of the rule's math

        check_equal_ranks(cls.name, [r for r in client_ranks(cfg) if r is not None], max_rank=None)

    @classmethod
    def from_config(cls, cfg: Config, initial_adapter: State) -> FedExLoRA:
        return cls(
            initial_adapter,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            min_clients=cfg.min_clients,
            scaling=cfg.model.lora.alpha / cfg.model.lora.r,
        )


def check_equal_ranks(rule: str, ranks: Sequence[int], *, max_rank: int | None) -> None:
    """Refuse heterogeneous ranks at start, naming the rules that take them."""
    distinct = sorted(set(ranks) | ({max_rank} if max_rank is not None else set()))
    if len(distinct) > 1:
        raise ValueError(
            f"{rule} needs the same LoRA rank on every client, got ranks {distinct}: the residual is folded into one "
            "shared base, so every client must start from the whole (Ā, B̄). For heterogeneous ranks use "
            "flexlora, flora, hetlora, fedavg, ffa_lora, rolora, fedsa_lora or fedsvd (strategy.ranks: null here)."
        )
