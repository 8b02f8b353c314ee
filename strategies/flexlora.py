"""FlexLoRA: heterogeneous ranks; the global update kept at full rank, each client gets its best fit.

"Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
Bai et al., NeurIPS 2024, https://arxiv.org/abs/2402.11505

Server: the global update of the round ``G = Σ_k p_k s_k B_k A_k`` is kept as stacked factors
``G = P Q`` (``P = [B_1 | … | B_K]: (d_out, R)``, ``Q = [p_1 s_1 A_1; …; p_K s_K A_K]: (R, d_in)``,
``R = Σ r_k``; never dense), and client k receives the best rank-r_k approximation of G
(Eckart-Young): with ``U Σ Vᵀ = svd(G)``,

    B_k = U[:, :r_k] Σ[:r_k]^½ / √s_k,     A_k = Σ[:r_k]^½ Vᵀ[:r_k] / √s_k,

so ``s_k B_k A_k = G_{r_k}`` and ``‖G − s_k B_k A_k‖²_F = Σ_{i>r_k} σ_i²``. Splitting Σ between
the factors is a convention; this one balances them (both factors carry ``Σ^½``), as the paper's
code does. The SVD is computed from the factors: QR of P and of Qᵀ, then the SVD of the small
``R × R`` core, O((d_out + d_in) R²) instead of O(d_out d_in min(d_out, d_in)). The base W never
changes; the global model is ``W + G`` at full rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.config.schema import Config, StrategyConfig
from fedpeft.protocol.records import State, exact_product, split_state
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.flora import stack_pair
from fedpeft.strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate, GlobalModel


def factored_svd(lora_b: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``G = lora_b @ lora_a`` without forming G, in float64.

    ``lora_b = P: (d_out, R)``, ``lora_a = Q: (R, d_in)`` -> ``(u: (d_out, m), sigma: (m,),
    vh: (m, d_in))``, ``m = min(d_out, d_in, R)``, sigma descending, ``u @ diag(sigma) @ vh == G``.
    With ``P = Q_P R_P`` and ``Qᵀ = Q_Q R_Q`` (reduced QR), ``G = Q_P (R_P R_Qᵀ) Q_Qᵀ``; the core
    ``R_P R_Qᵀ`` is at most ``R × R``.
    """
    if lora_b.dim() != 2 or lora_a.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} and lora_a {tuple(lora_a.shape)} do not form a product")
    q_p, r_p = torch.linalg.qr(lora_b.to(torch.float64))  # (d_out, k1), (k1, R)
    q_q, r_q = torch.linalg.qr(lora_a.to(torch.float64).T)  # (d_in, k2), (k2, R)
    u_core, sigma, vh_core = torch.linalg.svd(r_p @ r_q.T, full_matrices=False)  # (k1, m), (m,), (m, k2)
    return q_p @ u_core, sigma, vh_core @ q_q.T


