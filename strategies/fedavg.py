"""FedAvg on LoRA factors (FedIT).

"Towards Building the Federated GPT: Federated Instruction Tuning", Zhang et al., ICASSP 2024,
https://arxiv.org/abs/2305.05644

Server: ``Ā = Σ_k p_k A_k`` and ``B̄ = Σ_k p_k B_k`` (separately), ``p_k = n_k / Σ_j n_j``. Heads
(``modules_to_save``) are averaged the same way. Heterogeneous ranks (HetLoRA style): every factor
is zero-padded to r_max before averaging and each client takes back its first r_k components.
``B̄ Ā ≠ Σ p_k B_k A_k`` in general; the gap is reported as the aggregation residual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpeft.config.schema import StrategyConfig
from fedpeft.protocol.records import State, resize_factor, split_state
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate


def fedit_pair(
    lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor], weights: torch.Tensor, *, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average one layer's factors, zero-padded to ``rank``.

    ``lora_as[k]: (r_k, d_in)``, ``lora_bs[k]: (d_out, r_k)`` -> ``(Ā: (rank, d_in), B̄: (d_out, rank))``.
    """
    lora_a = weighted_sum([resize_factor(a, rank, dim=0) for a in lora_as], weights)
    lora_b = weighted_sum([resize_factor(b, rank, dim=1) for b in lora_bs], weights)
    return lora_a, lora_b


def fedit(
    states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor, *, rank: int | None
) -> tuple[State, float]:
    """FedIT over whole adapters: every LoRA pair and head averaged; returns (adapter, residual).

    ``states[k]`` are peft state dicts of possibly different ranks with the same keys. The residual
    is ``‖ΔW* − B̄Ā‖ / ‖ΔW*‖`` over all layers (scaling is common to all ranks, see LoraSettings).
    ``rank`` is None only for a peft method without LoRA pairs.
    """
    pairs, others = split_state(states[0])
    out: State = {}
    parts = []
    for pair in pairs:
        if rank is None:
            raise ValueError("fedit: LoRA pairs need the global rank to pad to")
        lora_as = [s[pair.a_key] for s in states]
        lora_bs = [s[pair.b_key] for s in states]
        lora_a, lora_b = fedit_pair(lora_as, lora_bs, weights, rank=rank)
        out[pair.a_key], out[pair.b_key] = lora_a, lora_b
        target = ideal_delta(lora_as, lora_bs, weights, scalings=[1.0] * len(states))
        parts.append(residual_parts(target, lora_b.to(torch.float64) @ lora_a.to(torch.float64)))
    for key in others:
        out[key] = weighted_sum([s[key] for s in states], weights)
    return dict(sorted(out.items())), relative_residual(parts)


@dataclass
class FedAvgConfig(StrategyConfig):
    """FedIT has no options of its own."""

    name: str = "fedavg"


class FedIT(LoRAStrategy):
    """FedAvg of LoRA A and B, separately, weighted by ``num-examples``."""

    name = "fedavg"
    config_class = FedAvgConfig
    peft_methods = None  # any peft adapter: every trainable tensor is averaged (LoRA factors zero-padded)

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        self.adapter, residual = fedit([u.state for u in updates], weights, rank=self.max_rank)
        return {"residual": residual} if self.max_rank is not None else {}  # no LoRA factors, no residual
