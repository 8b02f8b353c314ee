"""HetLoRA: heterogeneous ranks by zero-padding, aggregated with sparsity weights.

"Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", Cho et al.,
EMNLP 2024, https://arxiv.org/abs/2401.06432

Server: every client's factors are zero-padded to r_max and averaged with the sparsity weights

    w_k = n_k ‖s_k B_k A_k‖_F / Σ_j n_j ‖s_j B_j A_j‖_F,

so a client whose update is larger (less sparse) counts more; each client truncates the global
adapter to its own rank (its first r_k rows of A, columns of B). The norms come from the factors,
``‖B A‖²_F = Σ (BᵀB) ⊙ (A Aᵀ)`` (two r × r Gram matrices), never from a dense d_out × d_in product.
When every update is zero the weights fall back to ``n_k / Σ n_j``.

Rank self-pruning (the paper's optional client step, off unless ``prune_decay`` is set): each
plan carries a :class:`fedpeft.protocol.wire.RankPruning`, so a client at rank r trains with
``λ Σ_layers ‖B[:, t:r]‖_F ‖A[t:r, :]‖_F`` added to its loss (``t = max(min_rank, ⌊γ r⌋)``) and,
if training shrank that tail norm, replies at rank t. The server sends that client rank t from
then on (a client never grows back); the ranks are part of the checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.config.schema import Config, StrategyConfig
from fedpeft.protocol.records import State, exact_product, split_state
from fedpeft.protocol.wire import ClientPlan, ProtocolError, RankPruning
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.fedavg import fedit_pair
from fedpeft.strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate, NodeInfo


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
        raise ValueError(
            f"counts must be positive and norms finite and non-negative, got {list(counts)}, {list(norms)}"
        )
    raw = n * v
    if raw.sum() == 0:
        raw = n
    return raw / raw.sum()


def client_norm(state: Mapping[str, torch.Tensor], *, scaling: float) -> float:
    """``‖s ΔW_k‖_F`` of one client over all its LoRA layers: ``s · sqrt(Σ_layers ‖B A‖²_F)``."""
    pairs, _ = split_state(state)
    return abs(scaling) * sum(product_norm(state[p.a_key], state[p.b_key]) ** 2 for p in pairs) ** 0.5


def hetlora(
    states: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[int], *, scaling: float, rank: int
) -> tuple[State, torch.Tensor]:
    """HetLoRA over whole adapters: ``(global adapter at rank, the sparsity weights)``.

    ``states[k]`` are peft state dicts of rank r_k with the same keys; every LoRA factor is
    zero-padded to ``rank`` and averaged, and so is every head, with :func:`sparsity_weights`.
    A client later takes back its first r_k components (``fedpeft.protocol.records.resize_rank``).
    """
    weights = sparsity_weights([client_norm(s, scaling=scaling) for s in states], counts)
    pairs, others = split_state(states[0])
    out: State = {}
    for pair in pairs:
        out[pair.a_key], out[pair.b_key] = fedit_pair(
            [s[pair.a_key] for s in states], [s[pair.b_key] for s in states], weights, rank=rank
        )
    for key in others:
        out[key] = weighted_sum([s[key] for s in states], weights)
    return dict(sorted(out.items())), weights


# ---------------------------------------------------------------------------------- the strategy
@dataclass
class HetLoRAConfig(StrategyConfig):
    """HetLoRA's optional rank self-pruning on the clients (off by default)."""

    name: str = "hetlora"
    prune_decay: float | None = field(
        default=None,
        metadata={"help": "γ in (0, 1): a client may shrink from rank r to ⌊γ r⌋ each round; null: no pruning."},
    )
    prune_weight: float = field(
        default=0.01,
        metadata={"help": "λ, the weight of the tail-norm penalty ‖B[:, t:]‖ ‖A[t:, :]‖ in the clients' loss."},
    )
    prune_min_rank: int = field(default=1, metadata={"help": "No client prunes below this rank."})


class HetLoRA(LoRAStrategy):
    """Zero-padded FedAvg of every tensor with sparsity weights; each client takes its first r_k components."""

    name = "hetlora"
    config_class = HetLoRAConfig

    def __init__(
        self, initial_adapter: State, *, scaling: float = 1.0, prune: RankPruning | None = None, **kwargs: Any
    ) -> None:
        super().__init__(initial_adapter, **kwargs)
        if self.max_rank is None:
            raise ValueError(
                "hetlora weights clients by their LoRA update and the adapter has none; "
                "use fedavg for other peft methods"
            )
        self.scaling = scaling
        self.prune = prune
        self.pruned: dict[int, int] = {}  # partition id -> the rank that client pruned itself to

    def node_rank(self, node: NodeInfo) -> int | None:
        return self.pruned.get(node.partition_id, node.rank)

    def plan(self, node: NodeInfo, server_round: int, *, attempt: int = 0) -> ClientPlan:
        plan = super().plan(node, server_round, attempt=attempt)
        return plan if self.prune is None else dataclasses.replace(plan, prune=self.prune)

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        for u in updates:  # a client that replied at a smaller rank pruned itself: it trains at that rank from now on
            assigned = self.node_rank(self.nodes[u.node_id])
            if u.rank is not None and assigned is not None and u.rank < assigned:
                self.pruned[self.nodes[u.node_id].partition_id] = u.rank
        states = [u.state for u in updates]
        self.adapter, sparsity = hetlora(
            states, [u.num_examples for u in updates], scaling=self.scaling, rank=self.lora_rank
        )
        pairs, _ = split_state(self.adapter)
        parts = []
        for pair in pairs:  # against the example-weighted ideal update Σ p_k s B_k A_k
            target = ideal_delta(
                [s[pair.a_key] for s in states],
                [s[pair.b_key] for s in states],
                weights,
                scalings=[self.scaling] * len(states),
            )
            parts.append(
                residual_parts(target, self.scaling * exact_product(self.adapter[pair.b_key], self.adapter[pair.a_key]))
            )
        figures = {"residual": relative_residual(parts), "max_weight": float(sparsity.max())}
        if self.prune is not None:
            figures["mean_rank"] = sum(self.node_rank(node) or 0 for node in self.nodes.values()) / len(self.nodes)
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": dict(self.pruned)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.pruned = dict(state.get("pruned", {}))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        options = cfg.strategy
        if getattr(options, "prune_decay", None) is None:
            return
        try:
            pruning(options)
        except ProtocolError as err:
            raise ValueError(f"strategy.prune_*: {err}") from None
        if cfg.client.dp.enabled:
            raise ValueError(
                "strategy.prune_decay (rank self-pruning) with client.dp: the tail-norm penalty is not a per-sample "
                "loss, so DP-SGD cannot clip it; turn one off"
            )
        if cfg.compression.name != "none":
            raise ValueError(
                f"strategy.prune_decay (rank self-pruning) with compression={cfg.compression.name}: a pruned reply's "
                "update has no start of its rank to be compressed against; turn one off"
            )

    @classmethod
    def from_config(cls, cfg: Config, initial_adapter: State) -> HetLoRA:
        prune = pruning(cfg.strategy) if getattr(cfg.strategy, "prune_decay", None) is not None else None
        return cls(
            initial_adapter,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            min_clients=cfg.min_clients,
            scaling=cfg.model.lora.alpha / cfg.model.lora.r,
            prune=prune,
        )


def pruning(options: Any) -> RankPruning:
    """The :class:`RankPruning` the strategy options ask for (a :class:`ProtocolError` naming a bad value)."""
    return RankPruning(
        decay=float(options.prune_decay), weight=float(options.prune_weight), min_rank=int(options.prune_min_rank)
    )
