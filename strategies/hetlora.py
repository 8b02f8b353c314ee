"""HetLoRA: heterogeneous ranks by zero-padding, aggregated with sparsity weights.

"Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", Cho et al.,
EMNLP 2024, https://arxiv.org/abs/2401.06432

Server: every client's factors are zero-padded to r_max and averaged with the sparsity weights

    w_k = n_k ‖s_k B_k A_k‖_F / Σ_j n_j ‖s_j B_j A_j‖_F,

so a client whose update is larger (less sparse) counts more; each client truncates the global
adapter to its own rank (its first r_k rows of A, columns of B). The norms come from the factors,
``‖B A‖²_F = Σ (BᵀB) ⊙ (A Aᵀ)`` (two r × r Gram matrices), never from a dense d_out × d_in product.
When every update is zero the weights fall back to ``n_k / Σ n_j``. The paper's optional rank
self-pruning on the clients is not implemented (clients train the rank the server assigns).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedpeft.config import StrategyConfig
from fedpeft.records import State, exact_product, split_state
from strategies.base import ClientUpdate, LoRAStrategy
from strategies.fedavg import fedit_pair
from strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum


def product_norm(lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """``‖lora_b @ lora_a‖_F`` from the factors: ``lora_a: (r, d_in)``, ``lora_b: (d_out, r)``.

    ``‖B A‖²_F = tr(Aᵀ Bᵀ B A) = Σ_ij (BᵀB)_ij (A Aᵀ)_ij``, in float64, O((d_in + d_out) r²).
    """
    a, b = lora_a.to(torch.float64), lora_b.to(torch.float64)
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"lora_b {tuple(b.shape)} and lora_a {tuple(a.shape)} have different ranks")
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt())


def sparsity_weights(norms: Sequence[float], counts: Sequence[int]) -> torch.Tensor:
    """``w_k ∝ n_k ‖ΔW_k‖_F`` normalised to sum 1 (float64); data weights when all norms are 0.

    ``norms[k]`` is client k's ``‖s_k B_k A_k‖_F`` summed in quadrature over its layers, ``counts[k]
    = n_k``.
    """
    if len(norms) != len(counts) or not norms:
        raise ValueError(f"need one norm per client, got {len(norms)} norms and {len(counts)} counts")
    n = torch.tensor(list(counts), dtype=torch.float64)
    v = torch.tensor(list(norms), dtype=torch.float64)
    if (n <= 0).any() or not torch.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"counts must be positive and norms finite and non-negative, got {list(counts)}, {list(norms)}")
    raw = n * v
    if raw.sum() == 0:
        raw = n
    return raw / raw.sum()


def client_norm(state: Mapping[str, torch.Tensor], *, scaling: float) -> float:
    """``‖s ΔW_k‖_F`` of one client over all its LoRA layers: ``s · sqrt(Σ_layers ‖B A‖²_F)``."""
    pairs, _ = split_state(state)
    return abs(scaling) * sum(product_norm(state[p.a_key], state[p.b_key]) ** 2 for p in pairs) ** 0.5


def hetlora(states: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[int], *, scaling: float, rank: int) -> tuple[State, torch.Tensor]:
    """HetLoRA over whole adapters: ``(global adapter at rank, the sparsity weights)``.

    ``states[k]`` are peft state dicts of rank r_k with the same keys; every LoRA factor is
    zero-padded to ``rank`` and averaged, and so is every head, with :func:`sparsity_weights`.
    A client later takes back its first r_k components (``fedpeft.records.resize_rank``).
    """
    weights = sparsity_weights([client_norm(s, scaling=scaling) for s in states], counts)
    pairs, others = split_state(states[0])
    out: State = {}
    for pair in pairs:
        out[pair.a_key], out[pair.b_key] = fedit_pair([s[pair.a_key] for s in states], [s[pair.b_key] for s in states], weights, rank=rank)
    for key in others:
        out[key] = weighted_sum([s[key] for s in states], weights)
    return dict(sorted(out.items())), weights


# ---------------------------------------------------------------------------------- the strategy
@dataclass
class HetLoRAConfig(StrategyConfig):
    """HetLoRA has no options of its own (rank self-pruning is not implemented)."""

    name: str = "hetlora"


class HetLoRA(LoRAStrategy):
    """Zero-padded FedAvg of every tensor with sparsity weights; each client takes its first r_k components."""

    name = "hetlora"
    config_class = HetLoRAConfig

    def __init__(self, initial_adapter: State, *, scaling: float = 1.0, **kwargs: Any) -> None:
        super().__init__(initial_adapter, **kwargs)
        if self.max_rank is None:
            raise ValueError("hetlora weights clients by their LoRA update and the adapter has none; use fedavg for other peft methods")
        self.scaling = scaling

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        states = [u.state for u in updates]
        self.adapter, sparsity = hetlora(states, [u.num_examples for u in updates], scaling=self.scaling, rank=self.max_rank)
        pairs, _ = split_state(self.adapter)
        parts = []
        for pair in pairs:  # against the example-weighted ideal update Σ p_k s B_k A_k
            target = ideal_delta([s[pair.a_key] for s in states], [s[pair.b_key] for s in states], weights, scalings=[self.scaling] * len(states))
            parts.append(residual_parts(target, self.scaling * exact_product(self.adapter[pair.b_key], self.adapter[pair.a_key])))
        return {"residual": relative_residual(parts), "max_weight": float(sparsity.max())}

    @classmethod
    def from_config(cls, cfg: Any, initial_adapter: State) -> "HetLoRA":
        return cls(initial_adapter, clients_per_round=cfg.clients_per_round, seed=cfg.seed, min_clients=cfg.min_clients, scaling=cfg.model.lora.alpha / cfg.model.lora.r)