def rank_approximation(
    u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, *, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Client factors for the best rank-``rank`` approximation ``G_rank`` of ``G = u diag(sigma) vh``.

    ``u: (d_out, m)``, ``sigma: (m,)`` descending, ``vh: (m, d_in)`` -> ``(lora_a: (rank, d_in),
    lora_b: (d_out, rank))`` in float64 with ``scaling * lora_b @ lora_a == G_rank``; Σ is split
    evenly (``Σ^½`` in each factor). Components beyond ``m`` are zero (a rank ≥ rank(G) gets G).
    """
    if rank < 1 or scaling <= 0:
        raise ValueError(f"rank must be >= 1 and scaling > 0, got rank={rank}, scaling={scaling}")
    k = min(rank, sigma.shape[0])
    root = sigma[:k].to(torch.float64).clamp_min(0).sqrt() / math.sqrt(scaling)
    lora_b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    lora_a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    lora_b[:, :k] = u[:, :k].to(torch.float64) * root
    lora_a[:k] = root[:, None] * vh[:k].to(torch.float64)
    return lora_a, lora_b


# ---------------------------------------------------------------------------------- the strategy
@dataclass
class FlexLoRAConfig(StrategyConfig):
    """FlexLoRA has no options of its own (its scaling is the model's ``lora.alpha / lora.r``)."""

    name: str = "flexlora"


class FlexLoRA(LoRAStrategy):
    """Keep ``G = Σ p_k s B_k A_k`` at full rank; send each client the first r_k SVD components.

    The rank-r_max approximation is stored as the adapter, so a rank-r_k client's prefix of it
    (:func:`fedpeft.protocol.records.resize_rank`) is exactly its best rank-r_k fit (the balanced split
    keeps each component on its own). ``global_model`` is ``W + G`` itself, as an adapter of rank
    ``Σ r_k`` of the round's clients (zero components where G's rank is lower).
    """

    name = "flexlora"
    config_class = FlexLoRAConfig

    def __init__(self, initial_adapter: State, *, scaling: float = 1.0, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        if self.max_rank is None:
            raise ValueError(
                "flexlora aggregates LoRA factors and the adapter has none; use fedavg for other peft methods"
            )
        self.scaling = scaling
        self.full: State = {}  # G at rank Σ r_k (LoRA factors for scaling s) and the heads; empty before round 1
        self.full_rank: int | None = None

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        pairs, heads = split_state(updates[0].state)
        full_rank = sum(u.rank for u in updates if u.rank is not None)
        full: State = {}
        parts, kept = [], []
        for pair in pairs:
            lora_as = [u.state[pair.a_key] for u in updates]
            lora_bs = [u.state[pair.b_key] for u in updates]
            a_stack, b_stack = stack_pair(lora_as, lora_bs, weights, scalings=[self.scaling] * len(updates))
            u, sigma, vh = factored_svd(b_stack.to(torch.float64), a_stack.to(torch.float64))
            dtype = self.adapter[pair.a_key].dtype
            lora_a, lora_b = rank_approximation(u, sigma, vh, rank=self.lora_rank, scaling=self.scaling)
            self.adapter[pair.a_key], self.adapter[pair.b_key] = lora_a.to(dtype), lora_b.to(dtype)
            full_a, full_b = rank_approximation(u, sigma, vh, rank=full_rank, scaling=self.scaling)
            full[pair.a_key], full[pair.b_key] = full_a.to(dtype), full_b.to(dtype)
            target = ideal_delta(lora_as, lora_bs, weights, scalings=[self.scaling] * len(updates))
            parts.append(residual_parts(target, self.scaling * exact_product(full[pair.b_key], full[pair.a_key])))
            kept.append(
                residual_parts(target, self.scaling * exact_product(self.adapter[pair.b_key], self.adapter[pair.a_key]))
            )
        for key in heads:
            self.adapter[key] = weighted_sum([u.state[key] for u in updates], weights)
            full[key] = self.adapter[key].clone()
        self.full, self.full_rank = full, full_rank
        # residual: the global model W + G against Σ p_k s B_k A_k (zero up to rounding);
        # truncation: what the rank-r_max clients lose, ‖G − G_{r_max}‖ / ‖G‖.
        return {
            "residual": relative_residual(parts),
            "truncation": relative_residual(kept),
            "global_rank": float(full_rank),
        }

    def global_model(self) -> GlobalModel:
        if not self.full:
            return super().global_model()
        return GlobalModel(
            adapter={k: v.clone() for k, v in self.full.items()},
            rank=self.full_rank,
            base_updates=list(self.base_updates),
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "full": self.full, "full_rank": self.full_rank}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.full = {k: v.clone() for k, v in state["full"].items()}
        self.full_rank = state["full_rank"]

    @classmethod
    def from_config(cls, cfg: Config, initial_adapter: State) -> FlexLoRA:
        return cls(
            initial_adapter,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            min_clients=cfg.min_clients,
            scaling=cfg.model.lora.alpha / cfg.model.lora.r,
        )
