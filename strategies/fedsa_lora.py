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

import torch

from strategies.lora_math import check_weights, pad_a, weighted_sum


def fedsa_aggregate(lora_as: Sequence[torch.Tensor], weights: torch.Tensor, *, rank: int) -> torch.Tensor:
    """``Ā = Σ_k p_k pad(A_k)``: ``lora_as[k]: (r_k, d_in)`` -> ``(rank, d_in)``."""
    return weighted_sum([pad_a(a, rank) for a in lora_as], weights)


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
