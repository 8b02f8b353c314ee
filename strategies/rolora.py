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

import torch

from strategies.lora_math import pad_a, pad_b, weighted_sum

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
        return weighted_sum([pad_b(b, rank) for b in trained], weights)
    if factor == "lora_A":
        return weighted_sum([pad_a(a, rank) for a in trained], weights)
    raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
