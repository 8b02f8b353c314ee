"""LoRA-FAIR: FedAvg of A and B plus a server-side correction of B̄ toward the ideal update.

"LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement",
Bian et al., ICCV 2025, https://arxiv.org/abs/2411.14961

Server: ``ΔW = Σ_k p_k B_k A_k``, ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``, then

    ΔB* = argmin_ΔB  S(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖_F

with S = 1 − cosine similarity (the paper; solved by a few gradient steps) or the squared
Frobenius distance (closed form ``ΔB = (ΔW − B̄Ā) Āᵀ (ĀĀᵀ + λI)⁻¹``; it can only correct the part of
ΔW in the row space of Ā). Clients start the next round from ``(Ā, B̄ + ΔB*)``; W never changes.
Up 1×, down 1×. No official code was found; this follows the paper's equations, with one
addition: the cosine ignores the length of (B̄+ΔB)Ā, so the best iterate is rescaled by a line
search on the Frobenius residual (:func:`safeguard`), which makes the corrected residual
never exceed FedAvg's (docs/methods.md, invariant 5) without making the cosine worse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from fedpeft.config.schema import Config, StrategyConfig
from fedpeft.protocol.records import State, split_state
from fedpeft.strategies.base import LoRAStrategy
from fedpeft.strategies.fedavg import fedit_pair
from fedpeft.strategies.lora_math import ideal_delta, relative_residual, residual_parts, weighted_sum
from fedpeft.strategies.types import ClientUpdate

METHODS = ("cosine", "frobenius")


def nothing_to_correct(delta_w: torch.Tensor, fedavg: torch.Tensor) -> bool:
    """True when ``B̄Ā`` already equals ``ΔW`` up to float64 rounding (e.g. all clients identical)."""
    return bool((delta_w - fedavg).norm() <= 1e-12 * delta_w.norm())


def fair_correction_frobenius(
    delta_w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *, lam: float
) -> torch.Tensor:
    """Closed form of ``argmin ‖ΔW − (B̄+ΔB)Ā‖²_F + λ‖ΔB‖²_F``.

    ``delta_w: (d_out, d_in)``, ``lora_a: (r, d_in)``, ``lora_b: (d_out, r)`` -> ``ΔB: (d_out, r)``,
    in float64: ``ΔB (ĀĀᵀ + λI) = (ΔW − B̄Ā) Āᵀ``, solved without forming an inverse.
    """
    a, b, dw = lora_a.to(torch.float64), lora_b.to(torch.float64), delta_w.to(torch.float64)
    if nothing_to_correct(dw, b @ a):
        return torch.zeros_like(b)  # exactly zero, not a rounding-level solve
    rhs = (dw - b @ a) @ a.T  # (d_out, r)
    gram = a @ a.T + lam * torch.eye(a.shape[0], dtype=torch.float64)
    if lam <= 0 and torch.linalg.matrix_rank(gram) < a.shape[0]:
        return torch.linalg.lstsq(gram, rhs.T).solution.T  # rank-deficient Ā: the least-norm solution
    return torch.linalg.solve(gram, rhs.T).T  # gram is symmetric: ΔB = rhs gram⁻¹


def cosine_dissimilarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 − <x, y> / (‖x‖ ‖y‖)`` over flattened matrices (1 when either is zero)."""
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return torch.ones((), dtype=x.dtype)
    return 1 - (x * y).sum() / (nx * ny)


def fair_objective(
    delta_w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, delta_b: torch.Tensor, *, lam: float
) -> torch.Tensor:
    """The paper's objective ``1 − cos(ΔW, (B̄+ΔB)Ā) + λ‖ΔB‖_F``."""
    return cosine_dissimilarity(delta_w, (lora_b + delta_b) @ lora_a) + lam * delta_b.norm()


def fair_correction_cosine(
    delta_w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *, lam: float, steps: int, lr: float
) -> torch.Tensor:
    """The paper's correction: ``steps`` Adam steps on :func:`fair_objective` from ΔB = 0 (float64).

    ``delta_w: (d_out, d_in)``, ``lora_a: (r, d_in)``, ``lora_b: (d_out, r)`` -> ``ΔB: (d_out, r)``.
    Keeps the best iterate, then :func:`safeguard` sets its length. The result is never worse than
    ΔB = 0 in cosine dissimilarity nor in the Frobenius residual (docs/methods.md, invariant 5); ΔB = 0
    exactly when there is nothing to correct (ΔW = 0, B̄Ā = 0, or B̄Ā = ΔW already, as when all
    clients are identical).
    """
    a, b, dw = lora_a.to(torch.float64), lora_b.to(torch.float64), delta_w.to(torch.float64)
    zero = torch.zeros_like(b)
    fedavg = b @ a
    # cos(ΔW, B̄Ā) is undefined when either is zero; and an already exact B̄Ā must stay as it is
    # (Adam normalises its steps, so it would wander away on rounding-level gradients).
    if steps == 0 or dw.norm() == 0 or fedavg.norm() == 0 or nothing_to_correct(dw, fedavg):
        return zero
    # Scale-free step size: ΔB moves relative to the size of B̄ (Adam steps are about lr per entry).
    delta_b = zero.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([delta_b], lr=lr * float(b.norm()) / b.numel() ** 0.5)
    best, best_value = zero, fair_objective(dw, a, b, zero, lam=lam).item()
    for step in range(steps + 1):
        value = fair_objective(
            dw, a, b, delta_b, lam=lam
        )  # ‖ΔB‖ has gradient 0 at ΔB = 0 (the subgradient torch picks)
        if value.item() < best_value:
            best, best_value = delta_b.detach().clone(), value.item()
        if step == steps:  # the last pass only scores the final iterate
            break
        optimizer.zero_grad()
        value.backward()
        if delta_b.grad is None or not torch.isfinite(delta_b.grad).all():
            break
        optimizer.step()
    corrected = safeguard(dw, a, b, best)
    if cosine_dissimilarity(dw, (b + corrected) @ a) > cosine_dissimilarity(dw, fedavg):
        return zero  # the line search crossed the antipode of ΔW (possible only when cos(ΔW, B̄Ā) < 0)
    return corrected


