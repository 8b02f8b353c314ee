"""FFA-LoRA: federated LoRA with A frozen at a shared random init; only B trains and travels.

"Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313

A is drawn from a seed every client knows (``fedpeft.protocol.records.seeded_tensors``), so it is
bit-identical everywhere and never travels; B starts at zero. Server: ``B̄ = Σ_k p_k B_k``, which
is exact because A is shared: ``B̄ A = Σ_k p_k B_k A``. Uplink and downlink carry B and the head
only, about half of FedIT's. Heterogeneous ranks: B zero-padded to r_max; a rank-r_k client uses
the first r_k rows of the shared r_max A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.config.schema import StrategyConfig
from fedpeft.protocol.records import LORA_A_SUFFIX, State, resize_factor, seeded_tensors, split_state
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, GroupPlan, Source
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo


def ffa_aggregate(lora_bs: Sequence[torch.Tensor], weights: torch.Tensor, *, rank: int) -> torch.Tensor:
    """``B̄ = Σ_k p_k pad(B_k)``; ``lora_bs[k]: (d_out, r_k)`` -> ``(d_out, rank)``."""
    return weighted_sum([resize_factor(b, rank, dim=1) for b in lora_bs], weights)


def ffa(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    *,
    shared: Mapping[str, torch.Tensor],
    rank: int,
) -> tuple[State, float]:
    """FFA-LoRA over whole uploads (B and heads); A comes from ``shared`` (the r_max adapter).

    Returns (the new global adapter, the residual ‖Σ p_k B_k A_k − B̄ Ā‖ / ‖Σ p_k B_k A_k‖), which
    is zero up to float rounding because every A_k is a prefix of the shared A.
    """
    pairs, others = split_state(shared)
    out: State = {k: v.clone() for k, v in shared.items()}
    parts = []
    for pair in pairs:
        lora_a = shared[pair.a_key]
        lora_bs = [s[pair.b_key] for s in states]
        out[pair.b_key] = ffa_aggregate(lora_bs, weights, rank=rank)
        lora_as = [lora_a[: b.shape[1]] for b in lora_bs]
        target = ideal_delta(lora_as, lora_bs, weights, scalings=[1.0] * len(states))
        parts.append(
            residual_parts(
                target, out[pair.b_key].to(torch.float64) @ resize_factor(lora_a, rank, dim=0).to(torch.float64)
            )
        )
    for key in others:
        out[key] = weighted_sum([s[key] for s in states], weights)
    return dict(sorted(out.items())), relative_residual(parts)


@dataclass
class FFALoRAConfig(StrategyConfig):
    """FFA-LoRA has no options of its own."""

    name: str = "ffa_lora"


class FFALoRA(LoRAStrategy):
    """B averaged, A frozen and shared through a seed."""

    name = "ffa_lora"
    config_class = FFALoRAConfig

    def __init__(self, initial_adapter: State, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        self.a_seed = self.seed + 7919  # any value every client learns from the server
        a_keys = [k for k in self.adapter if k.endswith(LORA_A_SUFFIX)]
        self.adapter.update(seeded_tensors(self.adapter, a_keys, seed=self.a_seed))

    def groups(self, node: NodeInfo, server_round: int) -> tuple[GroupPlan, ...]:
        return (
            # A: regenerated from the shared seed at r_max (a rank-r client keeps its first r rows), frozen, never sent.
            GroupPlan(
                roles=frozenset({LORA_A}),
                source=Source.SEED,
                seed=self.a_seed,
                seed_rank=self.lora_rank,
                train=False,
                upload=False,
            ),
            GroupPlan(roles=frozenset({LORA_B, OTHER}), source=Source.MESSAGE),
        )

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        self.adapter, residual = ffa([u.state for u in updates], weights, shared=self.adapter, rank=self.lora_rank)
        return {"residual": residual}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "a_seed": self.a_seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.a_seed = state["a_seed"]
