"""FedSVD: A frozen as in FFA-LoRA, B trains; the server re-factors B̄A by SVD every round.

"FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", Lee et al.,
NeurIPS 2025, https://arxiv.org/abs/2505.12805

Round 1 starts from a seeded random A (shared, never trained) and B = 0. Server:
``B̄ = Σ_k p_k B_k``, ``U Σ Vᵀ = svd(B̄ A)`` (rank ≤ r, computed from the factors), then

    A ← Vᵀ[:r],     B ← U[:, :r] Σ[:r],

sent to every client. Exact, ``B_new A_new = B̄ A``, and the rows of the new A are orthonormal,
``A Aᵀ = I``, which keeps B's gradients well conditioned. DP-friendly: only B is trained and
privatised; the SVD is post-processing. Needs ``r ≤ d_in`` (r orthonormal rows in d_in dims),
checked at start. Heterogeneous ranks: B zero-padded to r_max before averaging; client k takes the
first r_k singular directions, ``B[:, :r_k] A[:r_k]`` = the best rank-r_k approximation of B̄A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.config.schema import StrategyConfig
from fedpeft.protocol.records import State, exact_product, resize_factor, seeded_tensors, split_state
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, GroupPlan, Source
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo


def svd_refactor(lora_b: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_new: (r, d_in), B_new: (d_out, r))`` with ``B_new A_new = lora_b @ lora_a``, ``A_new A_newᵀ = I``.

    ``lora_b: (d_out, r)``, ``lora_a: (r, d_in)``, ``r ≤ d_in``; float64. From the factors: with
    ``Aᵀ = Q R`` (reduced QR, ``Q: (d_in, r)``), ``B A = (B Rᵀ) Qᵀ``; the full SVD
    ``B Rᵀ = U Σ Wᵀ`` (``W: (r, r)``) gives ``Vᵀ = Wᵀ Qᵀ`` with r orthonormal rows even when
    ``rank(B A) < r``, and ``B_new = U[:, :m] Σ`` zero-padded to r columns (``m = min(d_out, r)``).
    Singular values are in descending order, so ``B_new[:, :k] A_new[:k]`` is the best rank-k fit.
    """
    r, d_in = lora_a.shape
    if lora_b.shape[1] != r:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} and lora_a {tuple(lora_a.shape)} have different ranks")
    if r > d_in:
        raise ValueError(f"FedSVD needs rank <= d_in for orthonormal rows of A, got rank {r} > d_in {d_in}")
    q, r_factor = torch.linalg.qr(lora_a.to(torch.float64).T)  # (d_in, r), (r, r)
    u, sigma, wh = torch.linalg.svd(
        lora_b.to(torch.float64) @ r_factor.T, full_matrices=True
    )  # (d_out, d_out), (m,), (r, r)
    m = sigma.shape[0]
    lora_b_new = torch.zeros(lora_b.shape[0], r, dtype=torch.float64)
    lora_b_new[:, :m] = u[:, :m] * sigma
    return wh @ q.T, lora_b_new


def fedsvd_pair(
    lora_bs: Sequence[torch.Tensor], weights: torch.Tensor, *, lora_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer: ``B̄ = Σ_k p_k pad(B_k)`` with the shared ``lora_a: (r, d_in)``, then :func:`svd_refactor`.

    ``lora_bs[k]: (d_out, r_k)``, ``r_k ≤ r`` -> ``(A_new: (r, d_in), B_new: (d_out, r))`` in float64.
    """
    lora_b = weighted_sum([resize_factor(b.to(torch.float64), lora_a.shape[0], dim=1) for b in lora_bs], weights)
    return svd_refactor(lora_b, lora_a)


# ---------------------------------------------------------------------------------- the strategy
@dataclass
class FedSVDConfig(StrategyConfig):
    """FedSVD has no options of its own (round 1's A is drawn from the run's seed)."""

    name: str = "fedsvd"


class FedSVD(LoRAStrategy):
    """A frozen (seeded in round 1, the SVD basis after), B trained; the server re-factors B̄A by SVD."""

    name = "fedsvd"
    config_class = FedSVDConfig

    def __init__(self, initial_adapter: State, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        if self.max_rank is None:
            raise ValueError(
                "fedsvd re-factors LoRA products and the adapter has none; use fedavg for other peft methods"
            )
        pairs, _ = split_state(self.adapter)
        narrow = sorted({pair.module for pair in pairs if self.adapter[pair.a_key].shape[1] < self.max_rank})
        if narrow:
            raise ValueError(
                f"fedsvd needs rank <= d_in of every adapted layer (r orthonormal rows of A); rank {self.max_rank} is "
                f"too large for {narrow[:3]}"
            )
        self.a_seed = self.seed + 7919  # every client regenerates round 1's A from it
        self.adapter.update(seeded_tensors(self.adapter, [p.a_key for p in pairs], seed=self.a_seed))
        self.refactored = False  # True once A is the SVD basis, which has to travel

    def groups(self, node: NodeInfo, server_round: int) -> tuple[GroupPlan, ...]:
        if self.refactored:
            frozen = GroupPlan(roles=frozenset({LORA_A}), source=Source.MESSAGE, train=False, upload=False)
        else:
            frozen = GroupPlan(
                roles=frozenset({LORA_A}),
                source=Source.SEED,
                seed=self.a_seed,
                seed_rank=self.max_rank,
                train=False,
                upload=False,
            )
        return (frozen, GroupPlan(roles=frozenset({LORA_B, OTHER}), source=Source.MESSAGE))

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        pairs, heads = split_state(self.adapter)
        parts, orthogonality = [], 0.0
        for pair in pairs:
            lora_a = self.adapter[pair.a_key]
            lora_bs = [u.state[pair.b_key] for u in updates]
            a_new, b_new = fedsvd_pair(lora_bs, weights, lora_a=lora_a)
            target = ideal_delta(
                [resize_factor(lora_a, b.shape[1], dim=0) for b in lora_bs],
                lora_bs,
                weights,
                scalings=[1.0] * len(updates),
            )
            self.adapter[pair.a_key], self.adapter[pair.b_key] = a_new.to(lora_a.dtype), b_new.to(lora_a.dtype)
            parts.append(residual_parts(target, exact_product(self.adapter[pair.b_key], self.adapter[pair.a_key])))
            a = self.adapter[pair.a_key].to(torch.float64)
            orthogonality = max(
                orthogonality, float((a @ a.T - torch.eye(a.shape[0], dtype=torch.float64)).abs().max())
            )
        for key in heads:
            self.adapter[key] = weighted_sum([u.state[key] for u in updates], weights)
        self.refactored = True
        return {"residual": relative_residual(parts), "a_orthogonality_error": orthogonality}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "a_seed": self.a_seed, "refactored": self.refactored}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.a_seed, self.refactored = state["a_seed"], state["refactored"]