def safeguard(delta_w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, delta_b: torch.Tensor) -> torch.Tensor:
    """Scale ΔB by the t ∈ [0, 1] that minimises ‖ΔW − (B̄ + tΔB)Ā‖_F.

    The cosine objective is blind to scale, so its ΔB can point the right way yet overshoot; this
    line search keeps the direction and guarantees the corrected residual never exceeds FedAvg's
    (docs/methods.md, invariant 5). ``t = <R, ΔBĀ> / ‖ΔBĀ‖²`` with ``R = ΔW − B̄Ā``, clipped to [0, 1].
    """
    step = delta_b @ lora_a
    denom = float((step * step).sum())
    if denom == 0.0:
        return torch.zeros_like(delta_b)
    t = float(((delta_w - lora_b @ lora_a) * step).sum()) / denom
    return delta_b * min(max(t, 0.0), 1.0)


def lora_fair(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    *,
    rank: int,
    method: str,
    lam: float,
    steps: int,
    lr: float,
) -> tuple[State, float, float]:
    """LoRA-FAIR over whole adapters; returns (adapter with B̄ + ΔB, residual, FedAvg's residual)."""
    pairs, others = split_state(states[0])
    out: State = {}
    parts, fedavg_parts = [], []
    for pair in pairs:
        lora_as = [s[pair.a_key] for s in states]
        lora_bs = [s[pair.b_key] for s in states]
        lora_a, lora_b = fedit_pair(lora_as, lora_bs, weights, rank=rank)
        delta_w = ideal_delta(lora_as, lora_bs, weights, scalings=[1.0] * len(states))
        if method == "frobenius":
            delta_b = fair_correction_frobenius(delta_w, lora_a, lora_b, lam=lam)
        else:
            delta_b = fair_correction_cosine(delta_w, lora_a, lora_b, lam=lam, steps=steps, lr=lr)
        corrected = (lora_b.to(torch.float64) + delta_b).to(lora_b.dtype)
        out[pair.a_key], out[pair.b_key] = lora_a, corrected
        parts.append(residual_parts(delta_w, corrected.to(torch.float64) @ lora_a.to(torch.float64)))
        fedavg_parts.append(residual_parts(delta_w, lora_b.to(torch.float64) @ lora_a.to(torch.float64)))
    for key in others:
        out[key] = weighted_sum([s[key] for s in states], weights)
    return dict(sorted(out.items())), relative_residual(parts), relative_residual(fedavg_parts)


@dataclass
class LoRAFAIRConfig(StrategyConfig):
    """LoRA-FAIR's server-side correction of B̄ (arXiv 2411.14961, Sec. 4)."""

    name: str = "lora_fair"
    method: str = field(
        default="cosine",
        metadata={"help": "'cosine' (the paper: 1 − cos + λ‖ΔB‖, gradient steps) or 'frobenius' (closed form)."},
    )
    lam: float = field(
        default=0.01, metadata={"help": "λ, the weight of ‖ΔB‖ (the paper's 0.01; 0 over-fits the residual)."}
    )
    steps: int = field(default=50, metadata={"help": "Adam steps of the cosine correction."})
    lr: float = field(default=0.01, metadata={"help": "Step size of the cosine correction, relative to the size of B̄."})


class LoRAFAIR(LoRAStrategy):
    """FedIT plus the server-side correction ΔB of B̄."""

    name = "lora_fair"
    config_class = LoRAFAIRConfig

    def __init__(
        self,
        initial_adapter: State,
        *,
        method: str = "cosine",
        lam: float = 0.01,
        steps: int = 50,
        lr: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(initial_adapter, **kwargs)
        if method not in METHODS:
            raise ValueError(f"strategy.method must be one of {METHODS}, got {method!r}")
        if lam < 0 or steps < 0 or lr <= 0:
            raise ValueError(
                f"LoRA-FAIR needs strategy.lam >= 0, strategy.steps >= 0, strategy.lr > 0 (got {lam}, {steps}, {lr})"
            )
        self.method, self.lam, self.steps, self.lr = method, lam, steps, lr

    @classmethod
    def from_config(cls, cfg: Config, initial_adapter: State) -> LoRAFAIR:
        s = cast(LoRAFAIRConfig, cfg.strategy)  # composed with this rule's schema
        return cls(
            initial_adapter,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            min_clients=cfg.min_clients,
            method=s.method,
            lam=s.lam,
            steps=s.steps,
            lr=s.lr,
        )

    def aggregate(self, updates: list[ClientUpdate], weights: torch.Tensor, server_round: int) -> dict[str, float]:
        self.adapter, residual, fedavg_residual = lora_fair(
            [u.state for u in updates],
            weights,
            rank=self.lora_rank,
            method=self.method,
            lam=self.lam,
            steps=self.steps,
            lr=self.lr,
        )
        return {"residual": residual, "fedavg_residual": fedavg_residual}
