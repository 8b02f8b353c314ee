"""Tensor helpers shared by the rules: weighted sums, the ideal update, the aggregation residual.

Rank padding and cutting is :func:`fedpeft.protocol.records.resize_factor`.

Pure functions on ``torch.Tensor``; no Flower types. Shapes follow peft: ``lora_a: (r, d_in)``,
``lora_b: (d_out, r)``, ``delta_w = scaling * lora_b @ lora_a: (d_out, d_in)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_weights(weights: torch.Tensor, *, count: int) -> torch.Tensor:
    """Validate aggregation weights: ``count`` finite, non-negative values summing to 1."""
    if weights.dim() != 1 or weights.numel() != count:
        raise ValueError(f"expected {count} weights, got shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {weights.tolist()}")
    if abs(weights.sum().item() - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, got {weights.sum().item()}")
    return weights


def weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ_k weights[k] * tensors[k]``, accumulated in float64 and returned in the tensors' dtype."""
    check_weights(weights, count=len(tensors))
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot average tensors of different shapes {sorted(shapes)}")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for w, t in zip(weights.tolist(), tensors):
        acc += w * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


def ideal_delta(
    lora_as: Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    scalings: Sequence[float],
) -> torch.Tensor:
    """The ideal global update ``ΔW* = Σ_k p_k s_k B_k A_k`` in float64 (docs/methods.md, notation)."""
    check_weights(weights, count=len(lora_as))
    delta: torch.Tensor | None = None
    for p, s, a, b in zip(weights.tolist(), scalings, lora_as, lora_bs):
        term = (p * s) * (b.to(torch.float64) @ a.to(torch.float64))
        delta = term if delta is None else delta + term
    if delta is None:
        raise ValueError("ideal_delta needs at least one client")
    return delta


def residual_parts(delta_w: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """``(‖ΔW* − approx‖², ‖ΔW*‖²)`` (Frobenius), summed over layers by the caller."""
    delta_w = delta_w.to(torch.float64)
    return float((delta_w - approx.to(torch.float64)).pow(2).sum()), float(delta_w.pow(2).sum())


def relative_residual(parts: Sequence[tuple[float, float]]) -> float:
    """``sqrt(Σ‖ΔW* − B'A'‖²) / sqrt(Σ‖ΔW*‖²)`` over layers; 0 when ΔW* is 0 everywhere."""
    num = sum(p[0] for p in parts)
    den = sum(p[1] for p in parts)
    return 0.0 if den == 0.0 else (num / den) ** 0.5
